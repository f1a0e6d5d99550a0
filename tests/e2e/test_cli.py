"""The contract's command line, run as a newcomer would: `trialwatch up` and the operator tools."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from services.ingest.app import create_app
from shared.embedded_nats import EmbeddedNats, free_port
from shared.settings import Settings
from tests.support.clinical import at, crs, enrolment, subject_id

pytestmark = pytest.mark.e2e
TRIALWATCH = [sys.executable, "-m", "services"]


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRIALWATCH, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALWATCH_")}
    env.update(TRIALWATCH_DATA_DIR=str(tmp_path / "var"), TRIALWATCH_HTTP_PORT=str(free_port()))
    return env


@pytest.fixture
def running_up(cli_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115
    process = subprocess.Popen([*TRIALWATCH, "up"], env=cli_env, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{cli_env['TRIALWATCH_HTTP_PORT']}"
    try:
        _wait_ready(base, process, tmp_path / "up.log")
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def test_up_runs_the_whole_system_and_an_urgent_event_lands_as_an_eml(
    cli_env: dict[str, str], running_up: subprocess.Popen[str]
) -> None:
    base = f"http://127.0.0.1:{cli_env['TRIALWATCH_HTTP_PORT']}"

    # /readyz answered (the fixture waited for it); each service runs in a child process of `up`.
    assert sorted(_services_of(running_up.pid)) == ["ingest", "notify", "safety"]

    # An operator creates a token for a site nurse: printed alone on the last line.
    created = run(cli_env, "token", "create", "--user", "nurse", "--role", "site_staff", "--site", "S01")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {token}"}

    # The nurse enrols a patient and records grade 3 CRS.
    subject = subject_id()
    assert httpx.post(f"{base}/v1/patients", json=enrolment(subject), headers=headers).status_code == 201
    assert httpx.post(f"{base}/v1/patients/{subject}/events", json=crs(at(2), 3), headers=headers).status_code == 201

    # The SMTP capture stores the investigators' mail under <data dir>/mail/.
    mail_dir = Path(cli_env["TRIALWATCH_DATA_DIR"]) / "mail"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(mail_dir.glob("*.eml")):
        time.sleep(0.2)
    [eml] = list(mail_dir.glob("*.eml"))
    message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert subject in str(message["Subject"]) and "URGENT" in str(message["Subject"])



def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet has stopped: it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _children_of(pid: int) -> dict[int, list[str]]:
    """The running processes whose parent is ``pid``, with their command lines (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state not in ("Z", "X"):
            found[int(entry.name)] = command
    return found


def _services_of(pid: int) -> dict[str, int]:
    """``up``'s service children by name (``python -m services <name> ...``)."""
    services = {}
    for child, command in _children_of(pid).items():
        if "services" in command[1:-1]:
            services[command[command.index("services") + 1]] = child
    return services


def _wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def _nats_pid(cli_env: dict[str, str]) -> int:
    return int((Path(cli_env["TRIALWATCH_DATA_DIR"]) / "nats" / "nats-server.pid").read_text())


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_up_stops_all_of_it_on_ctrl_c_and_on_sigterm(
    cli_env: dict[str, str], running_up: subprocess.Popen[str], stop: signal.Signals
) -> None:
    nats = _nats_pid(cli_env)
    assert _alive(nats)
    started = _children_of(running_up.pid)
    assert nats in started and len(started) == 4  # the broker and the three services

    # Ctrl-C, or SIGTERM as docker stop, systemd and Popen.terminate send it.
    running_up.send_signal(stop)
    assert running_up.wait(timeout=60) in (0, 130)

    # Nothing is left behind: not a service, not the embedded broker, not the HTTP port.
    _wait_until(lambda: not any(_alive(pid) for pid in started), 10, "every child of up stopped")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{cli_env['TRIALWATCH_HTTP_PORT']}/healthz", timeout=1)


def test_up_starts_its_broker_again_when_it_dies_and_nothing_recorded_meanwhile_is_lost(
    cli_env: dict[str, str], running_up: subprocess.Popen[str]
) -> None:
    base = f"http://127.0.0.1:{cli_env['TRIALWATCH_HTTP_PORT']}"
    token = run(cli_env, "token", "create", "--user", "nurse", "--role", "site_staff", "--site", "S01")
    headers = {"Authorization": f"Bearer {token.stdout.strip().splitlines()[-1]}"}
    subject = subject_id()
    assert httpx.post(f"{base}/v1/patients", json=enrolment(subject), headers=headers).status_code == 201

    # The embedded nats-server is killed; a grade 3 CRS is recorded while it may still be down.
    first = _nats_pid(cli_env)
    os.kill(first, signal.SIGKILL)
    assert httpx.post(f"{base}/v1/patients/{subject}/events", json=crs(at(2), 3),
                      headers=headers).status_code == 201

    # `up` starts it again on its port and store, and the investigators' mail arrives.
    mail_dir = Path(cli_env["TRIALWATCH_DATA_DIR"]) / "mail"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _mails_about(mail_dir, subject):
        time.sleep(0.2)
    assert _mails_about(mail_dir, subject)
    assert _nats_pid(cli_env) != first and _alive(_nats_pid(cli_env))
    _wait_ready(base)


@pytest.mark.parametrize("service", ["ingest", "safety", "notify"])
def test_up_starts_a_service_child_again_when_it_dies_and_the_urgent_mail_still_goes_out(
    cli_env: dict[str, str], running_up: subprocess.Popen[str], service: str
) -> None:
    base = f"http://127.0.0.1:{cli_env['TRIALWATCH_HTTP_PORT']}"
    token = run(cli_env, "token", "create", "--user", "nurse", "--role", "site_staff", "--site", "S01")
    headers = {"Authorization": f"Bearer {token.stdout.strip().splitlines()[-1]}"}
    subject = subject_id()
    assert httpx.post(f"{base}/v1/patients", json=enrolment(subject), headers=headers).status_code == 201

    # One service child is killed outright.
    first = _services_of(running_up.pid)[service]
    os.kill(first, signal.SIGKILL)

    # `up` starts it again; a grade 3 CRS recorded now reaches the investigators.
    _wait_until(lambda: _services_of(running_up.pid).get(service, first) != first, 30, f"{service} started again")
    _wait_ready(base, running_up)
    assert httpx.post(f"{base}/v1/patients/{subject}/events", json=crs(at(2), 3),
                      headers=headers).status_code == 201
    mail_dir = Path(cli_env["TRIALWATCH_DATA_DIR"]) / "mail"
    _wait_until(lambda: _mails_about(mail_dir, subject), 60, "the urgent mail")
    [mail] = _mails_about(mail_dir, subject)
    assert "URGENT" in str(mail["Subject"])
    assert sorted(_services_of(running_up.pid)) == ["ingest", "notify", "safety"]


def test_a_kill_9_of_up_leaves_no_orphan(cli_env: dict[str, str], running_up: subprocess.Popen[str]) -> None:
    children = _children_of(running_up.pid)
    assert len(children) == 4 and _nats_pid(cli_env) in children

    # Nothing runs `up`'s `finally`: the children go by the parent-death signal alone.
    running_up.kill()
    running_up.wait(timeout=10)
    _wait_until(lambda: not any(_alive(pid) for pid in children), 30, "every child of up gone")


def test_verify_names_the_first_tampered_event_and_replay_rebuilds(cli_env: dict[str, str]) -> None:
    assert run(cli_env, "token", "create", "--user", "admin", "--role", "admin").returncode == 0
    # Put two events in the store without the bus: the API app in-process is enough here.
    store = Path(cli_env["TRIALWATCH_DATA_DIR"]) / "trialwatch.db"
    code = (
        "import asyncio, httpx\n"
        "from services.ingest.app import create_app\n"
        "from services.ingest.auth import create_token\n"
        "from shared.settings import Settings\n"
        "from tests.support.clinical import enrolment, crs, at\n"
        "async def main():\n"
        "    app = create_app(Settings())\n"
        "    async with app.state.engine.begin() as conn:\n"
        "        token = await create_token(conn, user='n', role='admin', site_id=None)\n"
        "    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url='http://t',\n"
        "                                 headers={'Authorization': 'Bearer ' + token}) as c:\n"
        "        assert (await c.post('/v1/patients', json=enrolment('S01-v1'))).status_code == 201\n"
        "        assert (await c.post('/v1/patients/S01-v1/events', json=crs(at(2), 2))).status_code == 201\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    verified = run(cli_env, "verify")
    assert verified.returncode == 0, verified.stderr
    assert "intact" in verified.stdout

    # An anchor (as a DSMB summary carries it) the chain passes through; one it does not; a typo.
    with sqlite3.connect(store) as db:
        position, digest = db.execute("SELECT position, hash FROM events ORDER BY position DESC").fetchone()
    anchored = run(cli_env, "verify", "--anchor", f"{position}:{digest}")
    assert anchored.returncode == 0 and "anchor" in anchored.stdout, anchored.stderr
    elsewhere = run(cli_env, "verify", "--anchor", f"{position}:{'0' * 64}")
    assert elsewhere.returncode == 1 and f"position {position}" in elsewhere.stderr and "rewritten" in elsewhere.stderr
    assert run(cli_env, "verify", "--anchor", f"{position}-{digest}").returncode == 2

    replayed = run(cli_env, "replay")
    assert replayed.returncode == 0, replayed.stderr
    assert "1 patients" in replayed.stdout

    # Someone edits a stored event behind the store's back.
    with sqlite3.connect(store) as db:
        db.execute("UPDATE events SET data = '{\"grade\": 1}' WHERE type = 'crs'")
        event_id = db.execute("SELECT event_id FROM events WHERE type = 'crs'").fetchone()[0]
    broken = run(cli_env, "verify")
    assert broken.returncode == 1
    assert event_id in broken.stderr


def test_tokens_are_listed_by_id_revoked_by_id_or_user_and_then_refused(cli_env: dict[str, str]) -> None:
    def create(user: str, *extra: str) -> str:
        created = run(cli_env, "token", "create", "--user", user, "--role", "investigator", *extra)
        assert created.returncode == 0, created.stderr
        return created.stdout.strip().splitlines()[-1]

    locum, chen_1, chen_2 = create("locum", "--expires-in", "7"), create("dr.chen"), create("dr.chen")
    ids = {t: hashlib.sha256(t.encode()).hexdigest()[:12] for t in (locum, chen_1, chen_2)}

    # The list names each token by id, with its expiry; never the token nor its whole hash.
    listed = run(cli_env, "token", "list")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split() == ["id", "user", "role", "site", "created", "expires", "revoked"]
    rows = {line.split()[0]: line.split() for line in lines}
    assert set(rows) == set(ids.values())
    assert rows[ids[locum]][5] != "-" and rows[ids[chen_1]][5] == "-"
    assert all(t not in listed.stdout and hashlib.sha256(t.encode()).hexdigest() not in listed.stdout for t in ids)

    # One token by its id, then every token of a user.
    revoked = run(cli_env, "token", "revoke", ids[locum])
    assert revoked.returncode == 0 and f"revoked {ids[locum]}" in revoked.stdout
    by_user = run(cli_env, "token", "revoke", "--user", "dr.chen")
    assert by_user.returncode == 0 and sorted(by_user.stdout.split()[1::2]) == sorted([ids[chen_1], ids[chen_2]])
    assert all(run(cli_env, "token", "list").stdout.count(i) == 1 for i in ids.values())
    assert all(line.split()[6] != "-" for line in run(cli_env, "token", "list").stdout.splitlines()[1:])

    # An unknown id is an error naming it; a malformed one is a usage error.
    unknown = run(cli_env, "token", "revoke", "0" * 12)
    assert unknown.returncode == 1 and "000000000000" in unknown.stderr
    assert run(cli_env, "token", "revoke", "not-an-id").returncode == 2

    # The API (a fresh process: nothing cached) refuses all three.
    async def statuses() -> list[int]:
        app = create_app(Settings(data_dir=Path(cli_env["TRIALWATCH_DATA_DIR"])))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            answers = [await client.get("/v1/alerts", headers={"Authorization": f"Bearer {t}"}) for t in ids]
        await app.state.engine.dispose()
        return [a.status_code for a in answers]

    assert asyncio.run(statuses()) == [401, 401, 401]


def test_a_bad_protocol_file_is_refused_at_start_with_every_problem_named(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bundled = Path(__file__).resolve().parents[2] / "shared" / "protocols" / "blinatumomab_dli.toml"
    text = bundled.read_text().replace('timezone = "Asia/Shanghai"\nmax_age', 'timezone = "Mars/Olympus"\nmax_age')
    text = text.replace("min_mnc_per_kg = 5.0e7", "min_mnc_per_kg = -1")
    bad.write_text(text)
    result = run({**cli_env, "TRIALWATCH_PROTOCOL": str(bad)}, "verify")
    assert result.returncode == 2
    assert "trial.timezone" in result.stderr and "dli.min_mnc_per_kg" in result.stderr


def test_the_three_services_run_as_separate_processes_against_shared_urls(
    cli_env: dict[str, str], tmp_path: Path, database_url: str
) -> None:
    """The docker-compose topology without Docker: one process per service, real NATS, the
    session's database (PostgreSQL in CI's second run) and a real SMTP server."""
    nats = EmbeddedNats(tmp_path / "nats").start()
    smtp_port = free_port()
    mail_dir = tmp_path / "smtp"
    smtp = subprocess.Popen(
        [sys.executable, "-c",
         "import asyncio, sys\n"
         "from services.notify.capture import MailCapture\n"
         "async def main():\n"
         f"    async with MailCapture({str(mail_dir)!r}, port={smtp_port}):\n"
         "        await asyncio.Event().wait()\n"
         "asyncio.run(main())\n"],
        env=cli_env,
    )
    env = {**cli_env, "TRIALWATCH_NATS_URL": nats.url, "TRIALWATCH_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
           "TRIALWATCH_DATABASE_URL": database_url, "TRIALWATCH_STREAM_NAME": f"TWP_{uuid.uuid4().hex[:8]}",
           "TRIALWATCH_SUBJECT_PREFIX": f"twp{uuid.uuid4().hex[:8]}",
           "TRIALWATCH_INVESTIGATOR_EMAILS": "pi@site.test"}
    services = [subprocess.Popen([*TRIALWATCH, name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for name in ("ingest", "safety", "notify")]
    base = f"http://127.0.0.1:{cli_env['TRIALWATCH_HTTP_PORT']}"
    try:
        _wait_ready(base)
        token = run(env, "token", "create", "--user", "nurse", "--role", "site_staff", "--site", "S01")
        headers = {"Authorization": f"Bearer {token.stdout.strip().splitlines()[-1]}"}
        subject = subject_id()
        assert httpx.post(f"{base}/v1/patients", json=enrolment(subject), headers=headers).status_code == 201
        assert httpx.post(f"{base}/v1/patients/{subject}/events", json=crs(at(2), 4),
                          headers=headers).status_code == 201

        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not _mails_about(mail_dir / "mail", subject):
            time.sleep(0.3)
        [mail] = _mails_about(mail_dir / "mail", subject)
        assert "pi@site.test" in str(mail["To"]) and "URGENT" in str(mail["Subject"])
    finally:
        for process in [*services, smtp]:
            process.send_signal(signal.SIGINT)
        for process in [*services, smtp]:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        nats.stop()


def _wait_ready(base: str, process: subprocess.Popen[str] | None = None, log: Path | None = None) -> None:
    """Until /readyz answers 200; fail at once, with its log, if the process died meanwhile."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process is not None and process.poll() is not None:
            raise AssertionError("the process exited:\n" + (log.read_text() if log else ""))
        time.sleep(0.2)
    raise AssertionError("not ready within 60 s:\n" + (log.read_text() if log and log.exists() else ""))


def _mails_about(folder: Path, subject: str) -> list[email.message.EmailMessage]:
    found = []
    for path in sorted(folder.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if subject in str(message["Subject"]):
            found.append(message)
    return found  # type: ignore[return-value]
