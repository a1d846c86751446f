"""Errors a request can end with, carrying the HTTP status and the field to name."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the front end refuses or cannot finish; `status` is the HTTP status to answer with.

    A ValueError, so the in-process Engine raises what its callers expect for a bad input.
    """

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


class WorkerUnavailable(RequestError):
    def __init__(self, message: str = "the worker process is not running; retry shortly") -> None:
        super().__init__(message, status=503)
