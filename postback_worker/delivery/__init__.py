"""Outbound HTTP delivery: `Sender` turns a `PostbackRequest` into an `Outcome`."""

from postback_worker.delivery.guard import check_address, resolve_and_check
from postback_worker.delivery.sender import PostbackRequest, Sender

__all__ = ["PostbackRequest", "Sender", "check_address", "resolve_and_check"]
