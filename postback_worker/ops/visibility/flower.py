"""How Flower is started: always behind authentication, except development on loopback.

Credentials travel to Flower in its own environment variables (FLOWER_BASIC_AUTH,
FLOWER_AUTH, FLOWER_OAUTH2_*), never on the command line where `ps` would show them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from postback_worker.errors import InvalidInput
from postback_worker.settings import Settings

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class FlowerConfigError(InvalidInput):
    """Flower would run without authentication, or its auth settings are incomplete."""


def flower_command(settings: Settings, env: Mapping[str, str], *, address: str, port: int,
                   dev: bool, extra: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """argv for `celery flower` and the environment variables to add."""
    add: dict[str, str] = {}
    basic = ",".join(settings.flower.basic_auth) or env.get("FLOWER_BASIC_AUTH", "")
    for pair in filter(None, basic.split(",")):
        user, sep, password = pair.partition(":")
        if not (user and sep and password):
            raise FlowerConfigError("POSTBACK_FLOWER_BASIC_AUTH must be user:password pairs, "
                                    "comma-separated")
    oauth = settings.flower.auth or env.get("FLOWER_AUTH", "")
    if basic:
        add["FLOWER_BASIC_AUTH"] = basic
    if oauth:
        provider = settings.flower.auth_provider or env.get("FLOWER_AUTH_PROVIDER", "")
        missing = [name for name, value in (
            ("POSTBACK_FLOWER_AUTH_PROVIDER", provider),
            ("POSTBACK_FLOWER_OAUTH2_KEY",
             settings.flower.oauth2_key or env.get("FLOWER_OAUTH2_KEY", "")),
            ("POSTBACK_FLOWER_OAUTH2_SECRET",
             settings.flower.oauth2_secret or env.get("FLOWER_OAUTH2_SECRET", "")),
            ("POSTBACK_FLOWER_OAUTH2_REDIRECT_URI",
             settings.flower.oauth2_redirect_uri or env.get("FLOWER_OAUTH2_REDIRECT_URI", "")),
        ) if not value]
        if missing:
            raise FlowerConfigError("Flower OAuth needs " + ", ".join(missing))
        add["FLOWER_AUTH"] = oauth
        add["FLOWER_AUTH_PROVIDER"] = provider
        for name in ("oauth2_key", "oauth2_secret", "oauth2_redirect_uri"):
            value = getattr(settings.flower, name)
            if value:
                add[f"FLOWER_{name.upper()}"] = value
    if not (basic or oauth):
        if not dev:
            raise FlowerConfigError(
                "Flower needs authentication: set POSTBACK_FLOWER_BASIC_AUTH=user:password "
                "(or OAuth: POSTBACK_FLOWER_AUTH and POSTBACK_FLOWER_AUTH_PROVIDER with "
                "POSTBACK_FLOWER_OAUTH2_*); only --dev may run it open, on 127.0.0.1")
        if address not in LOOPBACK:
            raise FlowerConfigError(
                f"--dev without authentication listens on loopback only, not {address}")
        # Flower 2 closes its HTTP API without auth unless told otherwise; loopback dev only.
        add["FLOWER_UNAUTHENTICATED_API"] = "true"
    argv = [sys.executable, "-m", "celery", "-A", "postback_worker.worker.app", "flower",
            f"--address={address}", f"--port={port}", *extra]
    return argv, add
