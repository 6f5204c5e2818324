"""Static checks the project holds itself to: ruff everywhere, mypy --strict on the domain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "args",
    [
        ["ruff", "check", "."],
        ["mypy", "--strict", "postback_worker/domain"],
        ["mypy", "postback_worker"],
    ],
    ids=["ruff", "mypy-strict-domain", "mypy"],
)
def test_static_checks(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_domain_imports_no_infrastructure() -> None:
    banned = ("celery", "sqlalchemy", "requests", "redis", "urllib3", "kombu")
    for path in (ROOT / "postback_worker" / "domain").glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in banned, f"{path.name}: {line}"


def test_every_setting_is_in_the_example_env() -> None:
    from postback_worker.settings import Settings

    text = (ROOT / "config" / "example.env").read_text()
    missing = [k for k in Settings().to_env() if f"{k}=" not in text]
    assert missing == []
