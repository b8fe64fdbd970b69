"""`lorahub` entry point. Command groups live in sibling modules that register on ``app``.

Each command module imports only typer/rich at module level; heavy libraries (torch, diffusers,
transformers) are imported inside the command functions, so catalogue commands start fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated

import typer

from lorahub import __version__

app = typer.Typer(
    name="lorahub",
    help="Catalogue, inspect, create and share LoRA adapters for Stable Diffusion-family models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Command modules, in the order their commands appear in --help. Each registers on `app`.
COMMAND_MODULES = (
    "catalog",   # add scan list search show tag edit rm gc export dupes verify sql
    "demo",      # demo
    "formats",   # convert
    "inspect",   # inspect diff
    "extract",   # extract resize
    "merge",     # merge
    "sweep",     # sweep render previews
    "train",     # train captions
    "hub",       # push pull
    "admin",     # backup restore
    "serve",     # serve
)


# Which module registers each top-level command. `main` imports only the module that the command
# needs, so `lorahub search` does not build the other ~25 commands. tests/test_cli_app.py checks
# that this index matches what the modules really register.
COMMAND_INDEX = {
    **dict.fromkeys(("add", "scan", "list", "search", "show", "tag", "edit", "rm", "gc", "export",
                     "dupes", "verify", "sql"), "catalog"),
    "demo": "demo",
    "convert": "formats",
    "inspect": "inspect", "diff": "inspect",
    "extract": "extract", "resize": "extract",
    "merge": "merge",
    "sweep": "sweep", "render": "sweep", "previews": "sweep",
    "train": "train", "captions": "train",
    "push": "hub", "pull": "hub",
    "backup": "admin", "restore": "admin",
    "serve": "serve",
}


# --force of every command that writes an output (the library's ``force``)
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorahub {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """lorahub: a local registry of LoRA files and real ML operations on them."""


def _load_commands(only: str | None = None) -> None:
    for name in (only,) if only else COMMAND_MODULES:
        importlib.import_module(f"lorahub.cli.{name}")


def cli_message(exc) -> str:
    """A library error worded for the command line: where the library names an argument or a
    workflow in API terms (``force``, restore, verify with repair), name the command and option."""
    from lorahub.errors import OutputExists
    from lorahub.registry import OrphanedStore

    if isinstance(exc, OutputExists):  # the library's `force` is the command's --force
        return f"{exc.path}: already exists (choose another output, or use --force to overwrite)"
    if isinstance(exc, OrphanedStore):
        return (f"{exc.path}: the store holds {exc.blobs} blob(s) but the catalogue database is {exc.state}; "
                f"refusing to take it for a new registry. Restore the database from a backup (`lorahub restore "
                f"BACKUP --home {exc.path} --force`), or re-register the stored files (`lorahub verify --repair`)")
    return str(exc)


def main(argv: list[str] | None = None) -> None:
    from lorahub.cli.common import check_numbers, safe_text
    from lorahub.errors import LorahubError

    args = sys.argv[1:] if argv is None else list(argv)
    _load_commands(COMMAND_INDEX.get(args[0]) if args else None)
    try:
        command = typer.main.get_command(app)
        check_numbers(command)  # NaN, infinities, out-of-range integers: refused for every option
        command(args=args, prog_name="lorahub")
    except LorahubError as exc:
        msg = cli_message(exc).replace("\n", " ")
        sys.stderr.write(f"error: {safe_text(msg)}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as exc:
        bad_input = input_error(exc)
        if bad_input is not None:
            sys.stderr.write(f"error: {safe_text(bad_input)}\n")
            sys.exit(2)
        if os.environ.get("LORAHUB_DEBUG"):  # a bug: say so in one line; LORAHUB_DEBUG=1 shows the traceback
            raise
        sys.stderr.write(safe_text(f"internal error: {type(exc).__name__}: {exc} (set LORAHUB_DEBUG=1 for a "
                                   "traceback)").replace("\n", " ") + "\n")
        sys.exit(1)


def input_error(exc: Exception) -> str | None:
    """The one-line message for an exception that the input or the environment caused (a damaged
    database, a file system refusal, input nested too deeply, an image bomb, a file name that is not
    UTF-8), or None when it is a bug. The library raises LorahubError for what it foresees; this is the
    net for what escapes it, so that bad input never reads "internal error"."""
    import sqlite3

    text = str(exc).replace("\n", " ")
    if isinstance(exc, sqlite3.DatabaseError):
        low = text.lower()
        # the base class itself (not Operational/Integrity/Programming error) is what a damaged file raises:
        # "database disk image is malformed", "file is not a database", "vtable constructor failed" (FTS)
        if type(exc) is sqlite3.DatabaseError or "malformed" in low or "disk i/o error" in low:
            return (f"the registry database is damaged ({text}); restore a backup with `lorahub restore`, "
                    "or move lorahub.db aside and re-add the files")
        if "database or disk is full" in low:
            return f"no space left for the registry database ({text})"
        if "locked" in low or "busy" in low:
            return f"the registry database is busy ({text}); try again"
        if "readonly" in low or "read-only" in low or "unable to open" in low:
            return f"cannot write the registry database ({text})"
        return None
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            where = f"{where} -> {exc.filename2}"
        why = exc.strerror or text
        return f"{where}: {why}" if where else why
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to read"
    if isinstance(exc, UnicodeError) and "surrogates not allowed" in text:
        return "a file or folder name is not valid UTF-8; rename it"
    if isinstance(exc, OverflowError) and "SQLite INTEGER" in text:
        return f"a number is out of range ({text})"
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(exc, pil.DecompressionBombError):
        return f"an image is too large to read safely ({text})"
    return None


if __name__ == "__main__":
    main()
