"""The web pages for people (CONTRACT.md section 5), served by the ingest service beside the API.

Server-rendered jinja2, no JavaScript needed; every write goes through the API's use cases.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from services.ingest.web import event_entry, patient_list, patient_page, review, signin
from services.ingest.web.pages import HERE, PageRefused, SignInNeeded, on_refused, on_sign_in_needed


def install(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(PageRefused, on_refused)
    app.add_exception_handler(SignInNeeded, on_sign_in_needed)
    for module in (signin, patient_list, patient_page, event_entry, review):
        app.include_router(module.router)
