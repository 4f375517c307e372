"""gRPC health probe for the Plaudit images: exit 0 when the service answers SERVING.

Used by the Dockerfile's HEALTHCHECK and by the feedback service's liveness probe. Kubernetes'
own ``grpc`` probes cover readiness; they cannot tell "alive but NOT_SERVING" (the feedback
service while its database is down) from "hung", which ``--allow-not-serving`` does.

    python healthcheck.py [--addr HOST:PORT] [--service NAME] [--timeout S] [--allow-not-serving]
                          [--tls-ca-file PEM [--tls-server-name NAME]]

With ``--tls-ca-file`` the check speaks TLS (a server started with ``PLAUDIT_TLS_CERT_FILE``),
verifying the certificate against that CA under ``--tls-server-name`` (the name in the
certificate; the address is 127.0.0.1). Kubernetes' own gRPC probes cannot speak TLS.

The default address is 127.0.0.1 on ``PLAUDIT_PORT`` (the port the service itself reads), else
50051. Exit codes: 0 healthy, 1 not serving or unknown service, 2 no answer.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(
    addr: str,
    service: str,
    timeout: float,
    tls_ca_file: str | None = None,
    tls_server_name: str | None = None,
) -> int:
    """The service's ServingStatus; raises grpc.RpcError when the server does not answer."""
    if tls_ca_file:
        with open(tls_ca_file, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(addr, credentials, options=options)
    else:
        channel = grpc.insecure_channel(addr)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return int(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    port = os.environ.get("PLAUDIT_PORT", "50051")
    parser.add_argument("--addr", default=f"127.0.0.1:{port}", help="server address")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    parser.add_argument(
        "--allow-not-serving",
        action="store_true",
        help="also succeed on NOT_SERVING: a liveness check (the process answers)",
    )
    parser.add_argument("--tls-ca-file", help="PEM CA of the server's certificate: use TLS")
    parser.add_argument("--tls-server-name", help="the name the server's certificate is for")
    args = parser.parse_args(argv)
    try:
        status = check(
            args.addr, args.service, args.timeout, args.tls_ca_file, args.tls_server_name
        )
    except grpc.RpcError as exc:
        code = exc.code()
        sys.stderr.write(f"{args.addr}: {code.name}: {exc.details()}\n")
        return 1 if code == grpc.StatusCode.NOT_FOUND else 2
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    healthy = status == SERVING or (args.allow_not_serving and status == NOT_SERVING)
    if not healthy:
        sys.stderr.write(f"{args.addr} {args.service or '(server)'}: {name}\n")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
