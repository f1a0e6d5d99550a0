"""The browser tests: the ingest service on a free port (its own thread and event loop, the test
database) driven by Debian's chromium through Playwright. Playwright never downloads a browser
here: ``.ci/run`` and ``scripts/bootstrap`` install the ``chromium`` package when it is missing."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.app import create_app
from services.ingest.auth import create_token
from services.safety.handlers import SafetyMonitor
from shared.embedded_nats import free_port
from shared.protocol import load_protocol
from shared.settings import Settings
from shared.store.engine import make_engine, migrate
from shared.store.eventstore import now_utc
from tests.support.services import fresh_database

T = TypeVar("T")
CHROMIUM = os.environ.get("TRIALWATCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).parent / "screenshots"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.browser)


class IngestThread:
    """The ingest app served by uvicorn in a thread of its own, so the test drives a sync browser."""

    def __init__(self, database_url: str, data_dir: Path) -> None:
        self.database_url, self.port = database_url, free_port()
        self.settings = Settings(data_dir=data_dir, http_port=self.port)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="ingest", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.engine: AsyncEngine = make_engine(self.database_url)
        app = create_app(self.settings, engine=self.engine, protocol=load_protocol())
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.loop.run_until_complete(self._run())

    async def _run(self) -> None:
        task = asyncio.create_task(self.server.serve())
        while not self.server.started and not task.done():
            await asyncio.sleep(0.02)
        self.ready.set()
        await task
        await self.engine.dispose()

    def start(self) -> IngestThread:
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("the ingest app did not start")
        return self

    def call(self, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
        """Run ``work(engine)`` on the server's loop (seeding tokens and alerts, reading the store)."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(work(self.engine), self.loop)  # type: ignore[arg-type]
        return future.result(timeout=30)

    def evaluate(self) -> None:
        """What the safety service does when it has caught up (these tests run the ingest alone):
        every patient evaluated, its read models written, then the stopping rules. The patient
        list and the stopping-rules page read those rows."""
        async def sweep(engine: AsyncEngine) -> None:
            await SafetyMonitor(engine, load_protocol(), now_utc).sweep()

        self.call(sweep)

    def token(self, role: str, site: str | None = None, user: str | None = None) -> str:
        async def create(engine: AsyncEngine) -> str:
            async with engine.begin() as conn:
                return await create_token(conn, user=user or f"{role}-{site or 'all'}", role=role, site_id=site)

        return self.call(create)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def in_thread(work: Callable[[], T]) -> T:
    """Run blocking set-up that calls ``asyncio.run`` away from Playwright's event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result()


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestThread]:
    folder = tmp_path_factory.mktemp("browser")
    database = fresh_database(folder)
    url = in_thread(database.__enter__)
    try:
        in_thread(lambda: migrate(url))
        server = IngestThread(url, folder).start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        in_thread(lambda: database.__exit__(None, None, None))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Module-scoped: Playwright's sync API runs an event loop in this thread while it lives, which
    the rest of the suite (``asyncio.run`` in set-up, pytest-asyncio's loop) must not meet."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: install Debian's chromium package (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser: Any, ingest: IngestThread) -> Iterator[Callable[..., Any]]:
    """Pages in fresh browser contexts (no cookies shared), desktop size unless told otherwise."""
    contexts: list[Any] = []

    def make(width: int = 1280, height: int = 900, scale: float = 1, javascript: bool = True) -> Any:
        context = browser.new_context(base_url=ingest.url, viewport={"width": width, "height": height},
                                      device_scale_factor=scale, java_script_enabled=javascript)
        context.set_default_timeout(15_000)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


def shot(page: Any, name: str) -> Path:
    """A full-page screenshot for review (tests/browser/screenshots/, not committed)."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
