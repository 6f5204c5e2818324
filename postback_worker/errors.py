"""One exception tree. The API maps it in one handler and the CLI in one place.

| kind          | HTTP | CLI exit code | meaning                                              |
|---------------|------|---------------|------------------------------------------------------|
| InvalidInput  | 422  | 2             | bad input: a field, an option, a template, a setting |
| Unauthorized  | 401  | 2             | no credential, or an unknown or revoked one          |
| Forbidden     | 403  | 2             | the credential lacks the scope                       |
| NotFound      | 404  | 3             | no such offer, partner, conversion, postback, key    |
| Conflict      | 409  | 4             | the request clashes with the current state           |
| Unavailable   | 503  | 5             | PostgreSQL or Redis cannot be reached, or the schema |
|               |      |               | is not migrated; nothing was changed                 |
| (any other)   | 500  | 1             | a bug: reported with a one-line message              |

Exit code 1 is also what a check that ran and found problems returns (`audit`, a failed
test fire); 0 is success.
"""

from __future__ import annotations

from typing import Any


class PostbackWorkerError(Exception):
    """Root of every error this project raises on purpose."""

    http_status = 500
    exit_code = 1

    def __init__(self, message: str, *, errors: list[Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Field errors (objects with to_dict(), e.g. domain.events.FieldError), if any.
        self.errors = list(errors) if errors else []
        self.headers = headers


class InvalidInput(PostbackWorkerError, ValueError):
    http_status = 422
    exit_code = 2


class Unauthorized(PostbackWorkerError):
    http_status = 401
    exit_code = 2


class Forbidden(PostbackWorkerError):
    http_status = 403
    exit_code = 2


class NotFound(PostbackWorkerError, LookupError):
    http_status = 404
    exit_code = 3


class Conflict(PostbackWorkerError):
    http_status = 409
    exit_code = 4


class Unavailable(PostbackWorkerError):
    http_status = 503
    exit_code = 5


class UnknownPartner(NotFound):
    def __init__(self, partner_id: str) -> None:
        super().__init__(f"no partner {partner_id!r}")
        self.partner_id = partner_id


class UnknownOffer(NotFound):
    def __init__(self, offer_id: str) -> None:
        super().__init__(f"no offer {offer_id!r}")
        self.offer_id = offer_id
