"""plaudit.v1 protobuf messages and gRPC stubs."""
