"""Maintenance commands: backup, restore (argument parsing and printing; the work is lorahub.backup)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorahub.cli.app import app
from lorahub.cli.common import HomeOpt, JsonOpt, console, print_json, progress, progress_callback


@app.command()
def backup(dest: Annotated[Path, typer.Argument(help="New (or empty) folder to write the backup to.")],
           home: HomeOpt = None, json: JsonOpt = False) -> None:
    """Back up the registry: an online SQLite copy plus the store, with a checksummed manifest."""
    from lorahub import backup as bk
    from lorahub.registry.schema import default_home

    h = Path(home).expanduser() if home else default_home()
    with progress() as prog:
        manifest = bk.backup(h, dest, progress=progress_callback(prog, "backup"))
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
    from lorahub import backup as bk
    from lorahub.errors import LorahubError
    from lorahub.fsutil import WouldOverwrite
    from lorahub.registry.schema import default_home

    target = home or default_home()
    try:
        with progress() as prog:
            manifest = bk.restore(src, target, force=force, progress=progress_callback(prog, "restore"))
    except WouldOverwrite as exc:
        raise LorahubError(f"{exc.path}: a registry already exists here (use --force to replace it)") from None
    summary = {"home": str(target), "files": len(manifest["files"])}
    if json:
        print_json(summary)
    else:
        console().print(f"restored {summary['files']} files into {target}")
