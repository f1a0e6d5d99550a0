"""Named errors of the ingest use cases; the HTTP entrypoint maps each to a status code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldProblem:
    """One bad field, named by its dotted path from the body root (``eligibility.severe_infection``)."""

    path: str
    message: str


class Invalid(ValueError):
    """The request is well-formed but breaks a rule; ``problems`` names every bad field."""

    def __init__(self, problems: Sequence[FieldProblem], detail: str = "the request breaks a rule") -> None:
        self.problems = tuple(problems)
        super().__init__(detail)


class UnknownPatient(LookupError):
    def __init__(self, subject_id: str) -> None:
        super().__init__(f"no patient {subject_id} is enrolled")


class PatientExists(Exception):
    def __init__(self, subject_id: str) -> None:
        super().__init__(f"patient {subject_id} is already enrolled")


class OtherSite(PermissionError):
    """A site's staff act only on their own site's patients."""

    def __init__(self, site_id: str, subject_or_site: str) -> None:
        super().__init__(f"your token is for site {site_id}; {subject_or_site} is not")


class VersionMismatch(Exception):
    def __init__(self, subject_id: str, expected: int, actual: int) -> None:
        self.expected, self.actual = expected, actual
        super().__init__(f"patient {subject_id} is at stream_version {actual}, not {expected} (If-Match); "
                         "nothing was stored")


class UnknownAlert(LookupError):
    def __init__(self, alert_id: object) -> None:
        super().__init__(f"no alert {alert_id}")


class UnevaluableRecord(Exception):
    """The patient's stored record cannot be evaluated (the clinical fold raises on it: an entry
    that slipped past ingest's checks). Its history can still be read, and a correction or
    retraction of the entry brings the patient back; ``set_aside`` is the safety service's record
    of the same failure, if it has met it (when, how often)."""

    def __init__(self, subject_id: str, error: str, set_aside: str | None = None) -> None:
        self.subject_id, self.error, self.set_aside = subject_id, error, set_aside
        super().__init__(f"the record of patient {subject_id} cannot be evaluated ({error}); "
                         + (f"{set_aside}; " if set_aside else "")
                         + f"its history is at /v1/patients/{subject_id}/events, and a correction or "
                         "retraction of the entry at fault brings the patient back")
