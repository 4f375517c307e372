"""Plaudit API: generated protobuf and gRPC stubs (see protos/generate.py)."""
