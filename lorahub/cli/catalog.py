"""Catalogue commands: add scan list search show tag edit rm gc export dupes verify sql.

Argument parsing and printing only: the work is done by :class:`lorahub.registry.Registry` and
:mod:`lorahub.registry.workflows`. Module level imports only typer/stdlib (plus the light
lorahub.cli.common and lorahub.vocab): `lorahub search` must start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lorahub.cli.app import app
from lorahub.cli.common import (HomeOpt, JsonOpt, console, print_json, print_rows, progress, progress_callback,
                                 safe_text, styled)
from lorahub.registry.queries import rank_text, short
from lorahub.vocab import BASES, KINDS, LORA_TYPES

TypeOpt = Annotated[Optional[str], typer.Option("--type", help=f"LoRA type: {'|'.join(LORA_TYPES)}.")]
BaseOpt = Annotated[Optional[str], typer.Option("--base", help=f"Base model family: {'|'.join(BASES)} or other:<name>.")]
BaseModelOpt = Annotated[Optional[str], typer.Option("--base-model", help="Base model inside the family: pony, "
                                                                         "illustrious, noobai, flux-1-dev, ….")]
TagOpt = Annotated[Optional[List[str]], typer.Option("--tag", help="A tag (repeat for several).")]
TriggerOpt = Annotated[Optional[List[str]], typer.Option("--trigger", help="A trigger token (repeat for several).")]
KindOpt = Annotated[Optional[str], typer.Option("--kind", help=f"{'|'.join(KINDS)}.")]


def _open(home: Optional[Path], **kw):
    """Open the registry (``Registry.open`` keywords; lorahub.cli.app words its errors for the command line)."""
    from lorahub.registry import Registry

    return Registry.open(home, **kw)


def _entries(home: Optional[Path], query: str | None = None, **filters) -> list[dict]:
    """Entries matching ``query`` and ``filters``, read-only; a home without a registry has none
    (and is not created)."""
    from lorahub.registry import NoRegistry

    try:
        reg = _open(home, readonly=True)
    except NoRegistry:
        return []
    return reg.search(query, **filters)


def print_table(con, table) -> None:
    if not con.is_terminal:
        con.width = max(con.width, 140)
    con.print(table)


ENTRY_COLUMNS = ("id", "name", "kind", "base", "rank", "type", "triggers", "tags")


def entry_cells(e: dict, limit: int | None = 60) -> list[str]:
    """An entry's values in :data:`ENTRY_COLUMNS` order (triggers and tags cut to ``limit`` characters)."""
    return [e["id"], e["name"], e["kind"], e["base"] + (f" ({e['base_model']})" if e.get("base_model") else ""),
            rank_text(e), e.get("type") or "", ", ".join(e.get("triggers") or [])[:limit],
            ", ".join(e.get("tags") or [])[:limit]]


def entries_table(entries: list[dict], title: str | None = None):
    from rich.table import Table

    t = Table(title=title, show_lines=False, header_style="bold")
    for col in ENTRY_COLUMNS:
        t.add_column(col, overflow="fold")
    for e in entries:
        t.add_row(*entry_cells(e))
    return t


def type_text(e: dict) -> str:
    """The entry's type, and where it came from when lorahub inferred it (extra.type_source)."""
    src = (e.get("extra") or {}).get("type_source") or {}
    if not e["type"]:
        return "-"
    return f"{e['type']} (from {src['from']})" if src.get("type") == e["type"] else e["type"]


