"""Maintenance commands: backup, restore."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorahub.cli.app import app
from lorahub.cli.common import HomeOpt, JsonOpt, console, print_json, progress


def _home(home: Optional[Path]) -> Path:
    from lorahub.registry import Registry

    return Registry.open(home).home


@app.command()
def backup(dest: Annotated[Path, typer.Argument(help="New (or empty) folder to write the backup to.")],
           home: HomeOpt = None, json: JsonOpt = False) -> None:
    """Back up the registry: an online SQLite copy plus the store, with a checksummed manifest."""
    from lorahub import backup as bk

    h = _home(home)
    with progress() as prog:
        manifest = bk.backup(h, dest, progress=prog)
    summary = {"dest": str(dest), "files": len(manifest["files"]),
               "bytes": sum(f["size"] for f in manifest["files"]) + manifest["database"]["size"]}
    if json:
        print_json(summary)
    else:
        console().print(f"backed up {h} to {dest}: {summary['files']} files, {summary['bytes']} bytes")


@app.command()
def restore(src: Annotated[Path, typer.Argument(help="A folder written by `lorahub backup`.")],
            home: HomeOpt = None,
            force: Annotated[bool, typer.Option("--force", help="Replace an existing registry.")] = False,
            json: JsonOpt = False) -> None:
    """Restore a backup into the registry home (checks every file against the manifest first)."""
    import os

    from lorahub import backup as bk

    target = home or Path(os.environ.get("LORAHUB_HOME") or Path.home() / ".lorahub")
    with progress() as prog:
        manifest = bk.restore(src, target, force=force, progress=prog)
    summary = {"home": str(target), "files": len(manifest["files"])}
    if json:
        print_json(summary)
    else:
        console().print(f"restored {summary['files']} files into {target}")
