"""The catalogue workflows, as library calls: scan a folder, export an entry, verify (and repair)
the store, an entry's full record. The CLI (``lorahub scan/export/verify/show``) only prints what
these return.

Long work reports through ``progress(done, total)``, called after each file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from lorahub.errors import LorahubError
from lorahub.vocab import LORA_SUFFIXES, safe_filename

if TYPE_CHECKING:  # pragma: no cover
    from lorahub.registry import Registry

Progress = Callable[[int, int], None]

# what `scan` takes by default: safetensors files and (safely read, never unpickled) .pt embeddings
SCAN_SUFFIXES = (".safetensors", ".pt")
# preview images in export order of preference: the sidecar the user had, then an embedded cover
_PREVIEW_ORDER = {"sidecar": 0, "cover": 1}


# --------------------------------------------------------------------------- scan
@dataclass
class ScanReport:
    """What :func:`scan` did with each file found."""

    files: int                                          # files found under the folder
    added: list[dict] = field(default_factory=list)     # new entries, in the order they were committed
    already: int = 0        # files already registered (or with the same content as another file of this scan)
    skipped: list[dict] = field(default_factory=list)   # {"path", "error"}: files that could not be added


def iter_files(root: Path, suffixes: tuple[str, ...], skip: Path | None = None,
               listing: dict[Path, list[str]] | None = None) -> Iterator[Path]:
    """Files under ``root`` whose names end in one of ``suffixes`` (lower case), sorted, recursively,
    without following links; hidden files and folders, and the folder ``skip``, are left out.
    ``listing``: filled with each folder's sorted file names (all of them)."""
    skip_r = skip.resolve() if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dp = Path(dirpath)
        if skip_r is not None:
            try:
                if dp.resolve() == skip_r or skip_r in dp.resolve().parents:
                    dirnames[:] = []
                    continue
            except OSError:
                continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(filenames)
        if listing is not None:
            listing[dp] = names
        for fn in names:
            if fn.lower().endswith(suffixes) and not fn.startswith("."):
                yield dp / fn


def may_have_sidecars(path: Path, names: list[str]) -> bool:
    """Whether another file of the sorted folder listing ``names`` starts with ``path``'s stem and a
    dot (``x.json``, ``x.civitai.info``, ``x.preview.png``, ``x.png`` for ``x.safetensors``): a file
    without any is added without looking for sidecars (a dozen file-system calls saved per file)."""
    import bisect

    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    i = bisect.bisect_left(names, stem + ".")
    while i < len(names) and names[i].startswith(stem + "."):
        if names[i] != path.name:
            return True
        i += 1
    return False


