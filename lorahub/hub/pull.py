"""Hub LoRAs/embeddings -> registry entries (:func:`pull`), what a repo holds (:func:`list_repo`),
Hub LoRA search (:func:`search`).

Which files are a repo's LoRAs is decided from evidence (:mod:`lorahub.hub.select`): where they lie
(top level before subfolders, ``checkpoint-*`` folders only on request), their headers, the lorahub
card's record of originals and converted copies, and equal ΔW. A card lorahub wrote gives every entry
back whole (name, type, triggers, tags, description, base, preferred weight, base model name); other
cards give their base model, trigger words, tags and license. The repo's images (the card's widget,
``images/``) become previews.

Everything is checked before anything is registered: the repo's file names, the sizes the Hub announces
(against the size limit), the card's YAML, the downloaded bytes (size and LFS sha256 against the
announcement) and the safetensors headers. Downloads go through huggingface_hub into its cache
(``HF_HOME`` / ``HF_HUB_CACHE`` respected); with ``HF_HUB_OFFLINE=1`` a pull works from that cache
alone. A second pull of the same commit registers nothing new.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from lorahub.errors import FormatError, LorahubError
from lorahub.hub import card as cardmod
from lorahub.hub import select
from lorahub.hub.client import check_online, check_repo_id, hub_errors, quiet_client, resolve_endpoint, resolve_token
from lorahub.hub.repo import RepoSource, check_repo_path
from lorahub.metadata import IMAGE_EXTS

DEFAULT_MAX_SIZE_MB = 2048
MAX_PREVIEWS = 8
MAX_PREVIEW_BYTES = 16 * 1024 * 1024
DIFFUSERS_NAME = select.DIFFUSERS_NAME


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``user/name[@rev]`` -> (repo, rev)."""
    repo, _, rev = (spec or "").strip().partition("@")
    check_repo_id(repo)
    if rev == "":
        rev = None
    elif not re.fullmatch(r"[A-Za-z0-9._/-]{1,200}", rev) or ".." in rev:
        raise LorahubError(f"{spec!r}: bad revision {rev!r}")
    return repo, rev


def _arguments(spec: str, file: str | None, include: list[str] | None, endpoint: str | None,
               token_env: str | None) -> tuple:
    """``(repo, revision, endpoint, token, include)`` of a pull or a listing, each checked."""
    repo, rev = parse_spec(spec)
    ep = resolve_endpoint(endpoint)
    token = resolve_token(token_env)
    if file is not None:
        check_repo_path(file)
    return repo, rev, ep, token, _check_patterns(include)


def _check_patterns(include: list[str] | None) -> list[str] | None:
    if not include:
        return None
    out = []
    for pat in include:
        if not isinstance(pat, str) or not pat.strip() or len(pat) > 200 or any(ord(c) < 32 for c in pat):
            raise LorahubError(f"include pattern {pat!r}: expected a glob such as 'checkpoint-*/*.safetensors'")
        out.append(pat.strip())
    return out


