"""The one error type of the serving engine: what a client asked for that cannot be done.

``status`` is the HTTP status a server should answer with (the engine itself knows nothing of HTTP),
``param`` the request field at fault, for OpenAI-style error bodies.
"""

from __future__ import annotations


class ServeError(ValueError):
    """A request the engine refuses (bad input, unknown or unloadable adapter, overload)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param
