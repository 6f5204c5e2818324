"""The local stack's state file: how the CLI in another terminal finds what `up` runs.

`postback-worker up` writes `<data dir>/stack.json` (mode 0600: it holds the admin token) with
the database URL, the Redis URL and the admin token of the stack it runs. A command run without
DATABASE_URL in its environment looks for `.postback-worker/stack.json` in the current
directory and its parents and takes the settings it does not have from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

DATA_DIR = ".postback-worker"
FILE_NAME = "stack.json"


@dataclass(frozen=True)
class StackState:
    database_url: str
    redis_url: str
    admin_token: str
    api_url: str
    allow_networks: str = ""
    demo_partner_url: str = ""

    def env(self) -> dict[str, str]:
        """The environment variables these settings stand for."""
        out = {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
               "POSTBACK_ADMIN_TOKEN": self.admin_token}
        if self.allow_networks:
            out["POSTBACK_ALLOW_NETWORKS"] = self.allow_networks
        return out

    def write(self, data_dir: Path) -> Path:
        """Write the file readable by its owner only (created 0600, never wider)."""
        path = Path(data_dir) / FILE_NAME
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(self), out, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return path


def find(start: Path | None = None) -> Path | None:
    """`.postback-worker/stack.json` in `start` (default: the current directory) or a parent."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / DATA_DIR / FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def read(path: Path) -> StackState:
    data = json.loads(path.read_text())
    known = StackState.__dataclass_fields__
    return StackState(**{k: str(v) for k, v in data.items() if k in known})


def local_env(environ: Mapping[str, str], start: Path | None = None) -> dict[str, str]:
    """`environ`, completed from the local stack's file when it sets no DATABASE_URL."""
    if "DATABASE_URL" in environ:
        return dict(environ)
    path = find(start)
    if path is None:
        return dict(environ)
    try:
        state = read(path)
    except (OSError, ValueError, TypeError):
        return dict(environ)
    return {**state.env(), **environ}


def local_api_url(environ: Mapping[str, str], start: Path | None = None) -> str | None:
    """The local stack's API URL, when commands use that stack (no DATABASE_URL)."""
    if "DATABASE_URL" in environ:
        return None
    path = find(start)
    try:
        return read(path).api_url if path else None
    except (OSError, ValueError, TypeError):
        return None
