"""Which site a patient belongs to, and the rule that a site's staff see only their own site."""

from __future__ import annotations

from collections.abc import Sequence

from services.ingest.domain.errors import OtherSite, UnknownPatient
from shared.events import PATIENT_ENROLLED, StoredEvent


def enrolled_site(subject_id: str, history: Sequence[StoredEvent]) -> str:
    """The site of the patient whose stream ``history`` is; an empty stream is an unknown patient."""
    enrolment = next((e for e in history if e.type == PATIENT_ENROLLED), None)
    if enrolment is None:
        raise UnknownPatient(subject_id)
    return str(enrolment.data["site_id"])


def reachable_site(site_scope: str | None, subject_id: str, history: Sequence[StoredEvent]) -> str:
    """The site of an enrolled patient the caller may reach. Another site's patient is answered
    exactly as an unknown one (``UnknownPatient``), so subject ids cannot be probed across sites."""
    site_id = enrolled_site(subject_id, history)
    if not visible(site_scope, site_id):
        raise UnknownPatient(subject_id)
    return site_id


def check_site(site_scope: str | None, site_id: str | None, what: str) -> None:
    """``site_scope`` None reaches every site; a site's staff reach only theirs (enrolling at
    another site is refused as such: the caller named the site, nothing is probed)."""
    if site_scope is not None and site_id != site_scope:
        raise OtherSite(site_scope, what)


def visible(site_scope: str | None, site_id: str | None) -> bool:
    return site_scope is None or site_id == site_scope
