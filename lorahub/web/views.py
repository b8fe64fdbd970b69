"""What each page of the gallery shows, as plain data built from the registry (no HTTP, no HTML).

* :func:`gallery` — a page of cards for a :class:`GalleryQuery` (the same full-text search and
  filters as ``lorahub search``; sorted, paged: one page reads only its own rows);
* :func:`entry_page` — everything about one entry: hashes, triggers, metadata tables, previews and
  sweeps, lineage graph, remotes, the entries made from it;
* :func:`compare_page` — two or more entries side by side;
* :func:`heatmap`, :func:`layer_rows`, :func:`tag_bars`, :func:`diff_rows` — the parts of an
  ``inspect`` / ``diff`` result the pages draw.

Everything returned is data for the templates, which escape every string they print.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import PurePosixPath
from typing import Callable, Mapping
from urllib.parse import quote, urlencode

from lorahub.registry import queries
from lorahub.registry.queries import rank_text
from lorahub.vocab import BASES, LORA_SUFFIXES, LORA_TYPES

PAGE_SIZE = 48
MAX_QUERY = 200            # characters of a search kept
MAX_PAGE = 1_000_000
MAX_COMPARE = 6
SORTS = {"relevance": "best match", "added": "newest", "name": "name", "size": "largest", "rank": "highest rank"}
HASH_LABELS = (("sha256", "SHA256"), ("autov2", "AutoV2"), ("autov1", "AutoV1"), ("autov3", "AutoV3"),
               ("crc32", "CRC32"), ("blake3", "BLAKE3"))
SHORT_VALUE = 160          # characters of a metadata value shown before "more"
LONG_VALUE = 20_000        # characters of a metadata value shown at most
JSON_VALUE = 256 * 1024    # larger JSON values are not parsed for pretty-printing
MAX_LAYER_ROWS = 2000


# --------------------------------------------------------------------------------------------- gallery
@dataclass(frozen=True)
class GalleryQuery:
    """The gallery's search: full text ``q``, filters, sort and page (from the URL's query string)."""

    q: str = ""
    type: str = ""
    base: str = ""
    kind: str = ""
    tag: str = ""
    sort: str = ""      # "" = best match with a query, else newest first
    page: int = 1

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> "GalleryQuery":
        def text(name: str, n: int = 100) -> str:
            return re.sub(r"[\x00-\x1f\x7f]", "", str(params.get(name) or "")).strip()[:n]

        sort = text("sort")
        try:
            page = min(MAX_PAGE, max(1, int(params.get("page") or 1)))
        except ValueError:
            page = 1
        return cls(q=text("q", MAX_QUERY), type=text("type"), base=text("base"), kind=text("kind"),
                   tag=text("tag"), sort=sort if sort in SORTS else "", page=page)

    @property
    def effective_sort(self) -> str:
        if self.sort == "relevance" and not self.q:
            return "added"
        return self.sort or ("relevance" if self.q else "added")

    @property
    def order(self) -> str | None:
        """The registry search order (None: best match first)."""
        s = self.effective_sort
        return None if s == "relevance" else s

    @property
    def filtered(self) -> bool:
        return bool(self.q or self.type or self.base or self.kind or self.tag)

    def url(self, **changes) -> str:
        """The gallery URL of this query with ``changes`` (a changed filter goes back to page 1)."""
        q = replace(self, **changes)
        if "page" not in changes:
            q = replace(q, page=1)
        pairs = [(f.name, getattr(q, f.name)) for f in fields(q)]
        pairs = [(k, v) for k, v in pairs if v and not (k == "page" and v == 1)]
        return "/?" + urlencode(pairs) if pairs else "/"

    def search_args(self) -> dict:
        return {"type": self.type or None, "base": self.base or None, "kind": self.kind or None,
                "tags": [self.tag] if self.tag else []}


@dataclass
class Card:
    entry: dict
    cover: int | None       # preview id of the cover image, None: a drawn placeholder
    rank: str


@dataclass
class Facets:
    """Values present in the registry, with how many entries have each, for the filter menus."""

    types: list[tuple[str, int]]
    bases: list[tuple[str, int]]
    kinds: list[tuple[str, int]]
    tags: list[tuple[str, int]]


@dataclass
class Gallery:
    query: GalleryQuery
    cards: list[Card]
    total: int              # entries matching the query
    registry_size: int      # entries in the registry
    pages: int
    facets: Facets

    @property
    def first(self) -> int:
        return (self.query.page - 1) * PAGE_SIZE + 1 if self.cards else 0

    @property
    def last(self) -> int:
        return self.first + len(self.cards) - 1 if self.cards else 0


def covers(conn, entry_ids: list[str]) -> dict[str, int]:
    """The cover preview of each entry: its newest own picture (sidecar, cover, render, validation image),
    else the newest sweep animation (a card shows its last frame: the strongest α), else the newest grid."""
    if not entry_ids:
        return {}
    marks = ",".join("?" * len(entry_ids))
    out: dict[str, int] = {}
    for r in conn.execute(f"SELECT entry_id, seq FROM previews WHERE entry_id IN ({marks}) "
                          "ORDER BY entry_id, CASE kind WHEN 'animation' THEN 1 WHEN 'grid' THEN 2 ELSE 0 END, "
                          "seq DESC",
                          entry_ids):
        out.setdefault(r["entry_id"], r["seq"])
    return out


def facets(conn, *, max_tags: int = 200) -> Facets:
    """Types, bases, kinds and the most used tags in the registry, with their counts (one pass over the
    catalogue; tags grouped case-insensitively, as the tag filter matches them)."""
    types: Counter = Counter()
    bases: Counter = Counter()
    kinds: Counter = Counter()
    tags: Counter = Counter()
    spelling: dict[str, str] = {}
    cur = conn.cursor()
    cur.row_factory = None  # plain tuples: this loop runs once per distinct combination
    for typ, base, kind, raw, n in cur.execute(
            "SELECT type, base, kind, tags, count(*) FROM entries GROUP BY type, base, kind, tags"):
        types[typ] += n
        bases[base] += n
        kinds[kind] += n
        try:
            words = json.loads(raw) if raw else []
        except ValueError:
            words = []
        for key, word in {w.casefold(): w for w in words if isinstance(w, str) and w}.items():
            tags[key] += n
            spelling[key] = min(spelling.get(key, word), word)

    def ranked(c: Counter, names=None) -> list[tuple[str, int]]:
        items = [((names or {}).get(k, k), n) for k, n in c.items() if k]
        return sorted(items, key=lambda kv: (-kv[1], kv[0]))

    return Facets(types=ranked(types), bases=ranked(bases), kinds=ranked(kinds),
                  tags=ranked(tags, spelling)[:max_tags])


class FacetCache:
    """:func:`facets` of each thread's connection, recomputed only when the catalogue changed (another
    connection committed: ``PRAGMA data_version``; this one wrote: ``total_changes``)."""

    def __init__(self):
        self._local = threading.local()

    def __call__(self, conn) -> Facets:
        key = (id(conn), conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes)
        hit = getattr(self._local, "hit", None)
        if hit is None or hit[0] != key:
            hit = self._local.hit = (key, facets(conn))
        return hit[1]


def gallery(reg, query: GalleryQuery, facets_of: Callable = facets) -> Gallery:
    """One page of the gallery: the cards of the entries matching ``query``, and the filter menus
    (``facets_of(conn)``: :func:`facets`, or a :class:`FacetCache`)."""
    conn = reg.conn
    total = queries.search_count(conn, query.q or None, **query.search_args())
    pages = max(1, math.ceil(total / PAGE_SIZE))
    if query.page > pages:
        query = replace(query, page=pages)
    rows = queries.search(conn, query.q or None, **query.search_args(), limit=PAGE_SIZE,
                          offset=(query.page - 1) * PAGE_SIZE, order=query.order)
    cov = covers(conn, [e["id"] for e in rows])
    cards = [Card(e, cov.get(e["id"]), rank_text(e)) for e in rows]
    return Gallery(query, cards, total, queries.count(conn), pages, facets_of(conn))


# --------------------------------------------------------------------------------------------- entry
@dataclass
class Preview:
    id: int
    kind: str
    width: int | None
    height: int | None
    params: list[tuple[str, str]]
    frames: int = 1
    frame_labels: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    @property
    def animated(self) -> bool:
        return self.frames > 1


@dataclass
class GraphNode:
    key: str
    label: str
    entry_id: str | None    # None: a parent that is not in the registry (a file, a Hub repo)
    x: int
    y: int
    current: bool = False


@dataclass
class GraphEdge:
    x1: int
    y1: int
    x2: int
    y2: int
    relation: str

    @property
    def path(self) -> str:
        mx = (self.x1 + self.x2) / 2
        return f"M{self.x1},{self.y1} C{mx},{self.y1} {mx},{self.y2} {self.x2},{self.y2}"


@dataclass
class Graph:
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    width: int
    height: int
    node_w: int
    node_h: int


@dataclass
class MetaGroup:
    title: str
    rows: list[tuple[str, str, str | None]]     # (key, short value, full value when longer)


@dataclass
class EntryPage:
    entry: dict
    rank: str
    hashes: list[tuple[str, str]]
    lora_tag: str | None            # <lora:stem:α> for the webui prompt
    previews: list[Preview]         # images and renders
    sweeps: list[Preview]           # α sweep grids and animations
    graph: Graph | None
    children: list[dict]
    remotes: list[dict]
    metadata: list[MetaGroup]
    extra: list[tuple[str, str]]
    analysable: bool                # whether an inspect report (heat map, layers) can be made
    types: tuple[str, ...] = LORA_TYPES
    bases: tuple[str, ...] = BASES


def _text(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v, ensure_ascii=False, default=str)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def preview_params(params: dict) -> list[tuple[str, str]]:
    """A preview's parameters as (name, text) rows (LoRAs as ``name α=strength``, lists joined)."""
    rows = []
    for k, v in (params or {}).items():
        if k == "loras" and isinstance(v, list):
            text = ", ".join(f"{x.get('name')}" + (f" α={x['alpha']:g}" if isinstance(x.get("alpha"), (int, float))
                                                   else "") for x in v if isinstance(x, dict))
        elif isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v):
            text = ", ".join(_text(x) for x in v)
        elif v is None or v == "" or v == []:
            continue
        else:
            text = _text(v)
        rows.append((str(k), _clip(text, 600)))
    return rows


