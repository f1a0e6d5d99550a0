"""The three services of ``trialwatch up``, each in a child process of its own.

Each child is ``python -m services <name> --no-migrate`` (``up`` has migrated once before starting
them) with the resolved URLs in its environment. So the web server never waits for the safety
service's start-up sweep, and a long fold never stalls an HTTP request.

A child is in a session of its own (Ctrl-C in the terminal reaches ``up`` alone, which stops the
children first and the embedded parts after them) and dies with ``up`` however ``up`` ends
(Linux parent-death signal, as the embedded nats-server). One that exits on its own is started
again after a pause that doubles with each quick exit (1 s, 2 s, ... 30 s).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from shared.embedded_nats import die_with_parent

log = logging.getLogger(__name__)

SERVICES = ("ingest", "safety", "notify")
FIRST_PAUSE_S = 1.0
LONGEST_PAUSE_S = 30.0
STEADY_AFTER_S = 30.0  # a child that ran this long starts again after the first pause, not a longer one


class ServiceChild:
    """One service as a child process; ``keep_running()`` is called every second or so."""

    def __init__(self, name: str, env: Mapping[str, str]) -> None:
        self.name = name
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.pause = FIRST_PAUSE_S
        self.restart_at: float | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "services", self.name, "--no-migrate"]

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def keep_running(self) -> None:
        """Start it again, once its pause is over, if it has exited."""
        if self.process is None or self.running:
            return
        now = time.monotonic()
        if self.restart_at is None:
            if now - self.started_at >= STEADY_AFTER_S:
                self.pause = FIRST_PAUSE_S
            log.error("%s (pid %d) exited with code %s; starting it again in %.0f s",
                      self.name, self.process.pid, self.process.returncode, self.pause)
            self.restart_at = now + self.pause
            self.pause = min(self.pause * 2, LONGEST_PAUSE_S)
        elif now >= self.restart_at:
            self.start()

    def terminate(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            log.error("%s (pid %d) did not stop in time; killing it", self.name, self.process.pid)
            self.process.kill()
            self.process.wait()


class ServiceChildren:
    """``async with ServiceChildren(env) as children: await children.keep_running()``: started on
    the way in, kept running until cancelled, stopped (SIGTERM, then SIGKILL after
    ``stop_timeout``) on the way out."""

    def __init__(self, env: Mapping[str, str], names: Sequence[str] = SERVICES, *, stop_timeout: float = 20.0) -> None:
        self.children = [ServiceChild(name, env) for name in names]
        self.stop_timeout = stop_timeout

    async def __aenter__(self) -> ServiceChildren:
        for child in self.children:
            child.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def keep_running(self, every_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(every_s)
            for child in self.children:
                try:
                    child.keep_running()
                except Exception:
                    log.exception("could not start %s again; trying again", child.name)

    async def stop(self) -> None:
        """All of them at once: each finishes what it has in hand (its own SIGTERM handling)."""
        for child in self.children:
            child.terminate()
        await asyncio.gather(*(asyncio.to_thread(child.wait, self.stop_timeout) for child in self.children))
        for child in self.children:
            child.kill()
        log.info("services stopped")
