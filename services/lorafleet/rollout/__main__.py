"""`python -m lorafleet.rollout`: the same entry point as `lorafleet serve rollout`."""

from lorafleet.cli.serve import serve_main

if __name__ == "__main__":
    serve_main("rollout")