def human(n: int | float) -> str:
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
    from lorahub.registry.workflows import check_files

    if name and len(files) > 1:
        raise LorahubError("--name needs exactly one file")
    checked = check_files(files)  # every file before writing anything
    reg = _open(home)
    results = []
    con = console()
    for c in checked:
        f = c.path
        entry, created = reg.add_file(f, name=name, type=type, triggers=trigger or None, tags=tag or None,
                                      base=base, description=description, source=source, sidecars=not no_sidecars,
                                      detection=c.detection)
        results.append({"created": created, **short(entry)})
        if not json_out:
            if created:
                con.print(f"added {entry['name']} ({entry['id']}): {entry['format']} {entry['kind']} "
                          f"{entry['base']} rank {rank_text(entry) or '-'}, {human(entry['size'])}"
                          + (f", triggers: {', '.join(entry['triggers'])}" if entry["triggers"] else ""))
            else:
                con.print(f"{f.name} is already in the registry as {entry['name']} ({entry['id']})")
    if json_out:
        print_json(results)


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
    reg = _open(home)
    with progress() as prog:
        res = reg.scan(folder, exts=ext or None, tags=tag or None, link=link, progress=progress_callback(prog, "scanning"))
    if json_out:
        print_json({"added": [short(e) for e in res.added], "already": res.already, "skipped": res.skipped})
        return
    # plain lines (escaped), not rich: a scan of thousands of files prints one line per new entry
    lines = [f"added {e['name']} ({e['id']}) {e['format']} {e['kind']} {e['base']}" for e in res.added]
    lines += [f"skipped {b['path']}: {b['error']}" for b in res.skipped]
    lines.append(f"{res.files} file(s): {len(res.added)} added, {res.already} already registered, "
                 f"{len(res.skipped)} skipped")
    sys.stdout.write("".join(safe_text(line) + "\n" for line in lines))


# --------------------------------------------------------------------------- list / search / show
def _print_entries(entries: list[dict], json_out: bool, empty: str) -> None:
    if json_out:
        print_json([short(e) for e in entries])
        return
    if not entries:
        print(empty)
        return
    # plain text, not a rich table: a catalogue of hundreds of entries still lists in well under 0.3 s
    print_rows(list(ENTRY_COLUMNS), [entry_cells(e, None) for e in entries])


