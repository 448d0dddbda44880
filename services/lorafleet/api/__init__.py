"""Generated protobuf messages and gRPC stubs (see scripts/gen_protos.py)."""
