"""Heavy results the gallery shows — an entry's ``inspect`` report (heat map, per-layer table, training
tags) and the ``diff`` of two entries — computed on demand and cached on disk in the registry home.

The cache lives in ``<home>/cache/inspect/<sha256>.json`` and ``<home>/cache/diff/<sha256 a>-<sha256 b>.json``:
a stored file never changes, so its SHA-256 is a complete key; each file also records the lorahub
version that wrote it, and is recomputed when another version reads it. Computations run one at a
time in a background thread (the gallery keeps answering meanwhile); two requests for the same result
share one computation. When the home is not writable (or ``persist=False``: a read-only gallery),
new results are kept in memory instead.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from lorahub import __version__
from lorahub.errors import LorahubError

log = logging.getLogger("lorahub.web")

CACHE_DIR = "cache"
MEMORY_ITEMS = 64  # results kept in memory when the cache folder cannot be written


class Analyses:
    """Cached ``inspect``/``diff`` results of registry entries (see the module docs).

    ``open_registry()`` returns a :class:`~lorahub.registry.Registry` usable in the calling thread;
    ``persist``: write new results to the cache folder (else keep them in memory).
    """

    def __init__(self, home: Path, open_registry: Callable, *, persist: bool = True):
        self.root = Path(home) / CACHE_DIR
        self.persist = persist
        self._open_registry = open_registry
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorahub-analysis")
        self._jobs: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, dict] = OrderedDict()
        self.computed = 0  # how many results were computed (not read from the cache) by this process

    # ------------------------------------------------------------------ cache
    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.json"

    def cached(self, kind: str, key: str) -> dict | None:
        """The cached result ``kind`` (inspect | diff) of ``key``, or None."""
        if key in self._memory:
            return self._memory[key]
        try:
            stored = json.loads(self._path(kind, key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("lorahub") != __version__ or "result" not in stored:
            return None
        return stored["result"]

    def _store(self, kind: str, key: str, result: dict) -> None:
        from lorahub.fsutil import atomic_write_text

        if self.persist:
            path = self._path(kind, key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps({"lorahub": __version__, "result": result}, default=str))
                return
            except (OSError, LorahubError):  # a read-only home: keep it in memory
                pass
        self._memory[key] = result
        while len(self._memory) > MEMORY_ITEMS:
            self._memory.popitem(last=False)

    # ------------------------------------------------------------------ jobs
    def _submit(self, kind: str, key: str, compute: Callable[[], dict]) -> Future:
        with self._lock:
            job = self._jobs.get(key)
            if job is not None:
                return job
            hit = self.cached(kind, key)
            fut: Future = Future()
            if hit is not None:
                fut.set_result(hit)
                return fut

            def run() -> dict:
                try:
                    try:
                        result = compute()
                    except LorahubError as exc:  # the file cannot be analysed: say why, remember it
                        result = {"error": str(exc)}
                    self.computed += 1
                    self._store(kind, key, result)
                    return result
                except Exception as exc:  # a bug: report it on the page, do not cache it
                    log.exception("analysis %s %s failed", kind, key)
                    return {"error": f"internal error: {type(exc).__name__}: {exc}"}
                finally:
                    with self._lock:
                        self._jobs.pop(key, None)

            fut = self._pool.submit(run)
            self._jobs[key] = fut
            return fut

    def inspect(self, entry: dict) -> Future:
        """The ``inspect`` report of ``entry`` (a Future of a dict; ``{"error": ...}`` when it cannot be read)."""
        entry_id = entry["id"]

        def compute() -> dict:
            from lorahub.ops.inspect import inspect_lora

            with self._open_registry() as reg:
                report = dict(inspect_lora(entry_id, registry=reg).report)
            report.pop("file", None)  # the store path: the page knows the entry
            return report

        return self._submit("inspect", entry["sha256"], compute)

    def diff(self, a: dict, b: dict) -> Future:
        """The ``diff`` of entries ``a`` and ``b`` (summary with its verdict, per-layer rows, warnings)."""
        ids = (a["id"], b["id"])

        def compute() -> dict:
            from lorahub.ops.diff import diff_loras

            with self._open_registry() as reg:
                res = diff_loras(ids[0], ids[1], registry=reg)
            return {**res.report, "warnings": res.warnings}

        return self._submit("diff", f"{a['sha256']}-{b['sha256']}", compute)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
