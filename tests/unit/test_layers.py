"""The layering the design asks for, checked on the source: a broken rule names its import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "safety", "notify")
FRAMEWORKS = ("fastapi", "faststream", "nats", "sqlalchemy", "aiosmtplib", "jinja2", "apscheduler", "httpx")


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def offending(folder: Path, banned: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted(folder.rglob("*.py"))
        for name in sorted(imports(path))
        if any(name == b or name.startswith(b + ".") for b in banned)
    ]


def test_services_never_import_each_other() -> None:
    for service in SERVICES:
        others = tuple(f"services.{other}" for other in SERVICES if other != service)
        assert offending(ROOT / "services" / service, others) == []


def test_shared_never_imports_the_services() -> None:
    assert offending(ROOT / "shared", ("services",)) == []


def test_clinical_rules_and_domain_code_import_no_framework() -> None:
    assert offending(ROOT / "shared" / "clinical", FRAMEWORKS) == []
    assert offending(ROOT / "services" / "safety" / "domain", FRAMEWORKS) == []
    assert offending(ROOT / "services" / "ingest" / "domain", FRAMEWORKS) == []
