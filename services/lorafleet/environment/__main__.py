"""`python -m lorafleet.environment`: the same entry point as `lorafleet serve environment`."""

from lorafleet.cli.serve import serve_main

if __name__ == "__main__":
    serve_main("environment")
