"""Options and output helpers shared by every command module (kept light: typer + rich only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

HomeOpt = Annotated[
    Optional[Path],
    typer.Option("--home", envvar="LORAHUB_HOME", show_envvar=True,
                 help="Registry home (default ~/.lorahub)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str, ensure_ascii=False) + "\n")


def progress(transient: bool = True):
    """A rich progress bar on stderr (hidden when stderr is not a terminal)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    con = console(stderr=True)
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=con, transient=transient, disable=not con.is_terminal)


def progress_callback(prog, description: str):
    """A ``progress(done, total)`` callback (the library's convention) that drives a task of ``prog``."""
    task = prog.add_task(description, total=None)
    return lambda done, total: prog.update(task, completed=done, total=total)


def open_registry(home: Optional[Path]):
    from lorahub.registry import Registry

    return Registry.open(home)
