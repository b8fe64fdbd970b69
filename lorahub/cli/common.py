"""Options and output helpers shared by every command module (kept light: typer + rich only).

Printing is safe for hostile data by construction: :func:`console` gives a rich console with markup,
emoji codes and highlighting off that also escapes control characters (ANSI escape sequences, OSC 8
hyperlinks, bidi overrides, undecodable file-name bytes) in every string it renders, so names and
metadata print as the text they are. lorahub's own styling uses ``style=`` or :class:`rich.text.Text`
(:func:`styled`), never markup. :func:`print_json` escapes the same characters as JSON ``\\u`` escapes.

Numbers are checked centrally too: :func:`check_numbers` makes every parameter of every command refuse
NaN and infinities and integers outside SQLite's 64-bit range (``lorahub.cli.app.main`` applies it).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lorahub.vocab import INT_LIMIT

HomeOpt = Annotated[
    Optional[Path],
    typer.Option("--home", envvar="LORAHUB_HOME", show_envvar=True,
                 help="Registry home (default ~/.lorahub)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


# C0 controls but tab and newline, DEL, C1 controls (CSI 0x9b, OSC 0x9d …), bidi overrides and marks,
# and surrogates (undecodable bytes of a file name, or JSON "\\ud800" escapes)
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _visible(m: re.Match) -> str:
    o = ord(m.group())
    if 0xDC80 <= o <= 0xDCFF:  # a byte of a file name that is not UTF-8 (surrogate escape)
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def safe_text(text: str) -> str:
    """``text`` with every character that could control a terminal shown as an escape (``\\x1b``)."""
    return _UNSAFE.sub(_visible, text)


def styled(*parts):
    """A line of styled text without markup: each part is plain text or a ``(text, style)`` pair,
    e.g. ``styled(("lineage", "bold"), f" {name}")``; every part is escaped with :func:`safe_text`."""
    from rich.text import Text

    out = Text()
    for part in parts:
        text, style = part if isinstance(part, tuple) else (part, "")
        out.append(safe_text(str(text)), style=style)
    return out


_SAFE_CONSOLE: list = []  # the SafeConsole class, built on first use (rich is imported lazily)


def console(stderr: bool = False):
    """A rich console that prints strings as plain text: no markup, no emoji codes, no highlighting,
    control characters escaped (also in table cells, titles and tree labels, which render through it)."""
    if not _SAFE_CONSOLE:
        from rich.console import Console

        class SafeConsole(Console):
            def render_str(self, text: str, **kwargs):
                kwargs["markup"] = False
                kwargs["emoji"] = False
                return super().render_str(safe_text(text), **kwargs)

        _SAFE_CONSOLE.append(SafeConsole)
    return _SAFE_CONSOLE[0](stderr=stderr, highlight=False, soft_wrap=True, markup=False, emoji=False)


def print_json(obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str, ensure_ascii=False)
    # json escapes C0 controls itself; DEL, C1 controls, bidi overrides and surrogates become \\u escapes
    sys.stdout.write(_JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")


def _cell_width(text: str) -> int:
    """Terminal cells ``text`` takes (wide East Asian characters take two, combining marks none)."""
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells, with '…' where it was cut."""
    if _cell_width(text) <= width:
        return text
    out, used = [], 0
    for c in text:
        w = _cell_width(c)
        if used + w > width - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…"