@dataclass
class PullResult:
    """What :func:`pull` registered: ``entries`` (id, name, file, created, kind, base, type), the files
    ``skipped`` (file, why), the ``previews`` imported (file, entry), the card's fields, and whether it
    ran ``offline`` from the Hugging Face cache."""

    repo: str
    revision: str
    commit: str
    endpoint: str
    entries: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    previews: list[dict] = field(default_factory=list)
    card: dict = field(default_factory=dict)
    offline: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RepoListing:
    """What :func:`list_repo` found: every file of the revision (path, size, sha256, and for the
    candidates kind/format/base/rank and what a pull would do with it: ``register`` with the entry
    name, ``skip`` with why, ``preview``, or ``other``), and the card's fields."""

    repo: str
    revision: str
    commit: str
    endpoint: str
    files: list[dict] = field(default_factory=list)
    card: dict = field(default_factory=dict)
    offline: bool = False
    gated: bool = False

    @property
    def register(self) -> list[dict]:
        return [f for f in self.files if f["action"] == "register"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["register"] = [f["path"] for f in self.register]
        return d


@dataclass
class HubLora:
    """A Hub model found by :func:`search`; ``kind`` is ``textual-inversion`` for embedding repos."""

    repo: str
    base_model: str | None
    family: str | None
    downloads: int | None
    likes: int | None
    updated: str | None
    tags: list[str] = field(default_factory=list)
    kind: str = "lora"

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------- pull
def pull(spec: str, *, registry=None, file: str | None = None, include: list[str] | None = None,
         type: str | None = None, tags: list[str] | None = None, endpoint: str | None = None,
         token_env: str | None = None, max_size_mb: float = DEFAULT_MAX_SIZE_MB, previews: bool = True,
         progress=None) -> PullResult:
    """Download the LoRAs/embeddings of ``spec`` (``user/name[@revision]``) and register them
    (lineage: pulled-from ``repo@commit``) with what the card says about them.

    ``file``: only this file of the repo; ``include``: the files matching these glob patterns
    (several files, ``checkpoint-*`` folders); neither: the repo's LoRAs as
    :mod:`lorahub.hub.select` decides. ``type``: the registry type of the entries (default: the
    card's); ``tags``: extra tags. ``previews``: import the repo's images as previews. ``token_env``:
    the environment variable holding the token (default: huggingface_hub's own lookup). Files over
    ``max_size_mb`` MiB are refused. ``progress()`` is called per downloaded file. With
    ``HF_HUB_OFFLINE=1`` the revision (a full commit sha, or a ref pulled before) is read from the
    Hugging Face cache. ``registry``: a Registry, a home folder or None (the default home).
    """
    from lorahub.refs import LazyRegistry
    from lorahub.vocab import LORA_TYPES

    if type is not None and type not in LORA_TYPES:
        raise LorahubError(f"type {type!r}: expected one of {', '.join(LORA_TYPES)}")
    repo, rev, ep, token, include = _arguments(spec, file, include, endpoint, token_env)
    if file is not None and include:
        raise LorahubError("pull: give a file or include patterns, not both")
    src = RepoSource.open(repo, rev, endpoint=ep, token=token)
    with LazyRegistry.using(registry) as regs:
        return _pull(regs, src, file=file, include=include, type=type, tags=tags,
                     max_bytes=int(max_size_mb * 1024 * 1024), max_size_mb=max_size_mb, previews=previews,
                     progress=progress)


def _card(src: RepoSource) -> tuple[dict, dict]:
    """(card fields, marker) of the revision."""
    meta, text = src.card()
    return cardmod.card_fields(meta), cardmod.read_marker(meta, text)


def _images(src: RepoSource, fields: dict, marker: dict) -> list[tuple[str, dict]]:
    """The repo's preview images: (path, params) from the lorahub card, the widget, else ``images/``."""
    out: dict[str, dict] = {}
    for p, m in marker.items():
        if m.role == "preview" and p in src.files:
            out[p] = dict(m.params)
    for text, url in fields["widget"]:
        p = url.split(f"/resolve/{src.revision}/", 1)[-1] if "://" in url else url.lstrip("/")
        if p in src.files and p not in out:
            out[p] = {"prompt": text} if text else {}
    if not out:
        for p in sorted(src.files):
            folder = PurePosixPath(p).parts[:-1]
            if folder in ((), ("images",)):
                out[p] = {}
    keep = []
    for p, params in out.items():
        rf = src.files[p]
        if p.lower().endswith(IMAGE_EXTS) and (rf.size is None or rf.size <= MAX_PREVIEW_BYTES):
            keep.append((p, params))
    return keep[:MAX_PREVIEWS]


def _pull(regs, src: RepoSource, *, file, include, type, tags, max_bytes, max_size_mb, previews,
          progress) -> PullResult:
    from lorahub.formats.detect import detect
    from lorahub.lineage import register_derived

    fields, marker = _card(src)
    ch = select.choose(src, file=file, include=include, marker=marker)
    for p in ch.chosen:
        size = src.files[p].size
        if size is not None and size > max_bytes:
            raise LorahubError(f"pull: {p} is {size / 2**20:.0f} MiB, over the size limit of {max_size_mb:g} MiB")
    local: dict[str, Path] = {}
    for p in ch.chosen:
        local[p] = src.fetch(p, max_bytes=max_bytes)
        if progress is not None:
            progress()
    # every file's full header before anything is registered
    dets = {}
    for p, lp in local.items():
        try:
            dets[p] = detect(lp)
        except FormatError as exc:
            raise FormatError(f"pull: {p}: {exc}; nothing registered") from None
    if ch.pairs:
        from lorahub.formats.io import load_lora

        select.resolve_pairs(ch, lambda p: load_lora(local[p]))
    images = []
    if previews:
        for p, params in _images(src, fields, marker):
            try:
                images.append((p, src.fetch(p, max_bytes=MAX_PREVIEW_BYTES), params))
            except LorahubError as exc:
                ch.skipped.append({"file": p, "why": f"preview not imported: {exc}"})

    reg = regs.get()
    repo, commit, ep, rev = src.repo, src.commit, src.endpoint, src.revision
    n_emb = sum(1 for p in ch.chosen if dets[p].kind == "textual-inversion")
    results, made = [], {}
    for p in ch.chosen:
        lp, det = local[p], dets[p]
        m = ch.marked.get(p)
        rec = m.entry if m is not None and m.entry is not None and m.sha256 == src.files[p].sha256 else None
        is_emb = det.kind == "textual-inversion"
        extra = {"hub": {"repo": repo, "revision": rev, "commit": commit, "endpoint": ep, "file": p}}
        if rec is not None:   # a lorahub card: the entry as it was pushed
            extra.update(rec["extra"])
            base_model = rec.get("base_model")
            name = rec.get("name")
            triggers, tags_ = rec["triggers"] or None, rec["tags"]
            etype, base, desc = type or rec.get("type"), rec.get("base"), rec.get("description")
        else:
            for k in ("license", "license_name", "license_link", "base_model"):
                if fields[k]:
                    extra[k] = fields[k]
            name = select.entry_name(repo, p, det, n_emb)
            triggers = None if is_emb else fields["triggers"]
            tags_ = fields["tags"]
            etype, desc = type or fields["type"], None
            base = fields["family"] if det.base == "unknown" else None
            base_model = fields["base_model_name"] if fields["family"] in (base, det.base) else None
        entry, created = register_derived(
            reg, lp, relation="pulled-from", parents=[f"{repo}@{commit}"],
            detail={"repo": repo, "revision": rev, "commit": commit, "file": p, "endpoint": ep},
            name=name, type=etype, triggers=triggers, tags=list(tags_) + [t for t in (tags or []) if t],
            base=base, description=desc, source=f"{repo}@{commit}", sidecars=False, extra=extra)
        # the base model the card names: a lorahub card's is the pushed entry's own; another card's
        # repo id only fills what the file does not say
        if created and base_model and base_model != entry.get("base_model") \
                and (rec is not None or not entry.get("base_model")):
            entry = reg.update(entry["id"], base_model=base_model)
        if created or not any(r.get("repo") == repo and r.get("commit") == commit and r.get("endpoint") == ep
                              for r in reg.remotes(entry["id"])):
            reg.set_remote(entry["id"], repo=repo, revision=rev, commit=commit, endpoint=ep)
        made[p] = entry
        results.append({"id": entry["id"], "name": entry["name"], "file": p, "created": created,
                        "kind": entry.get("kind"), "base": entry.get("base"), "type": entry.get("type")})
    imported = []
    if images:
        by_sha = {e["sha256"]: e for e in made.values()}
        nets = [e for e in made.values() if e.get("kind") != "textual-inversion"] or list(made.values())
        for p, lp, params in images:
            m = marker.get(p)
            owners = [by_sha[m.from_sha256]] if m is not None and m.from_sha256 in by_sha else nets
            for e in owners:
                try:
                    reg.add_preview(e["id"], lp, kind="hub", params={**params, "hub": f"{repo}@{commit}:{p}"})
                except LorahubError as exc:
                    ch.skipped.append({"file": p, "why": f"preview not imported: {exc}"})
                    break
                imported.append({"file": p, "entry": e["id"]})
    card = {k: v for k, v in fields.items() if v and k != "widget"}
    if marker:
        card["lorahub"] = True
    return PullResult(repo=repo, revision=rev, commit=commit, endpoint=ep, entries=results, skipped=ch.skipped,
                      previews=imported, card=card, offline=src.offline)


# ---------------------------------------------------------------------------------------- list
def list_repo(spec: str, *, file: str | None = None, include: list[str] | None = None,
              endpoint: str | None = None, token_env: str | None = None) -> RepoListing:
    """What the revision ``spec`` (``user/name[@revision]``) holds and what :func:`pull` with the same
    ``file`` / ``include`` would register, read from the tree, the card and the safetensors headers
    only (no weights are downloaded). Offline (``HF_HUB_OFFLINE=1``): from the Hugging Face cache."""
    from lorahub.metadata import collect

    repo, rev, ep, token, include = _arguments(spec, file, include, endpoint, token_env)
    src = RepoSource.open(repo, rev, endpoint=ep, token=token)
    fields, marker = _card(src)
    ch = select.choose(src, file=file, include=include, marker=marker)
    images = {p for p, _ in _images(src, fields, marker)}
    n_emb = sum(1 for p in ch.chosen if ch.detections[p].kind == "textual-inversion")
    skipped = {s["file"]: s["why"] for s in ch.skipped}
    pairs = {}
    for a, b in ch.pairs:
        pairs.setdefault(b, a)
    rows = []
    for p in sorted(src.files):
        rf = src.files[p]
        row: dict = {"path": p, "size": rf.size, "sha256": rf.sha256}
        det = ch.detections.get(p)
        if det is not None:
            row.update({"kind": det.kind, "format": det.format, "base": det.base, "rank": det.rank})
        m = marker.get(p)
        if m is not None:
            row["card_role"] = m.role
        if p in ch.chosen:
            rec = m.entry if m is not None and m.entry is not None and m.sha256 == rf.sha256 else None
            row["action"] = "register"
            row["name"] = (rec or {}).get("name") or select.entry_name(repo, p, det, n_emb) or \
                collect(Path(p), det.metadata, sidecars=False).name or PurePosixPath(p).name.rsplit(".", 1)[0]
            if p in pairs:
                row["why"] = f"compared with {pairs[p]} by ΔW when pulling (one is left out if they are equal)"
        elif p in skipped:
            row.update({"action": "skip", "why": skipped[p]})
        elif p in images:
            row["action"] = "preview"
        else:
            row["action"] = "other"
        rows.append(row)
    card = {k: v for k, v in fields.items() if v and k != "widget"}
    if marker:
        card["lorahub"] = True
    return RepoListing(repo=repo, revision=src.revision, commit=src.commit, endpoint=ep, files=rows, card=card,
                       offline=src.offline, gated=src.gated)


# ---------------------------------------------------------------------------------------- search
SEARCH_FILTERS = (["lora"], ["textual_inversion"], ["textual-inversion"])


def search(query: str | None, *, endpoint: str | None = None, token_env: str | None = None, limit: int = 20,
           base_model: str | None = None, author: str | None = None) -> list[HubLora]:
    """Hub models matching ``query`` that are LoRAs (tag ``lora``: diffusers and kohya repos alike)
    or textual inversions (``textual_inversion``), most downloaded first; ``base_model`` /
    ``author`` narrow the search."""
    ep = resolve_endpoint(endpoint)
    token = resolve_token(token_env)
    if limit < 1 or limit > 1000:
        raise LorahubError("limit must be between 1 and 1000")
    check_online("search")
    quiet_client()
    from huggingface_hub import HfApi

    api = HfApi(endpoint=ep, token=token, library_name="lorahub")
    found: dict[str, HubLora] = {}
    with hub_errors("search", endpoint=ep, token=token):
        for filters in SEARCH_FILTERS:
            flt = list(filters) + ([f"base_model:{base_model}"] if base_model else [])
            for m in api.list_models(search=query or None, filter=flt, author=author, limit=limit,
                                     sort="downloads", cardData=True):
                if m.id in found:
                    continue
                cd = m.card_data
                bm = None
                if cd is not None:
                    bm = cd.get("base_model") if isinstance(cd, dict) else getattr(cd, "base_model", None)
                if isinstance(bm, list):
                    bm = bm[0] if bm else None
                all_tags = list(m.tags or [])
                tags = [t for t in all_tags if t not in cardmod.HUB_TAGS and ":" not in t]
                kind = "textual-inversion" if any(t in cardmod.TI_TAGS for t in all_tags) else "lora"
                found[m.id] = HubLora(repo=m.id, base_model=bm if isinstance(bm, str) else None,
                                      family=cardmod.base_family(bm), downloads=m.downloads, likes=m.likes,
                                      tags=tags[:8], kind=kind,
                                      updated=m.last_modified.strftime("%Y-%m-%d") if m.last_modified else None)
    rows = sorted(found.values(), key=lambda r: (-(r.downloads or 0), r.repo))
    return rows[:limit]
