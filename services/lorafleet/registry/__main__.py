"""`python -m lorafleet.registry [--host H] [--port P] [--config FILE]`: the same
entry point as `lorafleet serve registry`."""

from lorafleet.cli.serve import serve_main

if __name__ == "__main__":
    serve_main("registry")