def _seeds(params: dict) -> list[int]:
    raw = params.get("seeds") if isinstance(params.get("seeds"), list) else [params.get("seed")]
    return [int(s) for s in raw if isinstance(s, int) and not isinstance(s, bool)]


def make_preview(p: dict, images) -> Preview:
    params = p.get("params") or {}
    pv = Preview(id=p["id"], kind=p["kind"], width=p.get("width"), height=p.get("height"),
                 params=preview_params(params), seeds=_seeds(params))
    if p["kind"] == "animation" or p.get("ext") in ("gif", "webp"):
        pv.frames = images.frame_count(p["sha256"])
    if pv.animated:
        alphas = params.get("alphas")
        if isinstance(alphas, list) and len(alphas) == pv.frames and all(isinstance(a, (int, float)) for a in alphas):
            pv.frame_labels = [f"α = {a:g}" for a in alphas]
        else:
            pv.frame_labels = [f"frame {i + 1}" for i in range(pv.frames)]
    return pv


def lora_tag(entry: dict) -> str | None:
    """The webui prompt token of a LoRA entry: ``<lora:FILE STEM:preferred weight or 1>``."""
    if entry["kind"] in ("textual-inversion", "checkpoint"):
        return None
    stem = PurePosixPath(str(entry.get("file_name") or entry["name"]).replace("\\", "/")).name
    for suffix in LORA_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    w = (entry.get("extra") or {}).get("preferred_weight")
    weight = float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w <= 10 else 1.0
    stem = re.sub(r"[<>:\s]+", "_", stem) or entry["id"]
    return f"<lora:{stem}:{weight:g}>"


