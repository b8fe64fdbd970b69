"""The gallery's web application (Starlette): pages, fragments, images, and the two write actions.

Routes::

    GET  /                              the gallery (``?q= &type= &base= &kind= &tag= &sort= &page=``;
                                        ``&fragment=1``: only the results, for search as you type)
    GET  /entry/{ref}                   an entry's page
    GET  /entry/{ref}/analysis          its heat map, per-layer table and training tags (computed once)
    GET  /entry/{ref}/file              its stored file, as a download
    POST /entry/{ref}/edit              change name, type, base, triggers, description
    POST /entry/{ref}/tags              add and remove tags
    GET  /compare?id=A&id=B[&seed=N]    entries side by side
    GET  /diff?a=A&b=B                  the diff verdict of two entries (a fragment)
    GET  /preview/{id}[/thumb|/frame/N] a preview image, re-encoded (see lorahub.web.images)
    GET  /static/...                    the page's own CSS and JavaScript

Every write goes through the registry library (one transaction each) with the same validation as
``lorahub tag`` / ``lorahub edit``; see :mod:`lorahub.web.security` for the checks in front of it.
Each worker thread reads through its own registry connection (SQLite WAL: the CLI may write meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from pathlib import Path
from urllib.parse import parse_qsl, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from lorahub import __version__
from lorahub.errors import LorahubError, NotFound
from lorahub.web import views
from lorahub.web.analysis import Analyses
from lorahub.web.images import Images
from lorahub.web.security import Guard, GuardMiddleware

HERE = Path(__file__).resolve().parent
MAX_BODY = 256 * 1024           # bytes of a form
SAVED = {"tags": "tags saved", "edit": "changes saved"}   # messages after a write (never user text)


class Registries:
    """One registry connection per thread (SQLite connections are not shared between threads)."""

    def __init__(self, home: Path, *, read_only: bool):
        self.home = Path(home)
        self.read_only = read_only
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()

    def open(self):
        """A new registry of the home (the caller closes it)."""
        from lorahub.registry import Registry
        from lorahub.registry.schema import DB_NAME, connect_readonly

        if not self.read_only:
            return Registry.open(self.home)
        import sqlite3

        conn = connect_readonly(self.home / DB_NAME)
        conn.row_factory = sqlite3.Row
        return Registry(self.home, conn)

    def get(self):
        """This thread's registry."""
        reg = getattr(self._local, "reg", None)
        if reg is None:
            reg = self._local.reg = self.open()
            with self._lock:
                self._all.append(reg)
        return reg

    def close(self) -> None:
        with self._lock:
            for reg in self._all:
                with contextlib.suppress(Exception):
                    reg.close()
            self._all.clear()


def _templates(guard: Guard) -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.globals.update(version=__version__, read_only=guard.read_only, SORTS=views.SORTS,
                       placeholder_colour=views.placeholder_colour, LAYER_COLUMNS=views.LAYER_COLUMNS,
                       DIFF_COLUMNS=views.DIFF_COLUMNS)

    def context(request: Request) -> dict:
        return {"csrf": guard.token(request.state.session)}

    return Jinja2Templates(env=env, context_processors=[context])


