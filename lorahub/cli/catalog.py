"""Catalogue commands: add scan list search show tag edit rm gc export dupes verify demo.

Module level imports only typer/stdlib (plus the light lorahub.cli.common): `lorahub search` must start
fast. The registry module itself is stdlib-only; detection and hashing are imported when adding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lorahub.cli.app import app
from lorahub.cli.common import HomeOpt, JsonOpt, console, open_registry, print_json, progress

TypeOpt = Annotated[Optional[str], typer.Option("--type", help="LoRA type: character|style|pose|clothing|object|concept.")]
BaseOpt = Annotated[Optional[str], typer.Option("--base", help="Base model family: sd1|sd2|sdxl|unknown.")]
TagOpt = Annotated[Optional[List[str]], typer.Option("--tag", help="A tag (repeat for several).")]
TriggerOpt = Annotated[Optional[List[str]], typer.Option("--trigger", help="A trigger token (repeat for several).")]
KindOpt = Annotated[Optional[str], typer.Option("--kind", help="lora|locon|loha|lokr|dora|textual-inversion|checkpoint.")]

SCAN_EXTS = (".safetensors", ".pt")
LIST_HASH = "autov2"


def _short(entry: dict) -> dict:
    keys = ("id", "name", "kind", "format", "base", "rank", "rank_min", "rank_max", "alpha", "type", "triggers",
            "tags", "size", "sha256", "autov2", "autov3", "file_name")
    return {k: entry.get(k) for k in keys}


def _rank_text(e: dict) -> str:
    if e.get("rank_min") is not None and e.get("rank_max") is not None and e["rank_min"] != e["rank_max"]:
        return f"{e['rank_min']}-{e['rank_max']}"
    return "" if e.get("rank") is None else str(e["rank"])


def _print_table(con, table) -> None:
    if not con.is_terminal:
        con.width = max(con.width, 140)
    con.print(table)


def _entries_table(entries: list[dict], title: str | None = None):
    from rich.table import Table

    t = Table(title=title, show_lines=False, header_style="bold")
    for col in ("id", "name", "kind", "base", "rank", "type", "triggers", "tags"):
        t.add_column(col, overflow="fold")
    for e in entries:
        t.add_row(e["id"], e["name"], e["kind"], e["base"], _rank_text(e), e.get("type") or "",
                  ", ".join(e.get("triggers") or [])[:60], ", ".join(e.get("tags") or [])[:60])
    return t


def _human(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------- add / scan
@app.command()
def add(
    files: Annotated[List[Path], typer.Argument(help="LoRA / embedding / checkpoint files to register.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Entry name (default: the file name).")] = None,
    type: TypeOpt = None,
    trigger: TriggerOpt = None,
    tag: TagOpt = None,
    base: BaseOpt = None,
    description: Annotated[Optional[str], typer.Option("--description", help="Free-text description.")] = None,
    source: Annotated[Optional[str], typer.Option("--source", help="Where it came from (path, URL, hub repo).")] = None,
    no_sidecars: Annotated[bool, typer.Option("--no-sidecars", help="Ignore .json/.civitai.info/.txt/preview files beside it.")] = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Add files to the registry: hashes, detected format/base/rank, metadata and sidecars, stored blob."""
    from lorahub.errors import LorahubError
    from lorahub.formats.detect import detect

    if name and len(files) > 1:
        raise LorahubError("--name needs exactly one file")
    for f in files:  # check every file before writing anything
        if not f.exists():
            raise LorahubError(f"{f}: no such file")
        if not f.is_file():
            raise LorahubError(f"{f}: not a regular file")
        detect(f)
    reg = open_registry(home)
    results = []
    con = console()
    for f in files:
        entry, created = reg.add_file(f, name=name, type=type, triggers=trigger or None, tags=tag or None,
                                      base=base, description=description, source=source, sidecars=not no_sidecars)
        results.append({"created": created, **_short(entry)})
        if not json_out:
            if created:
                con.print(f"added {entry['name']} ({entry['id']}): {entry['format']} {entry['kind']} "
                          f"{entry['base']} rank {_rank_text(entry) or '-'}, {_human(entry['size'])}"
                          + (f", triggers: {', '.join(entry['triggers'])}" if entry["triggers"] else ""))
            else:
                con.print(f"{f.name} is already in the registry as {entry['name']} ({entry['id']})")
    if json_out:
        print_json(results)


