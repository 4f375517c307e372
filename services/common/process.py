"""Running Plaudit services as child processes (demo, benchmarks, ``plaudit up``)."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass

from plaudit.services.common.logging import active_format

log = logging.getLogger(__name__)

CLI = [sys.executable, "-m", "plaudit.cli"]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """A ``plaudit serve <service>`` child process listening on local ports."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    service: str = ""
    command: tuple[str, ...] = ()  # what started it: :meth:`restart` runs it again

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        """The service's Prometheus /metrics page."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the service drains in-flight requests) and wait; kill if it does not exit."""
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def restart(self) -> None:
        """Start the same command again (same ports and arguments) after the old process exited."""
        if self.process.poll() is None:
            raise RuntimeError(f"the {self.service} service (pid {self.pid}) is still running")
        if not self.command:
            raise RuntimeError(f"the {self.service} service has no command to restart")
        self.process = subprocess.Popen(list(self.command))


def start_service(
    service: str,
    *args: str,
    port: int = 0,
    metrics_port: int = 0,
    log_level: str = "WARNING",
    auth_disabled: bool = True,
) -> ServiceProcess:
    """Start ``plaudit serve <service> <args>`` (on free ports unless given); returns at once.

    The child listens on 127.0.0.1 only; ``auth_disabled`` passes ``--auth-disabled`` (say
    False to have it read its API keys from the environment, PLAUDIT_API_KEYS...).
    Wait with :func:`plaudit.services.reward.client.wait_until_serving` on ``.address`` before
    calling.
    """
    port, metrics_port = port or free_port(), metrics_port or free_port()
    if auth_disabled:  # said here once instead of by every child (see common.logging)
        log.warning(
            "authentication is DISABLED for the services started here: they listen on "
            "127.0.0.1 only; anyone on this machine may call them",
            extra={"once": "auth-disabled"},
        )
    command = [
        *CLI, "serve", service, "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port), "--log-format", active_format(),
        "--log-level", log_level,
        *(["--auth-disabled"] if auth_disabled else []), *args,
    ]  # fmt: skip
    return ServiceProcess(
        subprocess.Popen(command), port, metrics_port, service, command=tuple(command)
    )


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus text page (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