def create_app(home: Path | str | None = None, *, read_only: bool = False, guard: Guard | None = None) -> Starlette:
    """The gallery application for the registry at ``home`` (default: ``$LORAHUB_HOME`` or ``~/.lorahub``).

    ``read_only``: no page offers a change, every write is refused, and nothing is written to the home
    (heat maps and thumbnails are cached in memory only). ``guard``: the host check and
    CSRF settings (see :class:`~lorahub.web.security.Guard`; default: a server on 127.0.0.1).
    """
    from lorahub.registry.schema import default_home

    home = Path(home).expanduser() if home else default_home()
    guard = guard or Guard(read_only=read_only)
    guard.read_only = read_only
    regs = Registries(home, read_only=read_only)
    regs.get()  # open (and, when writable, create/migrate) now: a bad home fails at start-up
    images = Images(home, regs.get().store, persist=not read_only)
    analyses = Analyses(home, regs.open, persist=not read_only)
    templates = _templates(guard)
    facet_cache = views.FacetCache()

    def page(request: Request, name: str, ctx: dict, status: int = 200) -> Response:
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    def error_page(request: Request, exc: Exception, status: int | None = None) -> Response:
        status = status or (404 if isinstance(exc, NotFound) else 400)
        return page(request, "error.html", {"message": str(exc), "status": status}, status)

    async def threaded(request: Request, fn, *args):
        """Run ``fn(registry, *args)`` in a worker thread; library errors become error pages."""
        try:
            return await run_in_threadpool(lambda: fn(regs.get(), *args))
        except LorahubError as exc:
            return error_page(request, exc)

    # ------------------------------------------------------------------ pages
    async def gallery(request: Request) -> Response:
        query = views.GalleryQuery.from_params(request.query_params)
        g = await threaded(request, views.gallery, query, facet_cache)
        if isinstance(g, Response):
            return g
        name = "_results.html" if request.query_params.get("fragment") else "gallery.html"
        return page(request, name, {"g": g, "q": g.query})

    async def entry(request: Request) -> Response:
        ref = request.path_params["ref"]
        p = await threaded(request, views.entry_page, ref, images)
        if isinstance(p, Response):
            return p
        saved = SAVED.get(request.query_params.get("saved", ""))
        return page(request, "entry.html", {"p": p, "e": p.entry, "saved": saved, "error": None})

    async def analysis(request: Request) -> Response:
        ref = request.path_params["ref"]
        e = await threaded(request, lambda reg, r: reg.resolve(r), ref)
        if isinstance(e, Response):
            return e
        if e["kind"] == "checkpoint":
            return page(request, "_analysis.html", {"e": e, "error": "a full model checkpoint: no LoRA layers to map"})
        report = await asyncio.wrap_future(analyses.inspect(e))
        if "error" in report:
            return page(request, "_analysis.html", {"e": e, "error": report["error"]})
        ctx = {"e": e, "error": None, "r": report, "heat": views.heatmap(report.get("grid") or {}),
               "layers": views.layer_rows(report), "bars": views.tag_bars(report),
               "summary": list(((report.get("metadata") or {}).get("fields") or {}).items()),
               "part": request.query_params.get("part", "")}
        return page(request, "_analysis.html", ctx)

    async def download(request: Request) -> Response:
        from lorahub.vocab import LORA_SUFFIXES, safe_filename

        def find(reg, ref):
            e = reg.resolve(ref)
            return e, reg.blob_path(e)

        found = await threaded(request, find, request.path_params["ref"])
        if isinstance(found, Response):
            return found
        e, path = found
        suffix = Path(e["file_name"]).suffix.lower()
        name = safe_filename(e["name"], default=e["id"]) + (suffix if suffix in LORA_SUFFIXES else ".safetensors")
        return FileResponse(path, media_type="application/octet-stream", filename=name,
                            headers={"cache-control": "private, max-age=3600"})

    async def compare(request: Request) -> Response:
        refs = [r for r in request.query_params.getlist("id") if r.strip()]
        try:
            seed = int(request.query_params["seed"]) if request.query_params.get("seed") else None
        except ValueError:
            seed = None
        c = await threaded(request, views.compare_page, refs, images, seed)
        if isinstance(c, Response):
            return c
        return page(request, "compare.html", {"c": c, "ids": [e["id"] for e in c.entries]})

    async def diff(request: Request) -> Response:
        pair = await threaded(request, lambda reg, a, b: (reg.resolve(a), reg.resolve(b)),
                              request.query_params.get("a", ""), request.query_params.get("b", ""))
        if isinstance(pair, Response):
            return pair
        a, b = pair
        report = await asyncio.wrap_future(analyses.diff(a, b))
        ctx = {"a": a, "b": b, "d": report, "rows": views.diff_rows(report) if "error" not in report else []}
        return page(request, "_diff.html", ctx)

    # ------------------------------------------------------------------ images
    async def preview(request: Request) -> Response:
        pid = request.path_params["pid"]
        variant = request.path_params.get("variant", "full")
        if "n" in request.path_params:
            variant = f"frame-{request.path_params['n']}"

        def load(reg):
            row = reg.conn.execute("SELECT sha256 FROM previews WHERE seq = ?", (pid,)).fetchone()
            if row is None:
                raise NotFound(f"no preview {pid}")
            return images.get(row["sha256"], variant)

        try:
            enc = await run_in_threadpool(lambda: load(regs.get()))
        except LorahubError as exc:
            return Response(str(exc), status_code=404 if isinstance(exc, NotFound) else 422, media_type="text/plain")
        return Response(enc.data, media_type=enc.media_type,
                        headers={"cache-control": "private, max-age=86400",
                                 "content-security-policy": "default-src 'none'; sandbox"})

    # ------------------------------------------------------------------ writes
    async def form_of(request: Request) -> dict[str, list[str]]:
        body = await request.body()
        if len(body) > MAX_BODY:
            raise LorahubError("the form is too large")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise LorahubError("expected a form (application/x-www-form-urlencoded)")
        out: dict[str, list[str]] = {}
        for k, v in parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=200):
            out.setdefault(k, []).append(v)
        return out

    async def write(request: Request, action: str, change) -> Response:
        """Check the request (read-only, origin, CSRF), run ``change(registry, entry, form)`` in a worker
        thread, and go back to the entry page (or show it again with the error)."""
        ref = request.path_params["ref"]
        try:
            form = await form_of(request)
        except LorahubError as exc:
            return error_page(request, exc)
        token = (form.get("csrf") or [None])[0] or request.headers.get("x-csrf-token")
        refused = guard.write_allowed(request.state.session, token, request.headers)
        if refused:
            return page(request, "error.html", {"message": refused, "status": 403}, 403)

        def run(reg):
            e = reg.resolve(ref)
            try:
                change(reg, e, form)
            except LorahubError as exc:
                p = views.entry_page(reg, e["id"], images)
                return p, str(exc)
            return e, None

        result = await threaded(request, run)
        if isinstance(result, Response):
            return result
        obj, error = result
        if error is not None:
            return page(request, "entry.html", {"p": obj, "e": obj.entry, "saved": None, "error": error}, 400)
        return RedirectResponse(f"/entry/{quote(obj['id'])}?saved={action}#{action}", status_code=303)

    def one(form: dict, key: str) -> str | None:
        v = form.get(key)
        return v[0] if v else None

    def edit_fields(reg, e: dict, form: dict) -> None:
        fields: dict = {}
        name = one(form, "name")
        if name is not None and name.strip() != e["name"]:
            fields["name"] = name
        for key in ("type", "base"):
            v = one(form, key)
            if v is not None and (v or None) != e[key]:
                fields[key] = v or None
        trig = one(form, "triggers")
        if trig is not None:
            words = [w.strip() for w in re.split(r"[\r\n]+", trig) if w.strip()]
            if words != e["triggers"]:
                fields["triggers"] = words
        desc = one(form, "description")
        if desc is not None and (desc.strip() or None) != (e["description"] or None):
            fields["description"] = desc.strip() or None
        if not fields:
            raise LorahubError("nothing to change")
        reg.update(e["id"], **fields)

    def change_tags(reg, e: dict, form: dict) -> None:
        add = [t.strip() for v in form.get("add", []) for t in v.split(",") if t.strip()]
        remove = [t.strip() for t in form.get("remove", []) if t.strip()]
        if not add and not remove:
            raise LorahubError("give a tag to add or remove")
        reg.change_tags(e["id"], add=add, remove=remove)

    async def edit(request: Request) -> Response:
        return await write(request, "edit", edit_fields)

    async def tags(request: Request) -> Response:
        return await write(request, "tags", change_tags)

    async def not_found(request: Request, exc) -> Response:
        return page(request, "error.html", {"message": "no such page", "status": 404}, 404)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        analyses.close()
        regs.close()

    routes = [
        Route("/", gallery),
        Route("/entry/{ref}", entry),
        Route("/entry/{ref}/analysis", analysis),
        Route("/entry/{ref}/file", download),
        Route("/entry/{ref}/edit", edit, methods=["POST"]),
        Route("/entry/{ref}/tags", tags, methods=["POST"]),
        Route("/compare", compare),
        Route("/diff", diff),
        Route("/preview/{pid:int}", preview),
        Route("/preview/{pid:int}/{variant:str}", preview),
        Route("/preview/{pid:int}/frame/{n:int}", preview),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(GuardMiddleware, guard=guard)],
                    exception_handlers={404: not_found}, lifespan=lifespan, max_body_size=MAX_BODY)
    app.state.registries = regs
    app.state.analyses = analyses
    app.state.images = images
    app.state.guard = guard
    app.state.home = home
    return app
