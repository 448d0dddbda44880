"""`python -m lorafleet.trainer`: the same entry point as `lorafleet serve trainer`."""

from lorafleet.cli.serve import serve_main

if __name__ == "__main__":
    serve_main("trainer")