def scan(reg: "Registry", folder: str | os.PathLike, *, exts: Iterable[str] | None = None,
         tags: list[str] | None = None, link: bool = False, progress: Progress | None = None) -> ScanReport:
    """Add every LoRA file under ``folder`` (recursively) to the registry.

    Idempotent and cheap to repeat: a file whose path, size and modification time were seen by an
    earlier scan is not re-hashed. ``exts`` are the file suffixes to take (default ``.safetensors``,
    ``.pt``); ``tags`` go on every new entry; ``link`` hard-links files into the store instead of
    copying them (same file system only; editing the originals then corrupts the store). A file that
    cannot be added is reported in ``skipped`` and the scan goes on.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LorahubError(f"{folder}: not a folder")
    folder = folder.resolve()  # once: the files found under it are absolute (the scan cache's keys)
    suffixes = tuple(("." + e.lstrip(".")).lower() for e in exts) if exts else SCAN_SUFFIXES
    listing: dict[Path, list[str]] = {}
    files = list(iter_files(folder, suffixes, skip=reg.home, listing=listing))
    report = ScanReport(files=len(files))
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, len(files))

    # what earlier scans saw (path -> size, mtime, sha256) and what is registered: two queries
    cache = {r[0]: (r[1], r[2], r[3]) for r in reg.conn.execute("SELECT path, size, mtime_ns, sha256 FROM scan_cache")}
    known = {r[0] for r in reg.conn.execute("SELECT sha256 FROM entries")}
    todo: list[Path] = []
    for f in files:
        try:
            st = f.stat()
            seen = cache.get(str(f))
        except OSError as exc:
            report.skipped.append({"path": str(f), "error": exc.strerror or str(exc)})
            step()
            continue
        if seen is not None and seen[:2] == (st.st_size, st.st_mtime_ns) and seen[2] in known:
            report.already += 1
            step()
        else:
            todo.append(f)

    def added(path, entry, created, err) -> None:
        if err is not None:
            report.skipped.append({"path": str(path), "error": str(err)})
        elif created:
            report.added.append(entry)
        else:  # registered before, or the same content as another file of this scan
            report.already += 1
        step()

    reg.add_many(todo, tags=tags, copy=not link, remember=True, callback=added,
                 sidecars=lambda f: may_have_sidecars(f, listing.get(f.parent, [])))
    return report


# --------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """The files :func:`export` wrote (or found already identical), LoRA file first."""

    id: str
    name: str
    dest: Path
    written: list[Path]


def sidecar_bytes(reg: "Registry", entry: dict) -> dict[str, bytes]:
    """The webui sidecars of an entry as :func:`export` writes them, by kind (``json``, ``civitai``,
    ``txt``): the files it was imported with, byte for byte where nothing they say has been edited
    since; the webui ``.json`` is made from the entry when it came without one (or its fields are
    updated in the original when edited: other keys are kept)."""
    import json

    from lorahub.metadata import webui_sidecar
    from lorahub.registry import queries

    now = webui_sidecar(entry)
    kept = {r["kind"]: r for r in queries.sidecars(reg.conn, entry["id"])}
    out: dict[str, bytes] = {}
    js = kept.get("json")
    if js is not None:
        then = json.loads(js["view"] or "{}")
        if then == now:
            out["json"] = js["data"]
        else:
            try:
                obj = json.loads(js["data"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                obj = None
            if isinstance(obj, dict):
                obj.update({k: v for k, v in now.items() if then.get(k) != v})
            else:
                obj = now
            out["json"] = (json.dumps(obj, indent=4, ensure_ascii=False) + "\n").encode("utf-8")
    else:
        out["json"] = (json.dumps(now, indent=4, ensure_ascii=False) + "\n").encode("utf-8")
    if "civitai" in kept:
        out["civitai"] = kept["civitai"]["data"]
    txt = kept.get("txt")
    if txt is not None:
        then = json.loads(txt["view"] or "{}")
        unchanged = then.get("description") == now["description"]
        out["txt"] = txt["data"] if unchanged else (now["description"] + "\n").encode("utf-8")
    return out


def export(reg: "Registry", ref: str | dict, dest: str | os.PathLike, *, force: bool = False,
           stem: str | None = None) -> ExportResult:
    """Copy an entry out of the store into ``dest`` as the webui expects it: ``<stem>.safetensors``
    (or the entry's own LoRA suffix), the webui ``<stem>.json`` (description, SD version, activation
    text, preferred weight, negative text), the ``<stem>.civitai.info`` and ``<stem>.txt`` it was
    imported with, and ``<stem>.preview.<ext>`` when the entry has a preview (see :func:`sidecar_bytes`:
    sidecars come back byte for byte where unchanged, so a webui folder scanned and exported loses
    nothing).

    ``stem``: the file name to use; default: the stem of the file the entry was registered from
    (the LoRA's handle in webui prompts, ``<lora:STEM:0.8>``). It is made safe (no path separators,
    no ``..``): nothing is written outside ``dest``. Existing files with other content raise
    :class:`~lorahub.fsutil.WouldOverwrite` unless ``force`` (checked for every file before any is
    written). Every file is written atomically (temp + fsync + rename).
    """
    import shutil

    from lorahub.fsutil import WouldOverwrite, atomic_path, atomic_write_bytes, is_within
    from lorahub.hashing import sha256_file

    e = reg.resolve(ref)
    blob = reg.blob_path(e)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise LorahubError(f"{dest}: exists and is not a folder")
    suffix = Path(e["file_name"]).suffix.lower()
    if suffix not in LORA_SUFFIXES:
        suffix = ".safetensors"
    if stem is None:
        fname = e["file_name"] or ""
        stem = fname[: -len(Path(fname).suffix)] if Path(fname).suffix.lower() in LORA_SUFFIXES else fname
    stem = safe_filename(stem or e["name"])
    if stem.lower().endswith(suffix):
        stem = stem[: -len(suffix)] or "lora"
    # target -> its content: bytes, or (stored blob, its sha256)
    files: dict[Path, bytes | tuple[Path, str]] = {dest / f"{stem}{suffix}": (blob, e["sha256"])}
    for kind, data in sidecar_bytes(reg, e).items():
        files[dest / (stem + {"json": ".json", "civitai": ".civitai.info", "txt": ".txt"}[kind])] = data
    previews = sorted(reg.previews(e["id"]), key=lambda x: (_PREVIEW_ORDER.get(x["kind"], 2), x["id"]))
    if previews:
        src = Path(previews[0]["path"])
        if not src.is_file():
            raise LorahubError(f"the preview blob {src} is missing; run `lorahub verify`")
        files[dest / f"{stem}.preview.{safe_filename(previews[0]['ext'], 'png')}"] = (src, previews[0]["sha256"])
    for t in files:
        if not is_within(t, dest) or t.is_symlink():
            raise LorahubError(f"{t}: refusing to write outside {dest}")

    def same(target: Path, content: bytes | tuple[Path, str]) -> bool:
        if not target.is_file():
            return False
        if isinstance(content, bytes):
            return target.stat().st_size == len(content) and target.read_bytes() == content
        src, sha = content
        return target.stat().st_size == src.stat().st_size and sha256_file(target) == sha

    todo = {}
    for target, content in files.items():
        if target.is_dir():  # not even force replaces a folder by a file
            raise LorahubError(f"{target}: is a folder, not a file; export to another destination")
        if same(target, content):
            continue
        if target.exists() and not force:
            raise WouldOverwrite(f"{target} exists with other content (export with force=True to overwrite)", target)
        todo[target] = content
    if todo:
        dest.mkdir(parents=True, exist_ok=True)
    for target, content in todo.items():
        if isinstance(content, bytes):
            atomic_write_bytes(target, content, mode=0o644)
        else:
            with atomic_path(target, mode=0o644) as tmp:
                shutil.copyfile(content[0], tmp)
    return ExportResult(e["id"], e["name"], dest, list(files))


# --------------------------------------------------------------------------- verify / repair
@dataclass
class VerifyReport:
    """What :func:`check` found: every problem blob, and (after a repair) which came back."""

    checked: int
    problems: list[dict]    # {id, name, sha256, what: entry|preview, problem: missing|corrupt[, repaired, from]}
    repair: bool = False    # whether a repair was attempted
    recovered: list[dict] = field(default_factory=list)  # entries re-registered from a store without catalogue

    @property
    def remaining(self) -> list[dict]:
        """The problems still there (all of them when no repair was attempted)."""
        return [p for p in self.problems if not p.get("repaired")]


def check(reg: "Registry", *, repair: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Re-hash every stored blob (entries and previews). With ``repair``, bring missing or corrupt
    blobs back from the entry's recorded source file or Hub remote where their bytes still match
    (:func:`lorahub.repair.repair`); and when the registry was opened with ``recover`` on a store
    whose catalogue database was lost, first re-register every stored LoRA file
    (:func:`lorahub.repair.recover_entries`: names from their metadata, tags and lineage are lost)."""
    from lorahub.registry import queries

    recovered = []
    if repair and reg.recovering:
        from lorahub.repair import recover_entries

        recovered = recover_entries(reg)
    total = queries.count_blobs(reg.conn)
    done = 0

    def step(_row) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    problems = reg.verify(progress=step)
    if repair and problems:
        from lorahub.repair import repair as restore_missing

        problems = restore_missing(reg, problems)
    return VerifyReport(total, problems, repair, recovered)


