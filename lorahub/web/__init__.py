"""``lorahub serve``: a local web gallery of a registry — look, search, compare, tag.

The gallery is a small Starlette application rendered with Jinja2 templates and served by uvicorn, on
the same registry home as the command line (SQLite in WAL mode: the CLI writes while the page reads).
Nothing here is imported by the other commands; the ML stack (torch) is imported only when an
entry's heat map and per-layer table are first computed, and that result is cached on disk.

* :mod:`lorahub.web.server` — :class:`~lorahub.web.server.GalleryServer`: bind, run, stop;
* :mod:`lorahub.web.app` — :func:`~lorahub.web.app.create_app`, the routes;
* :mod:`lorahub.web.views` — what each page shows, as plain data (gallery, entry, compare);
* :mod:`lorahub.web.analysis` — inspect/diff results computed on demand, cached by SHA-256;
* :mod:`lorahub.web.images` — previews re-encoded from the store (thumbnails, animation frames);
* :mod:`lorahub.web.security` — host check, per-session CSRF tokens, security headers.
"""

from __future__ import annotations
