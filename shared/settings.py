"""Settings read from the environment (prefix ``TRIALWATCH_``) or a ``.env`` file.

Only composition roots (``services/*/app.py``, the CLI) and tests read these; handlers receive
plain values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_emails(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """The contract's settings table (CONTRACT.md section 1), plus a few operator knobs."""

    model_config = SettingsConfigDict(env_prefix="TRIALWATCH_", env_file=".env", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    nats_url: str | None = None
    smtp_url: str | None = None
    mail_from: str = "trialwatch@localhost"
    investigator_emails: Annotated[list[str] | None, NoDecode] = None
    dsmb_emails: Annotated[list[str] | None, NoDecode] = None
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    protocol: Path | None = None

    # Operator knobs beyond the contract.
    stream_name: str = "TRIALWATCH"
    subject_prefix: str = "trialwatch"
    stream_replicas: int = 1
    public_base_url: str | None = None
    relay_interval_s: float = 0.2
    # One log line per HTTP request (uvicorn's access log). Off by default: under load the lines
    # took 3% of the API's CPU; /metrics counts requests by route and status.
    access_log: bool = False
    max_deliver: int = 5
    # How long the broker waits for a consumer's ack before it hands the message to another
    # (a worker killed mid-batch): its messages come back after this.
    ack_wait_s: float = 60.0
    # How long a notifier holds a mail it is sending before another may send it (a notifier killed
    # mid-send): a held mail goes out after this.
    mail_lease_s: float = 120.0

    @field_validator("investigator_emails", "dsmb_emails", mode="before")
    @classmethod
    def _emails(cls, value: object) -> object:
        return _split_emails(value)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'trialwatch.db').resolve()}"

    @property
    def api_base_url(self) -> str:
        return self.public_base_url or f"http://{self.http_host}:{self.http_port}"
