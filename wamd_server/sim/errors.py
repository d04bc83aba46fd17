"""Errors of the simulated network, each with a stable code and the HTTP status the control API answers."""

from __future__ import annotations


class SimError(Exception):
    code = "sim_error"
    status = 400

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class SimInvalid(SimError):
    code = "invalid_input"
    status = 400


class SimNotFound(SimError):
    code = "not_found"
    status = 404


class SimConflict(SimError):
    """The request is well formed but the network's state refuses it (expired code, too many devices, ...)."""

    code = "conflict"
    status = 409
