"""Commands for dead letters, replay, re-attribution, partner health, support bundles."""

from __future__ import annotations
