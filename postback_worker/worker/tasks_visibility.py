"""Celery tasks and beat entries for alert evaluation, metrics snapshots."""

from __future__ import annotations

from typing import Any

from celery import Celery

from postback_worker.settings import Settings


def register(app: Celery) -> None:
    """Register this module's tasks on `app`."""


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat entries (name -> entry) for this module's periodic tasks."""
    return {}
