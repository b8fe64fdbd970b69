"""`python -m lorahub.train DATA_DIR ...` / `accelerate launch -m lorahub.train DATA_DIR ...`.

The same options as `lorahub train`; under accelerate each process runs this module and the trainer's
`accelerate.Accelerator` sets up devices, mixed precision and gradient synchronisation.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import typer

    from lorahub.cli.train import train
    from lorahub.errors import LorahubError

    runner = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    runner.command()(train)
    try:
        runner(args=argv, prog_name="python -m lorahub.train")
    except LorahubError as exc:
        sys.stderr.write(f"error: {str(exc).replace(chr(10), ' ')}\n")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
