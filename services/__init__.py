"""Plaudit services: reward scoring (and, later, feedback and generation) over gRPC."""
