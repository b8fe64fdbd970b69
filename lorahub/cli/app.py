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


def main(argv: list[str] | None = None) -> None:
    from lorahub.errors import LorahubError, OutputExists

    args = sys.argv[1:] if argv is None else list(argv)
    _load_commands(COMMAND_INDEX.get(args[0]) if args else None)
    try:
        app(args=args, prog_name="lorahub")
    except LorahubError as exc:
        msg = str(exc).replace("\n", " ")
        if isinstance(exc, OutputExists):  # the library's `force` is the command's --force
            msg = f"{exc.path}: already exists (choose another output, or use --force to overwrite)"
        sys.stderr.write(f"error: {msg}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as exc:  # a bug: say so in one line; LORAHUB_DEBUG=1 shows the traceback
        if os.environ.get("LORAHUB_DEBUG"):
            raise
        sys.stderr.write(f"internal error: {type(exc).__name__}: {exc} (set LORAHUB_DEBUG=1 for a traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
