"""How the long-lived commands run: on uvloop, and without a log line per request by default."""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import Any

import pytest
import uvicorn
import uvloop

from services import cli, runner
from shared.settings import Settings


def test_a_long_lived_command_runs_on_uvloop() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def service() -> None:
        seen.append(asyncio.get_running_loop())

    before = signal.getsignal(signal.SIGTERM)
    try:
        cli._serve(service())
    finally:
        signal.signal(signal.SIGTERM, before)
    assert isinstance(seen[0], uvloop.Loop)


@pytest.mark.parametrize(("env", "expected"), [({}, False), ({"TRIALWATCH_ACCESS_LOG": "true"}, True)])
def test_the_access_log_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                expected: bool) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    configs: list[uvicorn.Config] = []

    class Server:
        def __init__(self, config: uvicorn.Config) -> None:
            configs.append(config)

        async def serve(self) -> None:
            return None

    monkeypatch.setattr(uvicorn, "Server", Server)
    app: Any = object()
    asyncio.run(runner.serve_http(Settings(_env_file=None), app))
    assert configs[0].access_log is expected
    assert configs[0].http == "httptools"


def test_what_start_up_built_is_kept_out_of_the_collectors_walks() -> None:
    built_at_start_up = [object() for _ in range(10)]
    try:
        runner.settle_heap()
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()  # this test process lives on: let its objects be collected again
    assert frozen >= len(built_at_start_up)
