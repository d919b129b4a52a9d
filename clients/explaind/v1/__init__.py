"""Generated protobuf / gRPC stubs for the explaind.v1 API (``make proto`` regenerates them; do not edit)."""