# --------------------------------------------------------------------------- show
def record(reg: "Registry", ref: str | dict) -> dict:
    """Everything the catalogue knows about one entry: the entry, ``blob`` (its stored file),
    ``lineage`` (the ancestry tree), ``children``, ``previews``, ``remotes`` and ``sidecar_files`` (the
    sidecars kept byte for byte: kind, file_name, size, sha256)."""
    from lorahub.registry import queries

    e = reg.resolve(ref)
    kept = [{"kind": s["kind"], "file_name": s["file_name"], "size": len(s["data"]), "sha256": s["sha256"]}
            for s in queries.sidecars(reg.conn, e["id"])]
    return {**e, "blob": str(reg.object_path(e["sha256"])), "lineage": reg.ancestry(e["id"]),
            "children": reg.children(e["id"]), "previews": reg.previews(e["id"]), "remotes": reg.remotes(e["id"]),
            "sidecar_files": kept}


# --------------------------------------------------------------------------- add
@dataclass
class CheckedFile:
    """A file :func:`check_files` read the header of, with what it found."""

    path: Path
    detection: object  # lorahub.formats.detect.Detection


def check_files(paths: Iterable[str | os.PathLike]) -> list[CheckedFile]:
    """Check that every path is a regular file in a format lorahub reads (header only), before a
    batch is added all-or-nothing; raise on the first that is not. Returns each path with its
    detection (pass it to ``Registry.add_file(detection=...)``: the header is not read again)."""
    from lorahub.formats.detect import detect

    out = []
    for f in map(Path, paths):
        if not f.exists():
            raise LorahubError(f"{f}: no such file")
        if not f.is_file():
            raise LorahubError(f"{f}: not a regular file")
        out.append(CheckedFile(f, detect(f)))
    return out