def lineage_graph(entry: dict, ancestry: list[dict], children: list[dict], *, node_w: int = 190,
                  node_h: int = 38, gap_x: int = 120, gap_y: int = 18) -> Graph | None:
    """A left-to-right layered drawing: ancestors on the left, the entry, the entries made from it on
    the right; one node per registered entry (or per unregistered parent text), edges labelled by relation."""
    if not ancestry and not children:
        return None
    columns: dict[int, list[str]] = {}
    nodes: dict[str, dict] = {}
    edges: list[tuple[str, str, str]] = []   # (parent key, child key, relation)

    def add(key: str, label: str, entry_id: str | None, depth: int) -> str:
        if key not in nodes:
            nodes[key] = {"label": label, "entry_id": entry_id, "depth": depth}
            columns.setdefault(depth, []).append(key)
        return key

    me = add(entry["id"], entry["name"], entry["id"], 0)

    def grow(child_key: str, items: list[dict], depth: int) -> None:
        for it in items:
            pid = it.get("parent_id")
            key = pid or f"text:{it['parent']}"
            add(key, it.get("parent_name") or it["parent"], pid, depth)
            edges.append((key, child_key, it["relation"]))
            grow(key, it.get("parents") or [], depth - 1)

    grow(me, ancestry, -1)
    for c in children:
        edges.append((me, add(c["entry_id"], c["name"], c["entry_id"], 1), c["relation"]))
    lo = min(columns)
    tallest = max(len(v) for v in columns.values())
    height = tallest * (node_h + gap_y) + gap_y
    out_nodes = {}
    for depth, keys in columns.items():
        x = (depth - lo) * (node_w + gap_x) + 10
        top = (height - len(keys) * (node_h + gap_y) + gap_y) // 2
        for i, key in enumerate(keys):
            n = nodes[key]
            out_nodes[key] = GraphNode(key, n["label"], n["entry_id"], x, top + i * (node_h + gap_y),
                                       current=key == me)
    out_edges = []
    seen = set()
    for pk, ck, rel in edges:
        if (pk, ck, rel) in seen:
            continue
        seen.add((pk, ck, rel))
        p, c = out_nodes[pk], out_nodes[ck]
        out_edges.append(GraphEdge(p.x + node_w, p.y + node_h // 2, c.x, c.y + node_h // 2,
                                   rel.removesuffix("-from")))
    width = (max(columns) - lo + 1) * (node_w + gap_x) - gap_x + 20
    return Graph(list(out_nodes.values()), out_edges, width, height, node_w, node_h)


