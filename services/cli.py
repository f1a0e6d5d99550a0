"""The ``trialwatch`` command (CONTRACT.md section 1).

``up`` runs everything on one machine; ``ingest``, ``safety``, ``notify`` run one service each;
the rest are operator tools that work whether or not the system is running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import typer

from services.boundaries_cmd import boundaries
from shared.protocol import ProtocolError, load_protocol
from shared.settings import Settings

app = typer.Typer(help="TrialWatch: safety monitoring for the blinatumomab + DLI trial.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
digest_app = typer.Typer(help="The DSMB summary.", no_args_is_help=True)
dead_app = typer.Typer(help="Messages a consumer gave up on.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(digest_app, name="digest")
app.add_typer(dead_app, name="dead-letters")
app.command("boundaries", help="Print a stopping boundary and its operating characteristics.")(boundaries)


def _settings() -> Settings:
    settings = Settings()
    try:
        load_protocol(settings.protocol)
    except ProtocolError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    return settings


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stopped_by_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _serve(service: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived command; SIGTERM (docker stop, systemd, ``Popen.terminate``) stops it the
    way Ctrl-C does, through every ``finally``, rather than killing it on the spot (uvicorn
    re-raises the signal after its own shutdown, which would skip stopping the embedded broker)."""
    signal.signal(signal.SIGTERM, _stopped_by_sigterm)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(service)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (not on Windows): a service started by ``asyncio.run``
    gets the standard loop whatever uvicorn's own ``loop="auto"`` says, and the standard loop's
    scheduling and socket writes were a tenth of the ingest's time under load."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


MIGRATE = typer.Option(True, "--migrate/--no-migrate",
                       help="Bring the schema to head first (`up` does it once for its children).")


@app.command()
def up() -> None:
    """Run the whole system here: embedded NATS, SQLite, SMTP capture and the three services, each
    in a child process."""
    from services.runner import run_all

    _logging()
    _serve(run_all(_settings()))


@app.command()
def ingest(migrate: bool = MIGRATE) -> None:
    """Run the HTTP API (needs TRIALWATCH_NATS_URL and a database)."""
    from services.runner import run_ingest

    _logging()
    _serve(run_ingest(_settings(), migrate=migrate))


@app.command()
def safety(migrate: bool = MIGRATE) -> None:
    """Run the safety service."""
    from services.runner import run_safety

    _logging()
    _serve(run_safety(_settings(), migrate=migrate))


@app.command()
def notify(migrate: bool = MIGRATE) -> None:
    """Run the notifier (alert mails and the DSMB summary)."""
    from services.runner import run_notify

    _logging()
    _serve(run_notify(_settings(), migrate=migrate))


@token_app.command("create")
def token_create(
    user: str = typer.Option(..., "--user"),
    role: str = typer.Option(..., "--role", help="site_staff | investigator | dsmb | admin"),
    site: str | None = typer.Option(None, "--site"),
    expires_in: float | None = typer.Option(None, "--expires-in", metavar="DAYS",
                                            help="refused after this many days (default: never)"),
) -> None:
    """Create an API token; it is printed once, alone on the last line."""
    from services.ingest.tokens_cmd import create_token_cli

    try:
        token = asyncio.run(create_token_cli(_settings(), user, role, site, expires_in))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    lasts = f"; expires in {expires_in:g} days" if expires_in is not None else ""
    typer.echo(f"token for {user} ({role}{', site ' + site if site else ''}{lasts}); shown once, store it now:")
    typer.echo(token)


