"""`python -m lorafleet.node`: the same entry point as `lorafleet serve node`."""

from lorafleet.cli.serve import serve_main

if __name__ == "__main__":
    serve_main("node")
