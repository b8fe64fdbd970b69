"""Where workflows write: default output names and the no-overwrite rule. Standard library only.

* A default output name is made from an entry name or a file stem with
  :func:`lorahub.vocab.safe_filename`: never a raw entry name in a path.
* An existing output is overwritten only when the caller passes ``force``; an output that is one of
  the inputs is refused even then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lorahub.errors import LorahubError, OutputExists
from lorahub.vocab import safe_filename


@dataclass(kw_only=True)
class Written:
    """Where a workflow wrote its result (``out``, in ``dialect`` for a LoRA) and the registry entry it
    made (``entry``; ``created`` False when the file was registered already). Base of the results."""

    out: Path | None = None
    dialect: str | None = None
    entry: dict | None = None
    created: bool = False

    def registered(self) -> dict | None:
        """``{"id", "name", "created"}`` of the registry entry, None when not registered."""
        if self.entry is None:
            return None
        return {"id": self.entry["id"], "name": self.entry["name"], "created": self.created}


def default_output(stem: str, suffix: str, folder: str | os.PathLike | None = None) -> Path:
    """``<folder>/<safe stem><suffix>`` (a relative path when ``folder`` is None)."""
    name = safe_filename(stem) + suffix
    return Path(folder) / name if folder is not None else Path(name)


def check_output(path: str | os.PathLike, *, force: bool = False, inputs=(), suffixes: tuple[str, ...] = (),
                 folder: bool | None = False) -> Path:
    """Check that ``path`` may be written; returns it (``~`` expanded).

    ``suffixes``: the allowed file suffixes (lower case), if any. ``folder``: False when the output is
    a file, True when it is a folder, None when either. ``inputs``: paths the output must not be.
    """
    p = Path(path).expanduser()
    if suffixes and p.suffix.lower() not in suffixes:
        raise LorahubError(f"{p}: the output must be a {' or '.join(suffixes)} file")
    if not p.exists():
        return p
    if any(Path(i).exists() and p.resolve() == Path(i).resolve() for i in inputs):
        raise LorahubError(f"{p}: is an input of this operation; choose another output")
    if folder is False and p.is_dir():
        raise LorahubError(f"{p}: is a folder")
    if folder is True and not p.is_dir():
        raise LorahubError(f"{p}: is a file, not a folder")
    if not force:
        raise OutputExists(p)
    return p
