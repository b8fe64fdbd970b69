"""`lorahub serve`: the web gallery of the registry (lorahub.web). Argument parsing and printing only;
the web stack (Starlette, Jinja2, uvicorn) is imported when the command runs, never by other commands."""

from __future__ import annotations

from typing import Annotated

import typer

from lorahub.cli.app import app
from lorahub.cli.common import HomeOpt, console


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. The default is reachable only "
                                      "from this machine; another address exposes the registry to the network.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).")] = 8765,
    open_: Annotated[bool, typer.Option("--open", help="Open the gallery in the default web browser.")] = False,
    read_only: Annotated[bool, typer.Option("--read-only", help="Offer no edits and refuse every write.")] = False,
    home: HomeOpt = None,
) -> None:
    """Serve a web gallery of the registry: search, previews, sweeps, heat maps, lineage, compare, tag."""
    from rich.markup import escape

    from lorahub.web.server import GalleryServer

    srv = GalleryServer.bind(home, host=host, port=port, read_only=read_only)
    con = console()
    if srv.exposed:
        console(stderr=True).print(f"warning: listening on {escape(host)}: anyone who can reach this machine can "
                                   "see the registry" + ("" if read_only else " and edit it (use --read-only to refuse "
                                                         "edits)"), highlight=False)
    con.print(f"lorahub gallery of {escape(str(srv.home))} ({srv.entries} entries"
              + (", read-only" if read_only else "") + f") at {srv.url}", highlight=False)
    con.print("press Ctrl+C to stop", highlight=False)
    if open_:
        import webbrowser

        webbrowser.open(srv.url)
    srv.run()
    con.print("stopped", highlight=False)
