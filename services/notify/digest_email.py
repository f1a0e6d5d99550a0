"""The DSMB digest as a MIME message: pure rendering, no sending (STYLE: Notify, rendering).

Layout (CONTRACT §3)::

    multipart/mixed
      multipart/alternative
        text/plain            every figure as a table, readable with no images
        multipart/related
          text/html           the same tables, charts referenced as cid:...
          image/png ...       one per chart
      application/json        summary.json = json.dumps(summary.to_json())

The message carries aggregates and subject ids only (the deaths listing); ``PatientOutcome`` holds
no names or birth dates, so none can leak here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from services.notify.charts import Chart, summary_charts
from services.notify.labels import ENDPOINT_LABELS, INCIDENCE_LABELS, arm_label
from services.notify.mailer import MAIL_POLICY
from services.notify.summary import Summary

SUBJECT = "[TrialWatch] DSMB safety summary — data as of {cutoff:%Y-%m-%d}"


def render_digest(
    summary: Summary, *, mail_from: str, recipients: Sequence[str], message_id: str
) -> EmailMessage:
    charts = summary_charts(summary)
    cids = {chart.key: _content_id(chart.key, message_id) for chart in charts}
    context = {"s": summary, "charts": {c.key: c for c in charts}, "cids": cids}

    msg = EmailMessage(policy=MAIL_POLICY)
    msg["Subject"] = SUBJECT.format(cutoff=summary.data_cutoff)
    msg["From"] = mail_from
    msg["To"] = ", ".join(recipients)
    msg["Message-ID"] = message_id
    msg["Date"] = format_datetime(summary.generated_at)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(_templates.get_template("digest.txt.j2").render(context))
    msg.add_alternative(_templates.get_template("digest.html.j2").render(context), subtype="html")
    _attach_charts(msg, charts, cids)
    document = json.dumps(summary.to_json(), allow_nan=False).encode()
    msg.add_attachment(document, maintype="application", subtype="json", filename="summary.json")
    return msg


def _attach_charts(msg: EmailMessage, charts: Sequence[Chart], cids: dict[str, str]) -> None:
    html = msg.get_body(preferencelist=("html",))
    assert isinstance(html, EmailMessage)
    for chart in charts:
        html.add_related(chart.png, maintype="image", subtype="png", cid=f"<{cids[chart.key]}>",
                         disposition="inline", filename=f"{chart.key}.png")


def _content_id(key: str, message_id: str) -> str:
    """A Content-ID unique to this message and chart, without the angle brackets."""
    local, at, domain = message_id.strip().strip("<>").rpartition("@")
    if not at:
        local, domain = domain, "trialwatch.invalid"
    return f"{key}.{local}@{domain}"


# --- template filters: None is shown as an em dash, proportions as percentages -------------------


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _ci(low: float | None, high: float | None) -> str:
    return "—" if low is None or high is None else f"{100 * low:.1f}–{100 * high:.1f}%"


def _number(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _days(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _p_value(value: float | None) -> str:
    if value is None:
        return "—"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _moment(value: datetime) -> str:
    return f"{value:%Y-%m-%d %H:%M} {value.tzname() or ''}".rstrip()


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("services.notify", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(pct=_pct, ci=_ci, number=_number, days=_days, p_value=_p_value, moment=_moment,
                       arm=arm_label, incidence=lambda n: INCIDENCE_LABELS.get(n, n),
                       endpoint=lambda e: ENDPOINT_LABELS.get(e, e))
    return env


_templates = _environment()
