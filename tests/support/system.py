"""The whole system in the test's event loop: real HTTP (uvicorn), real NATS JetStream, the real
database of the session and a real SMTP server (aiosmtpd on loopback)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.auth import create_token
from services.notify.app import NotifyService
from services.notify.capture import MailCapture
from services.runner import ingest_app
from services.safety.app import SafetyService
from shared.embedded_nats import free_port
from shared.settings import Settings
from shared.store.eventstore import now_utc

INVESTIGATORS = ["pi@trial.test", "co-pi@trial.test"]
DSMB = ["dsmb-chair@trial.test"]


def session_settings(data_dir: Path, nats_url: str, smtp_url: str, **extra: Any) -> Settings:
    """Fresh stream and subject names per call: no test sees another's messages."""
    tag = uuid.uuid4().hex[:10]
    return Settings(
        data_dir=data_dir, nats_url=nats_url, smtp_url=smtp_url,
        investigator_emails=INVESTIGATORS, dsmb_emails=DSMB,
        stream_name=f"TW_{tag}", subject_prefix=f"tw{tag}", http_port=free_port(),
        **{"relay_interval_s": 0.05, "max_deliver": 3, **extra},
    )


@dataclass
class RunningSystem:
    settings: Settings
    engine: AsyncEngine
    capture: MailCapture
    safety: SafetyService  # the in-process one (``with_safety=False``: workers of the test's own)
    notify: NotifyService
    server: uvicorn.Server
    tokens: dict[str, str] = field(default_factory=dict)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}"

    def client(self, role: str = "admin") -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=10,
                                 headers={"Authorization": f"Bearer {self.tokens[role]}"})

    def mails_to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.capture.messages() if address in str(m.get("To", ""))]


async def start_system(settings: Settings, engine: AsyncEngine, capture: MailCapture, *,
                       clock: Callable[[], datetime] = now_utc, with_safety: bool = True) -> RunningSystem:
    assert settings.nats_url and settings.smtp_url
    safety = SafetyService(settings, nats_url=settings.nats_url, engine=engine, clock=clock)
    notify = NotifyService(settings, nats_url=settings.nats_url, smtp_url=settings.smtp_url, engine=engine,
                           clock=clock)
    safety_app, notify_app = safety.app(), notify.app()
    if with_safety:
        await safety_app.start()
    await notify_app.start()
    api = ingest_app(settings, engine, settings.nats_url)
    api.state.clock = clock  # one clock for the whole system: what is recorded, and what is checked
    server = uvicorn.Server(uvicorn.Config(api, host=settings.http_host, port=settings.http_port,
                                           log_level="warning"))
    system = RunningSystem(settings, engine, capture, safety, notify, server)
    system._tasks.append(asyncio.create_task(server.serve()))
    system._tasks.extend([])
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.05)
    async with engine.begin() as conn:
        for role, site in (("admin", None), ("investigator", None), ("site_staff", "S01"), ("dsmb", None)):
            system.tokens[role] = await create_token(conn, user=f"test-{role}", role=role, site_id=site)
    system._apps = (safety_app, notify_app) if with_safety else (notify_app,)  # type: ignore[attr-defined]
    return system


async def stop_system(system: RunningSystem) -> None:
    system.server.should_exit = True
    await asyncio.gather(*system._tasks, return_exceptions=True)
    for app in reversed(system._apps):  # type: ignore[attr-defined]
        await app.stop()


async def eventually(check: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def equals(value: Awaitable[Any], expected: Any) -> bool:
    """For ``eventually``: whether an awaited value is ``expected`` yet."""
    return bool(await value == expected)


def nats_url_from_env() -> str | None:
    return os.environ.get("TRIALWATCH_TEST_NATS_URL")
