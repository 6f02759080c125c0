"""The project's own exception tree.

Errors from httpx, botocore and redis are translated into these where they enter,
so callers decide on retry or failure by type, never by a third-party class.
"""

from __future__ import annotations


class SeedreamError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(SeedreamError):
    """A setting is missing or malformed."""


class ManifestError(SeedreamError):
    """A manifest could not be read or holds invalid rows."""


class StorageError(SeedreamError):
    """The output store (S3 or a folder) refused or failed an operation."""


class StateError(SeedreamError):
    """Redis, where coordination state lives, failed or is unreachable."""


class ServiceError(SeedreamError):
    """Atlas Cloud answered with an error, or did not answer."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class AuthError(ServiceError):
    """The API key is missing, wrong, expired or lacks access: stop, retrying cannot help."""


class AgentRefused(AuthError):
    """The service's CDN refused this client's User-Agent (Cloudflare 1010): no request gets through."""


class PaymentRequired(ServiceError):
    """The account's balance cannot pay for more predictions: stop all submits."""


class BadRequest(ServiceError):
    """The service rejected the parameters; the job fails with the service's message."""


class NotFound(BadRequest):
    """The prediction or file does not exist (or no longer does)."""


class RateLimited(ServiceError):
    """HTTP 429: wait `retry_after` seconds (when the service said) and try again."""

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = 429) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class TransientError(ServiceError):
    """A 5xx without a final verdict, a timeout or a connection error: safe to retry a read."""


class InvalidResponse(TransientError):
    """The service answered something this client cannot read."""


class OutcomeUnknown(ServiceError):
    """A submit whose answer was lost: the prediction may exist and be billed; never resubmit."""


class PredictionFailed(ServiceError):
    """The prediction reached a final failure status; carries the service's message."""

    def __init__(
        self,
        message: str,
        *,
        prediction_id: str | None = None,
        final_status: str = "failed",
        error_code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.prediction_id = prediction_id
        self.final_status = final_status
        self.error_code = error_code


class NotifyError(SeedreamError):
    """The run's webhook did not take the summary (it is tried again; the run is not affected)."""


class BadOutput(ServiceError):
    """An output could not be taken: too large, not an image, or at a refused address."""


def is_transient(exc: BaseException) -> bool:
    """The retry predicate for reads (polls, downloads, uploads): only waiting can help."""
    return isinstance(exc, RateLimited | TransientError)
