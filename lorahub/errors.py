"""User-facing errors.

Every error a user can cause by bad input is a :class:`LorahubError`. The CLI prints its message on
one line and exits with ``exit_code`` (2 by default) — never a traceback.
"""

from __future__ import annotations


class LorahubError(Exception):
    """An error caused by input or environment, reported to the user as one line."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class NotFound(LorahubError):
    """A reference (id, name, hash prefix, path) that resolves to nothing."""


class Ambiguous(LorahubError):
    """A reference that matches more than one entry."""


class OutputExists(LorahubError):
    """An output path that already exists (workflows overwrite only when asked to, with ``force``)."""

    def __init__(self, path, message: str | None = None):
        super().__init__(message or f"{path}: already exists (choose another output, or overwrite it with force)")
        self.path = path


class FormatError(LorahubError):
    """A file that is not a readable LoRA/embedding/checkpoint, or is malformed/hostile."""


class UnsafeFile(FormatError):
    """A file we refuse to load because loading it could execute code (pickles)."""
