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


def iter_files(root: Path, suffixes: tuple[str, ...], skip: Path | None = None) -> Iterator[Path]:
    """Files under ``root`` whose names end in one of ``suffixes`` (lower case), sorted, recursively,
    without following links; hidden files and folders, and the folder ``skip``, are left out."""
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
        for fn in sorted(filenames):
            if fn.lower().endswith(suffixes) and not fn.startswith("."):
                yield dp / fn


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
    suffixes = tuple(("." + e.lstrip(".")).lower() for e in exts) if exts else SCAN_SUFFIXES
    files = list(iter_files(folder, suffixes, skip=reg.home))
    report = ScanReport(files=len(files))
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, len(files))

    todo: list[Path] = []
    stats: dict[Path, os.stat_result] = {}
    for f in files:
        try:
            st = f.stat()
        except OSError as exc:
            report.skipped.append({"path": str(f), "error": exc.strerror or str(exc)})
            step()
            continue
        sha = reg.scan_cache_get(f.resolve(), st)
        if sha and reg.find_sha256(sha) is not None:
            report.already += 1
            step()
        else:
            todo.append(f)
            stats[f] = st

    seen: list[tuple[Path, os.stat_result, str]] = []

    def added(path, entry, created, err) -> None:
        if err is not None:
            report.skipped.append({"path": str(path), "error": str(err)})
        else:
            if created:
                report.added.append(entry)
            else:  # registered before, or the same content as another file of this scan
                report.already += 1
            seen.append((Path(path).resolve(), stats[path], entry["sha256"]))
        step()

    reg.add_many(todo, tags=tags, copy=not link, callback=added)
    reg.scan_cache_put(seen)
    return report


# --------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    """The files :func:`export` wrote (or found already identical), LoRA file first."""

    id: str
    name: str
    dest: Path
    written: list[Path]


def export(reg: "Registry", ref: str | dict, dest: str | os.PathLike, *, force: bool = False) -> ExportResult:
    """Copy an entry out of the store into ``dest`` under a readable name, as the webui expects it:
    ``<name>.safetensors``, a ``<name>.json`` sidecar (description, SD version, activation text,
    preferred weight, negative text) and ``<name>.preview.<ext>`` when the entry has a preview.

    The name is made safe (no path separators, no ``..``): nothing is written outside ``dest``.
    Existing files with other content raise :class:`~lorahub.fsutil.WouldOverwrite` unless ``force``.
    Every file is written atomically (temp + fsync + rename).
    """
    import json
    import shutil

    from lorahub.fsutil import WouldOverwrite, atomic_path, atomic_write_text, is_within
    from lorahub.hashing import sha256_file
    from lorahub.metadata import webui_sidecar

    e = reg.resolve(ref)
    blob = reg.blob_path(e)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise LorahubError(f"{dest}: exists and is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    suffix = Path(e["file_name"]).suffix.lower()
    if suffix not in LORA_SUFFIXES:
        suffix = ".safetensors"
    stem = safe_filename(e["name"])
    if stem.lower().endswith(suffix):
        stem = stem[: -len(suffix)] or "lora"
    targets = {"file": dest / f"{stem}{suffix}", "json": dest / f"{stem}.json"}
    previews = sorted(reg.previews(e["id"]), key=lambda x: (_PREVIEW_ORDER.get(x["kind"], 2), x["id"]))
    if previews:
        targets["preview"] = dest / f"{stem}.preview.{previews[0]['ext']}"
    for t in targets.values():
        if not is_within(t, dest) or t.is_symlink():
            raise LorahubError(f"{t}: refusing to write outside {dest}")

    def overwrite_refused(path: Path) -> WouldOverwrite:
        return WouldOverwrite(f"{path} exists with other content (export with force=True to overwrite)", path)

    same_file = targets["file"].exists() and sha256_file(targets["file"]) == e["sha256"]
    if targets["file"].exists() and not same_file and not force:
        raise overwrite_refused(targets["file"])
    sidecar = webui_sidecar(e)
    if targets["json"].exists() and not force:
        try:
            same = json.loads(targets["json"].read_text(encoding="utf-8")) == sidecar
        except (OSError, ValueError):
            same = False
        if not same:
            raise overwrite_refused(targets["json"])
    if previews and not Path(previews[0]["path"]).is_file():
        raise LorahubError(f"the preview blob {previews[0]['path']} is missing; run `lorahub verify`")

    def copy(src: Path, dst: Path) -> None:
        with atomic_path(dst, mode=0o644) as tmp:
            shutil.copyfile(src, tmp)

    if not same_file:
        copy(blob, targets["file"])
    atomic_write_text(targets["json"], json.dumps(sidecar, indent=4, ensure_ascii=False) + "\n", mode=0o644)
    if previews:
        copy(Path(previews[0]["path"]), targets["preview"])
    return ExportResult(e["id"], e["name"], dest, list(targets.values()))


# --------------------------------------------------------------------------- verify / repair
@dataclass
class VerifyReport:
    """What :func:`check` found: every problem blob, and (after a repair) which came back."""

    checked: int
    problems: list[dict]    # {id, name, sha256, what: entry|preview, problem: missing|corrupt[, repaired, from]}
    repair: bool = False    # whether a repair was attempted

    @property
    def remaining(self) -> list[dict]:
        """The problems still there (all of them when no repair was attempted)."""
        return [p for p in self.problems if not p.get("repaired")]


def check(reg: "Registry", *, repair: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Re-hash every stored blob (entries and previews). With ``repair``, bring missing or corrupt
    blobs back from the entry's recorded source file or Hub remote where their bytes still match
    (:func:`lorahub.repair.repair`)."""
    from lorahub.registry import queries

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
    return VerifyReport(total, problems, repair)


# --------------------------------------------------------------------------- show
def record(reg: "Registry", ref: str | dict) -> dict:
    """Everything the catalogue knows about one entry: the entry, ``blob`` (its stored file),
    ``lineage`` (the ancestry tree), ``children``, ``previews`` and ``remotes``."""
    e = reg.resolve(ref)
    return {**e, "blob": str(reg.object_path(e["sha256"])), "lineage": reg.ancestry(e["id"]),
            "children": reg.children(e["id"]), "previews": reg.previews(e["id"]), "remotes": reg.remotes(e["id"])}


# --------------------------------------------------------------------------- add
def check_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Check that every path is a regular file in a format lorahub reads (header only), before a
    batch is added all-or-nothing; raise on the first that is not. Returns the paths."""
    from lorahub.formats.detect import detect

    out = []
    for f in map(Path, paths):
        if not f.exists():
            raise LorahubError(f"{f}: no such file")
        if not f.is_file():
            raise LorahubError(f"{f}: not a regular file")
        detect(f)
        out.append(f)
    return out
