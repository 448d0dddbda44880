"""`python -m lorafleet.scheduler`: the same entry point as `lorafleet serve scheduler`."""

from lorafleet.cli.serve import serve_main

if __name__ == "__main__":
    serve_main("scheduler")