def remote_links(remotes: list[dict]) -> list[dict]:
    """Hub remotes with the page URL of the repo at its commit (only for http(s) endpoints and
    well-formed repo names)."""
    from lorahub.hub.client import DEFAULT_ENDPOINT, REPO_RE

    out = []
    for r in remotes:
        ep = (r.get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
        url = None
        if re.match(r"^https?://[^/\s@]+$", ep) and REPO_RE.match(r.get("repo") or ""):
            rev = r.get("commit") or r.get("revision")
            url = f"{ep}/{r['repo']}" + (f"/tree/{quote(rev, safe='')}" if rev else "")
        out.append({**r, "url": url})
    return out


def _meta_value(v) -> tuple[str, str | None]:
    s = v if isinstance(v, str) else _text(v)
    full = None
    if isinstance(v, str) and len(v) <= JSON_VALUE and v[:1] in "{[":
        try:
            full = json.dumps(json.loads(v), indent=1, ensure_ascii=False)
        except (ValueError, RecursionError):
            full = None
    if full is None and len(s) > SHORT_VALUE:
        full = s
    if full is not None:
        full = _clip(full, LONG_VALUE)
    return _clip(" ".join(s.split()), SHORT_VALUE), full


def metadata_groups(meta: dict) -> list[MetaGroup]:
    """Header metadata as tables: kohya training (``ss_*``), model spec (``modelspec.*``), the rest."""
    groups = {"kohya training (ss_*)": [], "model spec (modelspec.*)": [], "other metadata": []}
    for k in sorted(meta):
        short, full = _meta_value(meta[k])
        if k.startswith("ss_"):
            groups["kohya training (ss_*)"].append((k.removeprefix("ss_"), short, full))
        elif k.startswith("modelspec."):
            groups["model spec (modelspec.*)"].append((k.removeprefix("modelspec."), short, full))
        else:
            groups["other metadata"].append((k, short, full))
    return [MetaGroup(t, rows) for t, rows in groups.items() if rows]


def entry_page(reg, ref: str, images) -> EntryPage:
    """Everything the entry page shows about the entry ``ref`` (id, name or hash prefix)."""
    rec = reg.record(ref)
    from lorahub.hashing import display

    previews, sweeps = [], []
    for p in rec["previews"]:
        pv = make_preview(p, images)
        (sweeps if p["kind"] in ("grid", "animation") else previews).append(pv)
    previews.reverse()  # newest first
    sweeps.reverse()
    extra = [(k.replace("_", " "), _clip(_text(v), 400)) for k, v in sorted((rec.get("extra") or {}).items())
             if isinstance(v, (str, int, float)) and not isinstance(v, bool) and v != ""]
    return EntryPage(
        entry=rec, rank=rank_text(rec),
        hashes=[(label, display(col, rec[col])) for col, label in HASH_LABELS if rec.get(col)],
        lora_tag=lora_tag(rec), previews=previews, sweeps=sweeps,
        graph=lineage_graph(rec, rec["lineage"], rec["children"]), children=rec["children"],
        remotes=remote_links(rec["remotes"]), metadata=metadata_groups(rec.get("metadata") or {}), extra=extra,
        analysable=rec["kind"] != "checkpoint")


# --------------------------------------------------------------------------------------------- compare
@dataclass
class ComparePage:
    entries: list[dict]
    rows: list[tuple[str, list[str]]]       # (field, value per entry)
    seed: int | None
    seeds: list[int]                        # seeds every entry has a preview for
    previews: list[list[Preview]]           # per entry: its previews at ``seed`` (else its newest)
    pairs: list[tuple[dict, dict]]          # (first entry, other entry) for the diff verdicts


def compare_page(reg, refs: list[str], images, seed: int | None = None) -> ComparePage:
    """Two or more entries side by side: their facts, previews at a shared seed, and diff pairs."""
    from lorahub.errors import LorahubError

    entries: list[dict] = []
    for ref in refs:
        e = reg.resolve(ref)
        if all(x["id"] != e["id"] for x in entries):
            entries.append(e)
    if len(entries) < 2:
        raise LorahubError("choose two or more different entries to compare")
    if len(entries) > MAX_COMPARE:
        raise LorahubError(f"compare at most {MAX_COMPARE} entries at once")
    facts = [("kind", lambda e: e["kind"]), ("format", lambda e: e["format"]), ("base", lambda e: e["base"]),
             ("rank", rank_text), ("alpha", lambda e: "" if e["alpha"] is None else f"{e['alpha']:g}"),
             ("layers", lambda e: "" if e.get("n_layers") is None else str(e["n_layers"])),
             ("parts", lambda e: ", ".join(e["parts"])), ("size", lambda e: f"{e['size']:,} bytes"),
             ("type", lambda e: e["type"] or ""), ("triggers", lambda e: ", ".join(e["triggers"])),
             ("tags", lambda e: ", ".join(e["tags"])), ("added", lambda e: e["added_at"])]
    rows = [(label, [_clip(f(e), 300) for e in entries]) for label, f in facts]
    keys = sorted({k for e in entries for k in (e.get("metadata") or {})
                   if k.startswith(("ss_", "modelspec.")) and len(str(e["metadata"][k])) <= 300})
    for k in keys:
        rows.append((k, [_meta_value((e.get("metadata") or {}).get(k, ""))[0] for e in entries]))
    per_entry = [[make_preview(p, images) for p in reg.previews(e["id"])] for e in entries]
    common = set.intersection(*[{s for p in pvs for s in p.seeds} for pvs in per_entry]) if per_entry else set()
    seeds = sorted(common)
    if seed not in common:
        seed = seeds[0] if seeds else None
    shown = []
    for pvs in per_entry:
        stills = [p for p in pvs if not p.animated] or pvs   # a still image shows every seed at once
        at_seed = [p for p in stills if seed in p.seeds] if seed is not None else []
        shown.append(at_seed[-1:] or stills[-1:])
    return ComparePage(entries, rows, seed, seeds, shown, [(entries[0], e) for e in entries[1:]])


# --------------------------------------------------------------------------------------------- analysis
@dataclass
class HeatCell:
    x: int
    y: int
    value: float | None
    text: str
    fill: str
    ink: str


@dataclass
class Heatmap:
    rows: list[str]
    cols: list[str]
    cells: list[HeatCell]
    quantity: str
    vmax: float
    width: int
    height: int
    label_w: int
    cell_w: int
    cell_h: int
    top: int


def _hex(c) -> str:
    return "#%02x%02x%02x" % tuple(c)


def heatmap(grid: dict) -> Heatmap:
    """The per-block heat map of an inspect report's ``grid`` (rows: blocks, columns: layer types),
    coloured as ``lorahub inspect --plot`` colours it."""
    from lorahub.ops.heatmap import EMPTY, _text_colour, colour, fmt, row_label

    rows, cols, values = grid.get("rows") or [], grid.get("cols") or [], grid.get("values") or []
    finite = [v for row in values for v in row if isinstance(v, (int, float)) and math.isfinite(v)]
    vmax = max(finite) if finite else 0.0
    labels = [row_label(r) for r in rows]
    cell_w, cell_h, top = 92, 24, 26
    label_w = 12 + 8 * max((len(x) for x in labels), default=4)
    cells = []
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            x, y = label_w + j * cell_w, top + i * cell_h
            if v is None or not (isinstance(v, (int, float)) and math.isfinite(v)):
                cells.append(HeatCell(x, y, None, "–", _hex(EMPTY), "#787878"))
                continue
            fill = colour(v / vmax if vmax > 0 else 0.0)
            cells.append(HeatCell(x, y, float(v), fmt(v), _hex(fill), _hex(_text_colour(fill))))
    return Heatmap(labels, list(cols), cells, str(grid.get("quantity") or ""), vmax,
                   label_w + cell_w * max(1, len(cols)) + 10, top + cell_h * max(1, len(rows)) + 6,
                   label_w, cell_w, cell_h, top)


def _num(v, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


LAYER_COLUMNS = ("layer", "block", "type", "kind", "shape", "rank", "alpha", "‖ΔW‖_F", "σ₁", "eff. rank 90%",
                 "eff. rank 99%", "‖ΔW‖/‖W0‖")


def layer_rows(report: dict) -> list[list[str]]:
    """The per-layer table of an inspect report, strongest layer (‖ΔW‖_F) first."""
    rows = sorted(report.get("per_layer") or [], key=lambda s: -(s.get("fro") or 0.0))[:MAX_LAYER_ROWS]
    return [[s["key"], s["block"], s["type"], s["kind"], "×".join(str(d) for d in s.get("shape") or []),
             _num(s.get("rank")), _num(s.get("alpha")), _num(s.get("fro")), _num(s.get("spectral")),
             _num(s.get("eff_rank_90")), _num(s.get("eff_rank_99")), _num(s.get("rel_strength"))] for s in rows]


@dataclass
class Bar:
    label: str
    count: int
    y: int
    w: int


def tag_bars(report: dict, *, top: int = 30, width: int = 360, bar_h: int = 18) -> list[Bar]:
    """Training tag frequencies (kohya ``ss_tag_frequency``) as horizontal bars, most frequent first."""
    tags = (report.get("metadata") or {}).get("tags") or []
    tags = [(str(t), int(n)) for t, n in tags[:top]]
    most = max((n for _, n in tags), default=0)
    return [Bar(t, n, i * bar_h, max(2, round(width * n / most)) if most else 2) for i, (t, n) in enumerate(tags)]


DIFF_COLUMNS = ("layer", "cosine", "‖B‖/‖A‖", "overlap out", "overlap in", "status")


def diff_rows(report: dict, top: int = 12) -> list[list[str]]:
    """The strongest shared layers of a diff (by ‖ΔW_A‖·‖ΔW_B‖)."""
    rows = [d for d in report.get("per_layer") or []]
    rows.sort(key=lambda d: -((d.get("norm_a") or 0.0) * (d.get("norm_b") or 0.0)))
    return [[d["key"], _num(d.get("cosine"), 3), _num(d.get("norm_ratio"), 3), _num(d.get("overlap_out"), 3),
             _num(d.get("overlap_in"), 3), d.get("status") or ""] for d in rows[:top]]


def placeholder_colour(base: str) -> str:
    """A card's placeholder colour for a base family (stable across runs)."""
    palette = ("#3b528b", "#21908d", "#5ec962", "#b5de2b", "#440154", "#31688e", "#35b779", "#fde725")
    known = {"sd1": 0, "sd2": 1, "sdxl": 2, "unknown": 4}
    if base in known:
        return palette[known[base]]
    return palette[sum(base.encode()) % len(palette)]

