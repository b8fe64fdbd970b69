"""`lorahub demo`: runs the demo workflow (lorahub.demo) and prints each step as the command a user
would type. Argument parsing and printing only."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from lorahub.cli.app import app
from lorahub.cli.common import HomeOpt, console, open_registry, styled


@app.command()
def demo(ctx: typer.Context, home: HomeOpt = None) -> None:
    """Build the tiny fixtures, add them to a registry (default: a fresh temp home, even when
    LORAHUB_HOME is set; give --home to use another), search and show one."""
    from lorahub import demo as dm
    from lorahub.cli.catalog import entries_table, print_table, rank_text, show

    source = ctx.get_parameter_source("home")  # typer vendors its own click: compare by name
    if source is not None and source.name == "ENVIRONMENT":
        home = None  # never fill a real registry with demo entries by accident
    t0 = time.perf_counter()
    con = console()
    home = Path(home) if home else dm.fresh_home()
    con.print(styled(("lorahub demo", "bold"), f" — registry home: {home}"))
    for kind in dm.PIPELINES:
        con.print(f"tiny {kind} pipeline: {dm.pipeline(kind)}")
    reg = open_registry(home)
    files = dm.add_tiny_loras(reg)
    con.print(f"wrote {len(files.added)} small LoRA files of every dialect to {files.folder}")
    for a in files.added:
        if a.entry is None:
            con.print(f"  could not add {a.label}: {a.error}")
            continue
        e = a.entry
        con.print(f"  $ lorahub add {a.path.name}  -> {e['id']} {e['format']} {e['kind']} "
                  f"{e['base']} rank {rank_text(e) or '-'}" + ("" if a.created else " (already there)"))
    entries = files.entries
    print_table(con, entries_table(entries, title=f"lorahub list ({len(entries)} entries)"))
    for q, kw in dm.searches(entries):
        hits = reg.search(q or None, **kw)
        opts = " ".join(f"--{k} {v}" for k, v in kw.items())
        con.print(f"$ lorahub search {q} {opts}".replace("  ", " ").rstrip()
                  + f"  -> {len(hits)} hit(s): " + ", ".join(h["name"] for h in hits))
    first = dm.showcase(entries)
    if first is not None:
        con.print(f"$ lorahub show {first['autov2']}")
        show(first["autov2"], json_out=False, home=home)
    out, commands = dm.ml_commands(home, entries)
    if commands:
        from lorahub.cli.app import _load_commands

        _load_commands()
        out.mkdir(parents=True, exist_ok=True)
        con.print(styled("\n", ("ML operations on the tiny fixtures", "bold"), f" (outputs in {out})"))
        for args in commands:
            con.print(styled(("$ lorahub " + " ".join(args), "bold")))
            app(args=args + ["--home", str(home)], prog_name="lorahub", standalone_mode=False)
    con.print(f"done in {time.perf_counter() - t0:.1f} s; try: lorahub list --home {home}")
    con.print(f"look at it in a browser: lorahub serve --home {home}", highlight=False)