@token_app.command("list")
def token_list() -> None:
    """Every token by its public id (never the token): user, role, site, created, expires, revoked."""
    from services.ingest.tokens_cmd import list_tokens_cli

    columns = ("id", "user", "role", "site", "created", "expires", "revoked")
    rows = [[_cell(t[c]) for c in columns] for t in asyncio.run(list_tokens_cli(_settings()))]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    for line in [list(columns), *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else str(value)


@token_app.command("revoke")
def token_revoke(
    token_id: str | None = typer.Argument(None, metavar="[ID]", help="a token's id from `token list`"),
    user: str | None = typer.Option(None, "--user", help="revoke every token of this user"),
) -> None:
    """Revoke one token, or every token of a user; refused everywhere within 5 seconds."""
    from services.ingest.tokens_cmd import revoke_tokens_cli

    try:
        revoked, matching = asyncio.run(revoke_tokens_cli(_settings(), public_id=token_id, user=user))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if matching == 0:
        typer.echo(f"error: no token {'of user ' + repr(user) if user is not None else repr(token_id)}", err=True)
        raise typer.Exit(1)
    for public_id in revoked:
        typer.echo(f"revoked {public_id}")
    if len(revoked) < matching:
        typer.echo(f"{matching - len(revoked)} already revoked")


@app.command()
def replay() -> None:
    """Rebuild every projection from the event store."""
    from services.runner import replay_projections

    _logging()
    if not sys.stdout.isatty():
        count = asyncio.run(replay_projections(_settings()))
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("replaying patients", total=None)
            count = asyncio.run(replay_projections(
                _settings(), progress=lambda done, total: bar.update(task, completed=done, total=total)))
    typer.echo(f"rebuilt the projections of {count} patients and the stopping rules")


@app.command()
def verify(
    anchor: str | None = typer.Option(
        None, "--anchor", metavar="POSITION:HASH",
        help="an audit anchor kept outside the database (a DSMB summary's): the chain must pass through it"),
) -> None:
    """Check the audit hash chain; exits 1 naming the first bad event."""
    from services.runner import verify_chain

    checked, bad, why = asyncio.run(verify_chain(_settings(), anchor=_anchor(anchor) if anchor else None))
    if bad is not None:
        typer.echo(
            f"BROKEN at position {bad.position}: event {bad.event_id} ({bad.type}, stream {bad.stream_id}): {why}",
            err=True,
        )
        raise typer.Exit(1)
    if why:
        typer.echo(f"BROKEN after {checked} events: {why}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {checked} events, hash chain intact" + (f", passes through the anchor {anchor}" if anchor else ""))


def _anchor(text: str) -> tuple[int, str]:
    position, _, digest = text.strip().partition(":")
    if not position.isdigit() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
        typer.echo(f"error: --anchor {text!r} is not POSITION:HASH (a whole number, a colon, 64 hex digits)", err=True)
        raise typer.Exit(2)
    return int(position), digest.lower()


@app.command("import")
def import_(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="NDJSON: one enrolment or event a line"),
    url: str | None = typer.Option(None, "--url", help="the ingest API (default: http://TRIALWATCH_HTTP_HOST:TRIALWATCH_HTTP_PORT)"),
    token: str | None = typer.Option(None, "--token", envvar="TRIALWATCH_TOKEN", show_envvar=True,
                                     help="an API token of a role that records events"),
) -> None:
    """Send a file through the bulk import; print the accepted count and each rejected line.

    Exit status: 0 every line stored, 1 some lines rejected (the rest stored), 2 the import failed."""
    from services.ingest.import_cmd import ImportFailed, describe_rejection, import_file

    if not token:
        typer.echo("error: give a token with --token or TRIALWATCH_TOKEN", err=True)
        raise typer.Exit(2)
    settings = Settings()
    base = url or f"http://{settings.http_host}:{settings.http_port}"
    lines = sum(1 for line in file.read_bytes().split(b"\n") if line.strip())
    try:
        if sys.stdout.isatty():
            with typer.progressbar(length=lines, label=f"importing {file.name}") as bar:
                result = import_file(file, url=base, token=token, progress=bar.update)
        else:
            result = import_file(file, url=base, token=token)
    except ImportFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"accepted {result.accepted} of {result.lines} lines")
    for rejection in result.rejected:
        typer.echo(describe_rejection(rejection))
    if result.rejected:
        typer.echo(f"rejected {len(result.rejected)} lines", err=True)
        raise typer.Exit(1)


@digest_app.command("send")
def digest_send() -> None:
    """Send the DSMB summary now."""
    from services.notify.digests import DigestNotSentError
    from services.runner import send_digest_now

    _logging()
    try:
        result = asyncio.run(send_digest_now(_settings()))
    except DigestNotSentError as exc:
        typer.echo(f"the DSMB summary was not sent ({exc}); nothing is queued: run this again once "
                   "the SMTP server takes mail", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(result))


@dead_app.command("list")
def dead_letters_list() -> None:
    """List dead-lettered messages."""
    from services.runner import list_dead_letters

    for row in asyncio.run(list_dead_letters(_settings())):
        typer.echo(json.dumps(row, default=str))


@dead_app.command("replay")
def dead_letters_replay(dead_letter_id: int = typer.Argument(...)) -> None:
    """Publish a dead-lettered message again (its consumer skips it if it already took effect)."""
    from services.runner import replay_dead_letter

    asyncio.run(replay_dead_letter(_settings(), dead_letter_id))
    typer.echo(f"replayed dead letter {dead_letter_id}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
