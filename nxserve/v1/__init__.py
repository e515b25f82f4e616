"""Generated protobuf/gRPC stubs of protos/nxserve/v1 (regenerate with `python protos/generate.py`)."""