def print_rows(headers: list[str], rows: list[list[str]]) -> None:
    """A table of plain text on stdout, without rich (``list`` and ``search`` print hundreds of rows: a
    rich table costs about 1 ms a row). On a terminal: aligned columns with a bold header, fitted to
    its width (the widest columns are cut, with '…'). Anywhere else (a pipe, a file), like ``ls``: one
    line per row, fields separated by tabs, a header line first, nothing cut -- for ``cut``/``awk``.
    Every value is escaped with :func:`safe_text` (and tabs/newlines inside a value become spaces)."""
    import os
    import shutil

    def clean(v) -> str:
        return safe_text(" ".join(str(v).replace("\t", " ").splitlines()))

    body = [[clean(v) for v in row] for row in rows]
    out = sys.stdout
    if not out.isatty():
        out.write("\t".join(headers) + "\n")
        out.write("".join("\t".join(r) + "\n" for r in body))
        return
    total = shutil.get_terminal_size((120, 24)).columns
    widths = [max([_cell_width(h)] + [_cell_width(r[i]) for r in body]) for i, h in enumerate(headers)]
    gap = 2
    while sum(widths) + gap * (len(widths) - 1) > total and max(widths) > 8:
        widths[widths.index(max(widths))] -= 1  # cut the widest column, one cell at a time
    bold = not os.environ.get("NO_COLOR")

    def line(cells: list[str]) -> str:
        parts = []
        for c, w in zip(cells, widths):
            c = _clip(c, w)
            parts.append(c + " " * (w - _cell_width(c)))
        return (" " * gap).join(parts).rstrip()

    head = line(headers)
    out.write((f"\x1b[1m{head}\x1b[0m" if bold else head) + "\n")
    out.write("".join(line(r) + "\n" for r in body))


class _Task:
    started = True


class _Quiet:
    """What :func:`progress` gives when stderr is not a terminal: the calls a progress bar takes, doing
    nothing (and without importing rich.progress, ~25 ms of a scan's start)."""

    def __init__(self):
        self.tasks: list[_Task] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *a, **k) -> int:
        self.tasks.append(_Task())
        return len(self.tasks) - 1

    def update(self, *a, **k) -> None:
        return None

    advance = start_task = update

    @property
    def console(self):
        return console(stderr=True)


def progress(transient: bool = True):
    """A rich progress bar on stderr (nothing shown when stderr is not a terminal)."""
    import os

    if not sys.stderr.isatty() and not any(os.environ.get(v) for v in ("FORCE_COLOR", "TTY_COMPATIBLE",
                                                                       "TTY_INTERACTIVE", "FORCE_TERMINAL")):
        return _Quiet()
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    class Description(ProgressColumn):  # the task description (may name a layer of a file) as plain text
        def render(self, task):
            return styled((task.description, "progress.description"))

    con = console(stderr=True)
    return Progress(Description(), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=con, transient=transient, disable=not con.is_terminal)


def progress_callback(prog, description: str):
    """A ``progress(done, total)`` callback (the library's convention) that drives a task of ``prog``."""
    task = prog.add_task(description, total=None)
    return lambda done, total: prog.update(task, completed=done, total=total)


def open_registry(home: Optional[Path]):
    from lorahub.registry import Registry

    return Registry.open(home)


# ------------------------------------------------------------------------------------------ numbers
# INT_LIMIT (lorahub.vocab): SQLite's INTEGER; every count, rank, size or seed lorahub takes fits


def _check_number(param, value) -> None:
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_number(param, v)
        return
    opt = max(param.opts, key=len) if param.opts else param.name
    if isinstance(value, float) and not math.isfinite(value):
        from lorahub.errors import LorahubError

        raise LorahubError(f"{opt}: {value} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
        from lorahub.errors import LorahubError

        raise LorahubError(f"{opt}: {value} is out of range (at most {INT_LIMIT} in magnitude)")


def check_numbers(command) -> None:
    """Make every parameter of ``command`` (a click/typer command or group, recursively) refuse NaN,
    infinities and integers beyond :data:`INT_LIMIT` with a :class:`~lorahub.errors.LorahubError`
    (one ``error:`` line, exit 2), after typer has converted the value and before the command runs.
    Any parameter whose value is a float or an int is covered, so no option can forget it."""
    for param in command.params:
        _guard(param)
    for sub in (getattr(command, "commands", None) or {}).values():
        check_numbers(sub)


def _guard(param) -> None:
    inner = param.callback

    def callback(ctx, prm, value):
        _check_number(prm, value)
        return inner(ctx, prm, value) if inner is not None else value

    param.callback = callback
