"""Commands for template validation, test-fire, audit, API keys."""

from __future__ import annotations
