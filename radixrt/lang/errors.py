"""The exceptions a program can raise, each naming what went wrong."""

from __future__ import annotations


class ProgramError(RuntimeError):
    """A program failed; its state keeps the text up to the failure and `error()` returns the cause."""


class VariableNotFoundError(KeyError):
    """`s["name"]` for a name the program never set."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


class BackendError(RuntimeError):
    """The backend refused a request or could not be reached."""