def _iter_files(root: Path, exts: tuple[str, ...], skip: Path):
    skip_r = skip.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dp = Path(dirpath)
        try:
            if dp.resolve() == skip_r or skip_r in dp.resolve().parents:
                dirnames[:] = []
                continue
        except OSError:
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.lower().endswith(exts) and not fn.startswith("."):
                yield dp / fn


@app.command()
def scan(
    folder: Annotated[Path, typer.Argument(help="Folder to scan recursively.")],
    ext: Annotated[Optional[List[str]], typer.Option("--ext", help="File extensions to take (default .safetensors, .pt).")] = None,
    tag: TagOpt = None,
    link: Annotated[bool, typer.Option("--link", help="Hard-link files into the store instead of copying "
                                       "(same file system only; editing the originals then corrupts the store).")] = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Add every LoRA file under FOLDER (recursive, idempotent: files seen before are not re-hashed)."""
    from lorahub.errors import LorahubError

    if not folder.is_dir():
        raise LorahubError(f"{folder}: not a folder")
    exts = tuple(("." + e.lstrip(".")).lower() for e in ext) if ext else SCAN_EXTS
    reg = open_registry(home)
    files = list(_iter_files(folder, exts, reg.home))
    added, known, bad = [], [], []
    seen: list[tuple[Path, os.stat_result, str]] = []
    with progress() as prog:
        task = prog.add_task("scanning", total=len(files))
        todo = []
        stats = {}
        for f in files:
            try:
                st = f.stat()
            except OSError as exc:
                bad.append({"path": str(f), "error": exc.strerror or str(exc)})
                prog.advance(task)
                continue
            sha = reg.scan_cache_get(f.resolve(), st)
            entry = reg.find_sha256(sha) if sha else None
            if entry is not None:
                known.append(entry)
                prog.advance(task)
            else:
                todo.append(f)
                stats[f] = st

        def done(path, entry, created, err):
            if err is not None:
                bad.append({"path": str(path), "error": str(err)})
            elif entry is not None:
                (added if created else known).append(entry)
                seen.append((Path(path).resolve(), stats[path], entry["sha256"]))
            else:  # same content as another file of this scan
                known.append(None)
            prog.advance(task)

        reg.add_many(todo, tags=tag or None, copy=not link, callback=done)
    if seen:
        reg.conn.execute("BEGIN IMMEDIATE")
        for path, st, sha in seen:
            reg.scan_cache_put(path, st, sha)
        reg.conn.execute("COMMIT")
    if json_out:
        print_json({"added": [_short(e) for e in added], "already": len(known), "skipped": bad})
        return
    con = console()
    for e in added:
        con.print(f"added {e['name']} ({e['id']}) {e['format']} {e['kind']} {e['base']}")
    for b in bad:
        con.print(f"skipped {b['path']}: {b['error']}")
    con.print(f"{len(files)} file(s): {len(added)} added, {len(known)} already registered, {len(bad)} skipped")


# --------------------------------------------------------------------------- list / search / show
def _search(home, query, type, base, tag, kind, rank_min, rank_max):
    reg = open_registry(home)
    return reg.search(query or None, type=type, base=base, tags=tag or (), kind=kind, rank_min=rank_min,
                      rank_max=rank_max)


@app.command("list")
def list_(
    type: TypeOpt = None,
    base: BaseOpt = None,
    tag: TagOpt = None,
    kind: KindOpt = None,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """List the registry's entries (optionally filtered)."""
    entries = _search(home, None, type, base, tag, kind, None, None)
    if json_out:
        print_json([_short(e) for e in entries])
        return
    con = console()
    if not entries:
        con.print("the registry is empty" if not (type or base or tag or kind) else "no entries match")
        return
    _print_table(con, _entries_table(entries))


@app.command()
def search(
    query: Annotated[Optional[str], typer.Argument(help="Words to find in names, triggers, tags, descriptions.")] = None,
    type: TypeOpt = None,
    base: BaseOpt = None,
    tag: TagOpt = None,
    rank_min: Annotated[Optional[int], typer.Option("--rank-min", help="Rank at least this (any layer).")] = None,
    rank_max: Annotated[Optional[int], typer.Option("--rank-max", help="Rank at most this (any layer).")] = None,
    kind: KindOpt = None,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Full-text search (every word, as a prefix) with filters."""
    entries = _search(home, query, type, base, tag, kind, rank_min, rank_max)
    if json_out:
        print_json([_short(e) for e in entries])
        return
    con = console()
    if not entries:
        con.print("no entries match")
        return
    _print_table(con, _entries_table(entries))


def _ancestry(reg, entry_id: str, depth: int = 0, seen: set | None = None) -> list[dict]:
    seen = seen if seen is not None else {entry_id}
    out = []
    for item in reg.lineage(entry_id):
        node = dict(item)
        node["parents"] = []
        pid = item.get("parent_id")
        if pid and pid not in seen and depth < 8:
            seen.add(pid)
            node["parents"] = _ancestry(reg, pid, depth + 1, seen)
        out.append(node)
    return out


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="Entry id, name, or any hash / hash prefix (6+ hex).")],
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Show one entry: hashes, detection, metadata summary, lineage tree, previews, remotes."""
    from lorahub.hashing import display

    reg = open_registry(home)
    e = reg.resolve(ref)
    lineage = _ancestry(reg, e["id"])
    children = reg.children(e["id"])
    previews = reg.previews(e["id"])
    remotes = reg.remotes(e["id"])
    if json_out:
        print_json({**e, "blob": str(reg.object_path(e["sha256"])), "lineage": lineage, "children": children,
                    "previews": previews, "remotes": remotes})
        return
    from rich.table import Table
    from rich.tree import Tree

    con = console()
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    rows = [
        ("id", e["id"]), ("name", e["name"]), ("file", e["file_name"]),
        ("format", f"{e['format']} ({e['kind']})"), ("base", e["base"]),
        ("rank", _rank_text(e) or "-"), ("alpha", "-" if e["alpha"] is None else f"{e['alpha']:g}"),
        ("parts", ", ".join(e["parts"]) or "-"), ("layers", "-" if e.get("n_layers") is None else str(e["n_layers"])),
    ]
    if e.get("tokens"):
        rows.append(("tokens", ", ".join(e["tokens"])))
    rows += [
        ("type", e["type"] or "-"), ("triggers", ", ".join(e["triggers"]) or "-"), ("tags", ", ".join(e["tags"]) or "-"),
        ("description", (e["description"] or "-")[:500]), ("source", e["source"] or "-"),
        ("size", f"{_human(e['size'])} ({e['size']} bytes)"), ("created", e["created_at"] or "-"), ("added", e["added_at"]),
        ("SHA256", display("sha256", e["sha256"])), ("AutoV1", display("autov1", e["autov1"])),
        ("AutoV2", display("autov2", e["autov2"])), ("AutoV3", display("autov3", e["autov3"])),
        ("CRC32", display("crc32", e["crc32"])), ("BLAKE3", display("blake3", e["blake3"])),
        ("blob", str(reg.object_path(e["sha256"]))),
    ]
    extra = e.get("extra") or {}
    for k in ("author", "preferred_weight", "negative_text", "civitai_base_model", "base_conflict"):
        if extra.get(k) not in (None, ""):
            rows.append((k.replace("_", " "), str(extra[k])))
    if extra.get("sidecars"):
        rows.append(("sidecars", ", ".join(extra["sidecars"])))
    meta = e.get("metadata") or {}
    if meta:
        interesting = [k for k in ("ss_sd_model_name", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                                   "ss_base_model_version", "modelspec.architecture", "modelspec.title") if k in meta]
        rows.append(("metadata", f"{len(meta)} key(s)" + (": " + ", ".join(f"{k}={meta[k][:40]}" for k in interesting)
                                                           if interesting else "")))
    for k, v in rows:
        t.add_row(k, v)
    _print_table(con, t)
    if lineage or children:
        tree = Tree(f"[bold]lineage[/bold] {e['name']} ({e['id']})")

        from rich.markup import escape

        recipes: list[str] = []

        def short(v) -> str:
            text = " ".join(str(v).split())
            return text if len(text) <= 60 else text[:59] + "…"

        def grow(node, items):
            for it in items:
                label = it["parent_name"] + f" ({it['parent_id']})" if it.get("parent_name") else it["parent"]
                detail = dict(it.get("detail") or {})
                recipe = detail.pop("recipe", None)
                if isinstance(recipe, str) and recipe not in recipes:
                    recipes.append(recipe)
                dtxt = (" " + ", ".join(f"{k}={short(v)}" for k, v in list(detail.items())[:4])) if detail else ""
                sub = node.add(escape(f"{it['relation']} {label}{dtxt}"))
                grow(sub, it.get("parents") or [])

        grow(tree, lineage)
        for c in children:
            tree.add(escape(f"used by {c['name']} ({c['entry_id']}) as {c['relation'].replace('-from', '')} source"))
        con.print(tree)
        for recipe in recipes:
            con.print("[bold]recipe[/bold]")
            con.print(escape(recipe.rstrip()), highlight=False)
    if previews:
        con.print("[bold]previews[/bold]")
        for p in previews:
            size = f" {p['width']}x{p['height']}" if p.get("width") else ""
            params = p.get("params") or {}
            ptxt = (" " + ", ".join(f"{k}={v}" for k, v in list(params.items())[:5])) if params else ""
            con.print(f"  {p['kind']}{size}: {p['path']}{ptxt}")
    if remotes:
        con.print("[bold]remotes[/bold]")
        for r in remotes:
            con.print(f"  {r['repo']}@{r['revision'] or '-'} commit {r['commit'] or '-'}"
                      + (f" on {r['endpoint']}" if r.get("endpoint") else ""))


# --------------------------------------------------------------------------- edit
@app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": False})
def tag(
    ref: Annotated[str, typer.Argument(help="Entry id, name or hash prefix.")],
    changes: Annotated[List[str], typer.Argument(help="+TAG adds, -TAG removes (a bare TAG adds).")],
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Add and remove tags: `lorahub tag ID +style +anime -wip`."""
    from lorahub.errors import LorahubError

    add, remove = [], []
    for ch in changes:
        t = ch[1:].strip() if ch[:1] in "+-" else ch.strip()
        if not t:
            raise LorahubError(f"empty tag in {ch!r}")
        (remove if ch.startswith("-") else add).append(t)
    reg = open_registry(home)
    e = reg.change_tags(reg.resolve(ref)["id"], add=add, remove=remove)
    if json_out:
        print_json({"id": e["id"], "tags": e["tags"]})
    else:
        console().print(f"{e['name']} ({e['id']}): tags {', '.join(e['tags']) or '(none)'}")


@app.command()
def edit(
    ref: Annotated[str, typer.Argument(help="Entry id, name or hash prefix.")],
    name: Annotated[Optional[str], typer.Option("--name", help="New name (must be unused).")] = None,
    type: TypeOpt = None,
    base: BaseOpt = None,
    trigger: Annotated[Optional[List[str]], typer.Option("--trigger", help="Replace the trigger tokens (repeat).")] = None,
    description: Annotated[Optional[str], typer.Option("--description", help="New description.")] = None,
    source: Annotated[Optional[str], typer.Option("--source", help="New source.")] = None,
    clear_type: Annotated[bool, typer.Option("--clear-type", help="Unset the LoRA type.")] = False,
    clear_triggers: Annotated[bool, typer.Option("--clear-triggers", help="Remove every trigger token.")] = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Change an entry's name, type, base, triggers, description or source."""
    from lorahub.errors import LorahubError

    fields: dict = {}
    if name is not None:
        fields["name"] = name
    if type is not None:
        fields["type"] = type
    if clear_type:
        fields["type"] = None
    if base is not None:
        fields["base"] = base
    if trigger:
        fields["triggers"] = trigger
    if clear_triggers:
        fields["triggers"] = []
    if description is not None:
        fields["description"] = description
    if source is not None:
        fields["source"] = source
    if not fields:
        raise LorahubError("nothing to change: give --name, --type, --base, --trigger, --description or --source")
    reg = open_registry(home)
    e = reg.update(reg.resolve(ref)["id"], **fields)
    if json_out:
        print_json(_short(e))
    else:
        console().print(f"updated {e['name']} ({e['id']}): " + ", ".join(sorted(fields)))


@app.command()
def rm(
    ref: Annotated[str, typer.Argument(help="Entry id, name or hash prefix.")],
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Remove an entry from the catalogue (its stored file stays until `lorahub gc`)."""
    reg = open_registry(home)
    e = reg.remove(reg.resolve(ref)["id"])
    if json_out:
        print_json({"removed": _short(e)})
    else:
        console().print(f"removed {e['name']} ({e['id']}); its blob stays until `lorahub gc`")


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Delete stored blobs no entry refers to, and .lorahub-tmp-* leftovers of interrupted writes."""
    reg = open_registry(home)
    res = reg.gc(dry_run=dry_run)
    if json_out:
        print_json(res)
        return
    verb = "would remove" if dry_run else "removed"
    console().print(f"{verb} {len(res['blobs'])} unreferenced blob(s) and {len(res['temp_files'])} temp file(s), "
                    f"{_human(res['bytes'])}")


# --------------------------------------------------------------------------- export / dupes / verify
def _safe_filename(name: str) -> str:
    import re

    s = re.sub(r"[^\w.\-()+\[\] ]", "_", name).strip(" .")
    s = re.sub(r"\.{2,}", ".", s)
    return s[:150] or "lora"


@app.command()
def export(
    ref: Annotated[str, typer.Argument(help="Entry id, name or hash prefix.")],
    dest: Annotated[Path, typer.Argument(help="Destination folder (created if missing).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite different files of the same name.")] = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Copy an entry out under a readable name, with a webui .json sidecar and its preview."""
    import json
    import shutil

    from lorahub.errors import LorahubError
    from lorahub.fsutil import atomic_path, atomic_write_text, is_within
    from lorahub.hashing import sha256_file
    from lorahub.metadata import webui_sidecar

    reg = open_registry(home)
    e = reg.resolve(ref)
    blob = reg.blob_path(e)
    if dest.exists() and not dest.is_dir():
        raise LorahubError(f"{dest}: exists and is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    stem = _safe_filename(e["name"])
    suffix = Path(e["file_name"]).suffix.lower()
    if suffix not in (".safetensors", ".pt", ".ckpt", ".bin"):
        suffix = ".safetensors"
    if stem.lower().endswith(suffix):
        stem = stem[: -len(suffix)] or "lora"
    targets = {"file": dest / f"{stem}{suffix}", "json": dest / f"{stem}.json"}
    previews = reg.previews(e["id"])
    if previews:
        order = {"sidecar": 0, "cover": 1}
        p = sorted(previews, key=lambda x: (order.get(x["kind"], 2), x["id"]))[0]
        targets["preview"] = dest / f"{stem}.preview.{p['ext']}"
        preview_src = Path(p["path"])
    for t in targets.values():
        if not is_within(t, dest) or t.is_symlink():
            raise LorahubError(f"{t}: refusing to write outside {dest}")
    if targets["file"].exists() and not force and sha256_file(targets["file"]) != e["sha256"]:
        raise LorahubError(f"{targets['file']} exists with other content; use --force to overwrite")
    written = []

    def copy(src: Path, dst: Path) -> None:
        with atomic_path(dst, mode=0o644) as tmp:
            shutil.copyfile(src, tmp)
        written.append(str(dst))

    if not (targets["file"].exists() and sha256_file(targets["file"]) == e["sha256"]):
        copy(blob, targets["file"])
    else:
        written.append(str(targets["file"]))
    sidecar = webui_sidecar(e)
    if targets["json"].exists() and not force:
        try:
            same = json.loads(targets["json"].read_text(encoding="utf-8")) == sidecar
        except (OSError, ValueError):
            same = False
        if not same:
            raise LorahubError(f"{targets['json']} exists with other content; use --force to overwrite")
    atomic_write_text(targets["json"], json.dumps(sidecar, indent=4, ensure_ascii=False) + "\n", mode=0o644)
    written.append(str(targets["json"]))
    if "preview" in targets:
        if not preview_src.is_file():
            raise LorahubError(f"the preview blob {preview_src} is missing; run `lorahub verify`")
        copy(preview_src, targets["preview"])
    if json_out:
        print_json({"id": e["id"], "written": written})
    else:
        con = console()
        con.print(f"exported {e['name']} ({e['id']}) to {dest}:")
        for w in written:
            con.print(f"  {w}")


@app.command()
def dupes(json_out: JsonOpt = False, home: HomeOpt = None) -> None:
    """Entries with the same tensors (same AutoV3) under other names or metadata."""
    reg = open_registry(home)
    groups = reg.dupes()
    if json_out:
        print_json([{"autov3": g[0]["autov3"], "entries": [_short(e) for e in g]} for g in groups])
        return
    con = console()
    if not groups:
        con.print("no duplicates (no two entries share their tensor data)")
        return
    for g in groups:
        con.print(f"AutoV3 {g[0]['autov3'][:12]}: " + ", ".join(f"{e['name']} ({e['id']})" for e in g))
    con.print(f"{len(groups)} group(s) of entries with identical tensors")


@app.command()
def verify(json_out: JsonOpt = False, home: HomeOpt = None,
           repair: Annotated[bool, typer.Option("--repair", help="Re-fetch missing or corrupt blobs from the "
                                                "entry's recorded source file or Hub remote when possible.")] = False,
           ) -> None:
    """Re-hash every stored blob; report missing or corrupt ones (exit 1 if any remain)."""
    reg = open_registry(home)
    n = reg.conn.execute("SELECT (SELECT count(*) FROM entries) + (SELECT count(*) FROM previews)").fetchone()[0]
    with progress() as prog:
        task = prog.add_task("verifying", total=n)
        problems = reg.verify(progress=lambda _r: prog.advance(task))
    if repair and problems:
        from lorahub.repair import repair as do_repair

        problems = do_repair(reg, problems)
    remaining = [p for p in problems if not p.get("repaired")]
    if json_out:
        print_json({"checked": n, "problems": problems, "remaining": len(remaining)})
    else:
        con = console()
        for p in problems:
            fixed = f" -> repaired from {p['from']}" if p.get("repaired") else (
                " -> no source could restore it" if repair else "")
            con.print(f"{p['problem']}: {p['what']} {p['name']} ({p['id']}) sha256 {p['sha256']}{fixed}")
        con.print(f"checked {n} blob(s): {len(problems)} problem(s)"
                  + (f", {len(problems) - len(remaining)} repaired" if repair else ""))
    if remaining:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- demo
@app.command()
def demo(ctx: typer.Context, home: HomeOpt = None) -> None:
    """Build the tiny fixtures, add them to a registry (default: a fresh temp home, even when
    LORAHUB_HOME is set; give --home to use another), search and show one."""
    import tempfile
    import time

    from lorahub.errors import LorahubError

    try:
        source = ctx.get_parameter_source("home")
    except Exception:  # pragma: no cover - older click
        source = None
    if getattr(source, "name", "") == "ENVIRONMENT":
        home = None  # never fill a real registry with demo entries by accident
    t0 = time.perf_counter()
    con = console()
    home = Path(home) if home else Path(tempfile.mkdtemp(prefix="lorahub-demo-"))
    con.print(f"[bold]lorahub demo[/bold] — registry home: {home}")
    from lorahub import tiny

    for kind in ("sd1", "sdxl"):
        path = tiny.ensure(kind)
        con.print(f"tiny {kind} pipeline: {path}")
    try:
        from lorahub.tiny_loras import write_all
    except ImportError:
        raise LorahubError("lorahub.tiny_loras is not available in this installation") from None
    import shutil

    work = Path(tempfile.mkdtemp(prefix="lorahub-demo-files-"))
    reg = open_registry(home)
    entries = []
    tags_for = {"sd1": "demo-sd1", "sdxl": "demo-sdxl"}
    try:
        files = write_all(work)
        con.print(f"wrote {len(files)} small LoRA files of every dialect to {work}")
        for label, path in sorted(files.items()):
            try:
                entry, created = reg.add_file(path, name=label, tags=["demo"], source="lorahub demo (tiny fixtures)")
            except LorahubError as exc:
                con.print(f"  could not add {label}: {exc}")
                continue
            if entry["base"] in tags_for and tags_for[entry["base"]] not in entry["tags"]:
                entry = reg.update(entry["id"], tags=entry["tags"] + [tags_for[entry["base"]]])
            entries.append(entry)
            con.print(f"  $ lorahub add {Path(path).name}  -> {entry['id']} {entry['format']} {entry['kind']} "
                      f"{entry['base']} rank {_rank_text(entry) or '-'}" + ("" if created else " (already there)"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print_table(con, _entries_table(entries, title=f"lorahub list ({len(entries)} entries)"))
    with_triggers = [e for e in entries if e["triggers"]]
    searches = [("", {"base": "sdxl"}), ("", {"kind": "loha"})]
    if with_triggers:
        searches.insert(0, (with_triggers[0]["triggers"][0], {}))
    for q, kw in searches:
        hits = reg.search(q or None, **kw)
        opts = " ".join(f"--{k} {v}" for k, v in kw.items())
        con.print(f"$ lorahub search {q} {opts}".replace("  ", " ").rstrip()
                  + f"  -> {len(hits)} hit(s): " + ", ".join(h["name"] for h in hits))
    if entries:
        first = (with_triggers or entries)[0]
        con.print(f"$ lorahub show {first['autov2']}")
        show(first["autov2"], json_out=False, home=home)
    by_name = {e["name"]: e for e in entries}
    if "sd1-kohya" in by_name and "sd1-diffusers" in by_name:
        _demo_ml(con, home, by_name["sd1-kohya"], by_name["sd1-diffusers"])
    con.print(f"done in {time.perf_counter() - t0:.1f} s; try: lorahub list --home {home}")


def _demo_ml(con, home: Path, kohya: dict, diffusers: dict) -> None:
    """The ML half of the demo: run real commands on the tiny fixtures, as a user would type them."""
    from lorahub.cli.app import _load_commands, app

    _load_commands()
    out = home / "demo-outputs"
    out.mkdir(parents=True, exist_ok=True)
    k, d = kohya["id"], diffusers["id"]
    steps = [
        ["convert", k, "--to", "diffusers", "--out", str(out / "sd1-kohya.diffusers.safetensors"), "--register"],
        ["inspect", k, "--top", "5", "--plot", str(out / "sd1-kohya.heatmap.png")],
        ["diff", k, d, "--top", "5"],
        ["merge", f"{k}:0.8", f"{d}:-0.5", "--rank", "4", "--out", str(out / "merged.safetensors"), "--register"],
        ["sweep", k, "--base", "tiny-sd1", "--prompt", "a portrait", "--alphas", "0,0.5,1", "--seeds", "1,2",
         "--steps", "2", "--size", "64", "--out", str(out / "sweep.png"), "--gif", str(out / "sweep.gif")],
    ]
    con.print("\n[bold]ML operations on the tiny fixtures[/bold] (outputs in " + str(out) + ")")
    for args in steps:
        con.print("[bold]$ lorahub " + " ".join(args) + "[/bold]", highlight=False)
        app(args=args + ["--home", str(home)], prog_name="lorahub", standalone_mode=False)
