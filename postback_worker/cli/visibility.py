"""Commands for metrics, reports, alerts, dashboard."""

from __future__ import annotations
