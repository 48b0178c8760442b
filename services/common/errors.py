"""Named errors. Services map them to HTTP status codes; clients raise them back.

Every message says what to fix, because it reaches a user unchanged.
"""

from __future__ import annotations


class OPDError(Exception):
    """Base of every error opd raises on purpose."""

    status_code = 500


class InvalidRequest(OPDError):
    """The request is well-formed JSON but cannot be served as asked (400)."""

    status_code = 400


class NotFound(OPDError):
    status_code = 404


class Conflict(OPDError):
    status_code = 409


class PayloadTooLarge(OPDError):
    """Over a configured size limit (413)."""

    status_code = 413


class InvalidInput(OPDError):
    """Semantically wrong input: out-of-vocabulary ids, too long for the model (422)."""

    status_code = 422


class Overloaded(OPDError):
    """Too many requests pending (503, with Retry-After)."""

    status_code = 503


class NotReady(OPDError):
    status_code = 503


class ClientGone(OPDError):
    """The client closed the connection before the answer; its work was cancelled (499, seen only in logs)."""

    status_code = 499


class ServiceError(OPDError):
    """A service answered with an error; raised by the clients."""

    def __init__(self, status_code: int, message: str, url: str = "") -> None:
        super().__init__(f"{url}: HTTP {status_code}: {message}" if url else f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message


class ServiceUnavailable(ServiceError):
    """The service could not be reached, or kept answering 503, after all retries."""


class TokenizerMismatch(OPDError):
    status_code = 409