@app.command("list")
def list_(
    type: TypeOpt = None,
    base: BaseOpt = None,
    base_model: BaseModelOpt = None,
    tag: TagOpt = None,
    kind: KindOpt = None,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """List the registry's entries (optionally filtered)."""
    entries = _entries(home, None, type=type, base=base, tags=tag or (), kind=kind, base_model=base_model)
    _print_entries(entries, json_out, "the registry is empty" if not (type or base or base_model or tag or kind)
                   else "no entries match")


@app.command()
def search(
    query: Annotated[Optional[str], typer.Argument(help="Words to find in names, triggers, tags, descriptions.")] = None,
    type: TypeOpt = None,
    base: BaseOpt = None,
    base_model: BaseModelOpt = None,
    tag: TagOpt = None,
    rank_min: Annotated[Optional[int], typer.Option("--rank-min", help="Rank at least this (any layer).")] = None,
    rank_max: Annotated[Optional[int], typer.Option("--rank-max", help="Rank at most this (any layer).")] = None,
    kind: KindOpt = None,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Full-text search (every word, as a prefix) with filters."""
    entries = _entries(home, query or None, type=type, base=base, tags=tag or (), kind=kind,
                       rank_min=rank_min, rank_max=rank_max, base_model=base_model)
    _print_entries(entries, json_out, "no entries match")


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="Entry id, name, file name or stem (as in <lora:STEM:0.8>), "
                                       "or any hash / hash prefix (6+ hex).")],
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Show one entry: hashes, detection, metadata summary, lineage tree, previews, remotes."""
    from lorahub.hashing import display

    rec = _open(home, readonly=True).record(ref)
    if json_out:
        print_json(rec)
        return
    from rich.table import Table
    from rich.tree import Tree

    e = rec
    lineage, children, previews, remotes = rec["lineage"], rec["children"], rec["previews"], rec["remotes"]
    con = console()
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    rows = [
        ("id", e["id"]), ("name", e["name"]), ("file", e["file_name"]),
        ("format", f"{e['format']} ({e['kind']})"), ("base", e["base"]),
        *([("base model", e["base_model"])] if e.get("base_model") else []),
        ("rank", rank_text(e) or "-"), ("alpha", "-" if e["alpha"] is None else f"{e['alpha']:g}"),
        ("parts", ", ".join(e["parts"]) or "-"), ("layers", "-" if e.get("n_layers") is None else str(e["n_layers"])),
    ]
    if e.get("tokens"):
        rows.append(("tokens", ", ".join(e["tokens"])))
    rows += [
        ("type", type_text(e)), ("triggers", ", ".join(e["triggers"]) or "-"), ("tags", ", ".join(e["tags"]) or "-"),
        ("description", (e["description"] or "-")[:500]), ("source", e["source"] or "-"),
        ("size", f"{human(e['size'])} ({e['size']} bytes)"), ("created", e["created_at"] or "-"), ("added", e["added_at"]),
        ("SHA256", display("sha256", e["sha256"])), ("AutoV1", display("autov1", e["autov1"])),
        ("AutoV2", display("autov2", e["autov2"])), ("AutoV3", display("autov3", e["autov3"])),
        ("CRC32", display("crc32", e["crc32"])), ("BLAKE3", display("blake3", e["blake3"])),
        ("blob", rec["blob"]),
    ]
    extra = e.get("extra") or {}
    for k in ("display_name", "author", "preferred_weight", "negative_text", "civitai_base_model", "base_conflict"):
        if extra.get(k) not in (None, ""):
            rows.append((k.replace("_", " "), str(extra[k])))
    if extra.get("base_evidence"):
        rows.append(("base evidence", "; ".join(str(x) for x in extra["base_evidence"])))
    if extra.get("sidecars"):
        rows.append(("sidecars", ", ".join(extra["sidecars"])))
    if rec["sidecar_files"]:
        rows.append(("kept for export", ", ".join(f"{s['file_name']} ({human(s['size'])})" for s in rec["sidecar_files"])))
    meta = e.get("metadata") or {}
    if meta:
        interesting = [k for k in ("ss_sd_model_name", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                                   "ss_base_model_version", "modelspec.architecture", "modelspec.title") if k in meta]
        rows.append(("metadata", f"{len(meta)} key(s)" + (": " + ", ".join(f"{k}={meta[k][:40]}" for k in interesting)
                                                           if interesting else "")))
    for k, v in rows:
        t.add_row(k, v)
    print_table(con, t)
    if lineage or children:
        tree = Tree(styled(("lineage", "bold"), f" {e['name']} ({e['id']})"))

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
                sub = node.add(f"{it['relation']} {label}{dtxt}")
                grow(sub, it.get("parents") or [])

        grow(tree, lineage)
        for c in children:
            tree.add(f"used by {c['name']} ({c['entry_id']}) as {c['relation'].replace('-from', '')} source")
        con.print(tree)
        for recipe in recipes:
            con.print(styled(("recipe", "bold")))
            con.print(recipe.rstrip())
    if previews:
        con.print(styled(("previews", "bold")))
        for p in previews:
            size = f" {p['width']}x{p['height']}" if p.get("width") else ""
            params = p.get("params") or {}
            ptxt = (" " + ", ".join(f"{k}={v}" for k, v in list(params.items())[:5])) if params else ""
            con.print(f"  {p['kind']}{size}: {p['path']}{ptxt}")
    if remotes:
        con.print(styled(("remotes", "bold")))
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
    reg = _open(home, create=False)
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
    base_model: BaseModelOpt = None,
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
    if base_model is not None:
        fields["base_model"] = base_model
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
    reg = _open(home, create=False)
    e = reg.update(reg.resolve(ref)["id"], **fields)
    if json_out:
        print_json(short(e))
    else:
        console().print(f"updated {e['name']} ({e['id']}): " + ", ".join(sorted(fields)))


@app.command()
def rm(
    ref: Annotated[str, typer.Argument(help="Entry id, name or hash prefix.")],
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Remove an entry from the catalogue (its stored file stays until `lorahub gc`). Works on a full disk."""
    reg = _open(home, create=False, frees_space=True)
    e = reg.remove(reg.resolve(ref)["id"])
    if json_out:
        print_json({"removed": short(e)})
    else:
        console().print(f"removed {e['name']} ({e['id']}); its blob stays until `lorahub gc`")


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete unreferenced blobs even when the catalogue has "
                                        "no entries (a lost or emptied database would otherwise cost every blob).")] = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Delete stored blobs no entry refers to, and .lorahub-tmp-* leftovers of interrupted writes (never a
    file a running lorahub is still writing). Works on a full disk."""
    from lorahub.errors import LorahubError
    from lorahub.registry import EmptyCatalogue

    reg = _open(home, readonly=True) if dry_run else _open(home, create=False, frees_space=True)
    try:
        res = reg.gc(dry_run=dry_run, force=force)
    except EmptyCatalogue as exc:
        raise LorahubError(f"{exc.path}: the catalogue has no entries, so all {exc.blobs} stored blob(s) look "
                           "unreferenced; refusing to delete them (use --force to delete them anyway)") from None
    if json_out:
        print_json(res)
        return
    verb = "would remove" if dry_run else "removed"
    console().print(f"{verb} {len(res['blobs'])} unreferenced blob(s) and {len(res['temp_files'])} temp file(s), "
                    f"{human(res['bytes'])}")


# --------------------------------------------------------------------------- export / dupes / verify / sql
@app.command()
def export(
    ref: Annotated[str, typer.Argument(help="Entry id, name, file name or stem, or hash prefix.")],
    dest: Annotated[Path, typer.Argument(help="Destination folder (created if missing).")],
    stem: Annotated[Optional[str], typer.Option("--stem", help="File name to export as, without suffix (default: "
                                                "the original file's, the LoRA's handle in webui prompts).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite different files of the same name.")] = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Copy an entry out as a webui folder holds it: the file under its original name, the webui .json,
    the .civitai.info and .txt it came with (byte for byte where unchanged) and its preview."""
    from lorahub.errors import LorahubError
    from lorahub.fsutil import WouldOverwrite

    reg = _open(home, readonly=True)
    try:
        res = reg.export(ref, dest, force=force, stem=stem)
    except WouldOverwrite as exc:
        raise LorahubError(f"{exc.path} exists with other content; use --force to overwrite") from None
    if json_out:
        print_json({"id": res.id, "written": [str(w) for w in res.written]})
    else:
        con = console()
        con.print(f"exported {res.name} ({res.id}) to {dest}:")
        for w in res.written:
            con.print(f"  {w}")


@app.command()
def dupes(json_out: JsonOpt = False, home: HomeOpt = None) -> None:
    """Entries with the same tensors (same AutoV3) under other names or metadata."""
    from lorahub.registry import NoRegistry

    try:
        groups = _open(home, readonly=True).dupes()
    except NoRegistry:
        groups = []
    if json_out:
        print_json([{"autov3": g[0]["autov3"], "entries": [short(e) for e in g]} for g in groups])
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
    """Re-hash every stored blob; report missing or corrupt ones (exit 1 if any remain). With --repair,
    also re-register the stored files of a home whose catalogue database was lost."""
    reg = _open(home, recover=True, create=False) if repair else _open(home, readonly=True)
    with progress() as prog:
        res = reg.check(repair=repair, progress=progress_callback(prog, "verifying"))
    remaining = res.remaining
    if json_out:
        print_json({"checked": res.checked, "problems": res.problems, "remaining": len(remaining),
                    "recovered": [short(e) for e in res.recovered]})
    else:
        con = console()
        for e in res.recovered:
            con.print(f"re-registered {e['name']} ({e['id']}) from the store")
        for p in res.problems:
            fixed = f" -> repaired from {p['from']}" if p.get("repaired") else (
                " -> no source could restore it" if repair else "")
            con.print(f"{p['problem']}: {p['what']} {p['name']} ({p['id']}) sha256 {p['sha256']}{fixed}")
        con.print(f"checked {res.checked} blob(s): {len(res.problems)} problem(s)"
                  + (f", {len(res.problems) - len(remaining)} repaired" if repair else ""))
    if remaining:
        raise typer.Exit(1)


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="One SQL statement that returns rows, e.g. "
                                         "\"SELECT name, base, rank FROM entries ORDER BY rank DESC\".")],
    json_out: JsonOpt = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV (a header row, then the rows).")] = False,
    home: HomeOpt = None,
) -> None:
    """Run a read-only SQL query on the catalogue (lorahub.db is a plain SQLite file that sqlite-utils
    and Datasette open too): tables entries, lineage, previews, remotes, scan_cache, entries_fts."""
    from lorahub.errors import LorahubError
    from lorahub.registry.sql import query as run_query

    if json_out and csv_out:
        raise LorahubError("give --json or --csv, not both")
    res = run_query(query, home=home)
    if json_out:
        print_json(res.rows)
        return
    if csv_out:
        import csv
        import sys

        w = csv.writer(sys.stdout, lineterminator="\n")
        if res.columns:
            w.writerow(res.columns)
        w.writerows([row[c] for c in res.columns] for row in res.rows)
        return
    con = console()
    if not res.rows:
        con.print("no rows")
        return
    from rich.table import Table

    t = Table(header_style="bold")
    for c in res.columns:
        t.add_column(c, overflow="fold")
    for row in res.rows:
        t.add_row(*("" if row[c] is None else str(row[c]) for c in res.columns))
    print_table(con, t)
    con.print(f"{len(res.rows)} row(s)")
