"""A NATS JetStream cluster on loopback ports: real ``nats-server`` processes (the binary
shared/embedded_nats.py finds), each with its own store, routes to all the others, and the
parent-death signal of an embedded server, so a test that dies leaves none behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import nats
from nats.js.api import StreamInfo

from shared.embedded_nats import EmbeddedNats, free_port


class NatsCluster:
    """``start()``, ``await ready()``, ``kill(name)``, ``stop()``; ``url`` names every node,
    comma-separated, as ``TRIALWATCH_NATS_URL`` takes it."""

    def __init__(self, root: Path, size: int = 3, name: str = "TRIALWATCH_TEST") -> None:
        cluster_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in cluster_ports)
        self.nodes = {
            f"n{i}": EmbeddedNats(root / f"n{i}", extra_args=[
                "-n", f"n{i}", "--cluster_name", name, "--cluster", f"nats://127.0.0.1:{port}", "--routes", routes,
            ])
            for i, port in enumerate(cluster_ports, start=1)
        }

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes.values())

    @property
    def live_url(self) -> str:
        """The nodes still running (for a look at the books after one was killed)."""
        return ",".join(node.url for node in self.nodes.values() if node.running)

    def start(self) -> NatsCluster:
        for node in self.nodes.values():
            node.start()
        return self

    async def ready(self, timeout: float = 30.0) -> None:
        """Until the cluster has elected its JetStream meta leader (no stream can be made before)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                nc = await nats.connect(self.url.split(","), connect_timeout=2, max_reconnect_attempts=1)
                try:
                    info = await nc.jetstream().account_info()
                    if info is not None:
                        return
                finally:
                    await nc.close()
            except Exception:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def stream_info(self, stream: str) -> StreamInfo:
        nc = await nats.connect(self.live_url.split(","), connect_timeout=2, max_reconnect_attempts=1)
        try:
            return await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()

    def kill(self, name: str) -> None:
        """SIGKILL: no goodbye to its routes or clients, nothing flushed."""
        process = self.nodes[name].process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
