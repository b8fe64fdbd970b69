"""A progress bar fed by a workflow's progress callback (``on_layer(i, n, name)``, ``on_batch(done, total)``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from lorahub.cli.common import progress


@contextmanager
def steps(label: str, *, transient: bool = True) -> Iterator[Callable]:
    """``with steps("extract") as cb: workflow(..., on_layer=cb)``: a bar on stderr showing ``label``
    (and the item being worked on), ``done`` of ``total``."""
    with progress(transient) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int, name: str | None = None) -> None:
            desc = f"{label} {name.split('.', 1)[-1][:48]}" if name else label
            bar.update(task, completed=done, total=total, description=desc)

        yield update
