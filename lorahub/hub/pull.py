"""Hub LoRAs/embeddings -> registry entries (:func:`pull`); Hub LoRA search (:func:`search`).

Everything is checked before anything is registered: the repo's file names (no ``..``, no absolute or
Windows paths, no control characters), the sizes the Hub announces (against the size limit), the card's
YAML, the downloaded bytes (size and LFS sha256 against the announcement) and the safetensors headers.
Downloads go through huggingface_hub into its cache (``HF_HOME`` / ``HF_HUB_CACHE`` respected); the
registry copies the files into its store. A second pull of the same commit registers nothing new.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from lorahub.errors import FormatError, LorahubError, NotFound
from lorahub.hub import card as cardmod
from lorahub.hub.client import (check_online, check_repo_id, hub_errors, quiet_client, resolve_endpoint,
                                resolve_token)

DEFAULT_MAX_SIZE_MB = 2048
PIPELINE_DIRS = {"unet", "text_encoder", "text_encoder_2", "vae", "transformer", "safety_checker",
                 "feature_extractor", "tokenizer", "tokenizer_2", "scheduler", "controlnet"}
DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``user/name[@rev]`` -> (repo, rev)."""
    repo, _, rev = (spec or "").strip().partition("@")
    check_repo_id(repo)
    if rev == "":
        rev = None
    elif not re.fullmatch(r"[A-Za-z0-9._/-]{1,200}", rev) or ".." in rev:
        raise LorahubError(f"{spec!r}: bad revision {rev!r}")
    return repo, rev


def check_repo_path(name: str) -> str:
    """A repo file name is safe to hand to the client: relative, no '..', no odd characters."""
    bad = None
    if not isinstance(name, str) or not name:
        bad = "empty name"
    elif len(name) > 500:
        bad = "name too long"
    elif name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        bad = "absolute path"
    elif "\\" in name:
        bad = "backslash in name"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        bad = "control character in name"
    else:
        parts = PurePosixPath(name).parts
        if any(p in ("..", ".", "") for p in name.split("/")) or not parts:
            bad = "'..' or empty path component"
    if bad:
        raise LorahubError(f"the repo lists an unsafe file name {name!r} ({bad}); refusing to pull it")
    return name


def _is_candidate(path: str) -> bool:
    if not path.lower().endswith(".safetensors"):
        return False
    parts = path.split("/")
    if any(p in PIPELINE_DIRS for p in parts[:-1]):
        return False
    return parts[-1] not in ("model.safetensors", "diffusion_pytorch_model.safetensors")


@dataclass
class PullResult:
    """What :func:`pull` registered: ``entries`` (id, name, file, created, kind, base), the files
    ``skipped`` (file, why), and the card's fields."""

    repo: str
    revision: str
    commit: str
    endpoint: str
    entries: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    card: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HubLora:
    """A Hub model found by :func:`search`."""

    repo: str
    base_model: str | None
    family: str | None
    downloads: int | None
    likes: int | None
    updated: str | None
    tags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def pull(spec: str, *, registry=None, file: str | None = None, type: str | None = None,
         tags: list[str] | None = None, endpoint: str | None = None, token_env: str | None = None,
         max_size_mb: float = DEFAULT_MAX_SIZE_MB, progress=None) -> PullResult:
    """Download the LoRA/embedding files of ``spec`` (``user/name[@revision]``) and register them
    (lineage: pulled-from ``repo@commit``), with the card's base model, trigger words, tags and license.

    ``file``: only this file of the repo. ``type``: the registry type of the entries; ``tags``: extra
    tags. ``token_env``: the environment variable holding the token (default: huggingface_hub's own
    lookup). Files over ``max_size_mb`` MiB are refused. ``progress()`` is called per downloaded file.
    ``registry``: a Registry, a home folder or None (the default home).
    """
    from lorahub.refs import LazyRegistry

    with LazyRegistry.using(registry) as regs:
        return _pull(regs.get(), spec, file=file, type=type, tags=tags, endpoint=endpoint, token_env=token_env,
                     max_size_mb=max_size_mb, progress=progress)


def _pull(reg, spec: str, *, file, type, tags, endpoint, token_env, max_size_mb, progress) -> PullResult:
    from lorahub.fsutil import is_within
    from lorahub.hashing import sha256_file
    from lorahub.lineage import register_derived
    from lorahub.vocab import LORA_TYPES

    if type is not None and type not in LORA_TYPES:
        raise LorahubError(f"type {type!r}: expected one of {', '.join(LORA_TYPES)}")
    repo, rev = parse_spec(spec)
    ep = resolve_endpoint(endpoint)
    token = resolve_token(token_env)
    if file is not None:
        check_repo_path(file)
    max_bytes = int(max_size_mb * 1024 * 1024)
    check_online()
    quiet_client()
    from huggingface_hub import HfApi, constants

    api = HfApi(endpoint=ep, token=token, library_name="lorahub")
    with hub_errors("pull", endpoint=ep, token=token, repo=repo):
        info = api.model_info(repo, revision=rev, files_metadata=True)
    commit = info.sha
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise LorahubError(f"pull: {ep} gave no commit id for {repo}; is it a Hugging Face Hub endpoint?")
    siblings = {s.rfilename: s for s in (info.siblings or [])}

    if file is not None:
        if file not in siblings:
            have = ", ".join(sorted(p for p in siblings if p.lower().endswith(".safetensors"))[:10]) or "none"
            raise NotFound(f"pull: {repo}@{commit[:12]} has no file {file!r} (safetensors files: {have})")
        chosen = [file]
    else:
        chosen = sorted(p for p in siblings if _is_candidate(p))
        for p in chosen:
            check_repo_path(p)
        if not chosen:
            raise NotFound(f"pull: {repo}@{commit[:12]} has no LoRA or embedding .safetensors file")
    for p in chosen:
        check_repo_path(p)
        if not p.lower().endswith(".safetensors"):
            raise LorahubError(f"pull: {p}: only .safetensors files are pulled (pickles are never loaded)")
        size = siblings[p].size
        if size is not None and size > max_bytes:
            raise LorahubError(f"pull: {p} is {size / 2**20:.0f} MiB, over the size limit of {max_size_mb:g} MiB")

    cache = Path(constants.HF_HUB_CACHE)
    with hub_errors("pull", endpoint=ep, token=token, repo=repo):
        meta: dict = {}
        if "README.md" in siblings:
            rp = Path(api.hf_hub_download(repo_id=repo, filename="README.md", revision=commit))
            meta = cardmod.parse_card(rp.read_bytes(), where=f"{repo}/README.md")
        fields = cardmod.card_fields(meta)
        local: dict[str, Path] = {}
        for p in chosen:
            lp = Path(api.hf_hub_download(repo_id=repo, filename=p, revision=commit))
            if not is_within(lp, cache):
                raise LorahubError(f"pull: {p} was not stored inside the Hugging Face cache; refusing it")
            sib = siblings[p]
            real = lp.stat().st_size
            if real > max_bytes:
                raise LorahubError(f"pull: {p} is {real / 2**20:.0f} MiB, over the size limit of {max_size_mb:g} MiB")
            if sib.size is not None and real != sib.size:
                raise LorahubError(f"pull: {p} is {real} bytes but the Hub announced {sib.size}; nothing registered")
            if sib.lfs is not None and sha256_file(lp) != sib.lfs.sha256:
                raise LorahubError(f"pull: {p} does not match its LFS sha256; nothing registered")
            local[p] = lp
            if progress is not None:
                progress()

    # header-level checks of every file before anything is registered
    from lorahub.formats.detect import detect

    dets = {}
    for p, lp in local.items():
        try:
            dets[p] = detect(lp)
        except FormatError as exc:
            raise FormatError(f"pull: {p}: {exc}; nothing registered") from None
    skipped: list[dict] = []
    if file is None:
        for p in list(local):
            if dets[p].kind == "checkpoint":
                skipped.append({"file": p, "why": "a full checkpoint, not a LoRA"})
                del local[p]
        loras = [p for p in local if dets[p].kind != "textual-inversion"]
        if DIFFUSERS_NAME in loras and len(loras) > 1:
            skipped.append({"file": DIFFUSERS_NAME, "why": "the diffusers form of another file in the repo"})
            del local[DIFFUSERS_NAME]
        if not local:
            raise NotFound(f"pull: {repo}@{commit[:12]} has no LoRA or embedding file (only checkpoints)")
    elif dets[file].kind == "checkpoint":
        raise LorahubError(f"pull: {file} is a full checkpoint, not a LoRA or embedding")

    results = []
    extra_hub = {"repo": repo, "revision": rev or "main", "commit": commit, "endpoint": ep}
    user_tags = [t for t in (tags or []) if t]
    for p, lp in local.items():
        det = dets[p]
        base = None
        if det.base == "unknown" and fields["family"]:
            base = fields["family"]
        is_emb = det.kind == "textual-inversion"
        name = None
        if Path(p).name == DIFFUSERS_NAME:
            name = repo.split("/")[1]
        extra = {"hub": {**extra_hub, "file": p}}
        if fields["license"]:
            extra["license"] = fields["license"]
        if fields["base_model"]:
            extra["base_model"] = fields["base_model"]
        entry, created = register_derived(
            reg, lp, relation="pulled-from", parents=[f"{repo}@{commit}"],
            detail={"repo": repo, "revision": rev or "main", "commit": commit, "file": p, "endpoint": ep},
            name=name, type=type, triggers=None if is_emb else fields["triggers"],
            tags=fields["tags"] + user_tags, base=base, source=f"{repo}@{commit}", sidecars=False, extra=extra)
        if created or not any(r.get("repo") == repo and r.get("commit") == commit and r.get("endpoint") == ep
                              for r in reg.remotes(entry["id"])):
            reg.set_remote(entry["id"], repo=repo, revision=rev or "main", commit=commit, endpoint=ep)
        results.append({"id": entry["id"], "name": entry["name"], "file": p, "created": created,
                        "kind": entry.get("kind"), "base": entry.get("base")})
    return PullResult(repo=repo, revision=rev or "main", commit=commit, endpoint=ep, entries=results,
                      skipped=skipped, card={k: v for k, v in fields.items() if v})


def search(query: str | None, *, endpoint: str | None = None, token_env: str | None = None, limit: int = 20,
           base_model: str | None = None, author: str | None = None) -> list[HubLora]:
    """Hub models matching ``query`` that are diffusers LoRAs (tags ``lora`` and ``diffusers``), most
    downloaded first; ``base_model`` / ``author`` narrow the search."""
    ep = resolve_endpoint(endpoint)
    token = resolve_token(token_env)
    if limit < 1 or limit > 1000:
        raise LorahubError("limit must be between 1 and 1000")
    check_online()
    quiet_client()
    from huggingface_hub import HfApi

    api = HfApi(endpoint=ep, token=token, library_name="lorahub")
    filters = ["lora", "diffusers"]
    if base_model:
        filters.append(f"base_model:{base_model}")
    rows = []
    with hub_errors("search", endpoint=ep, token=token):
        for m in api.list_models(search=query or None, filter=filters, author=author, limit=limit,
                                 sort="downloads", cardData=True):
            cd = m.card_data
            bm = None
            if cd is not None:
                bm = getattr(cd, "base_model", None) if not isinstance(cd, dict) else cd.get("base_model")
            if isinstance(bm, list):
                bm = bm[0] if bm else None
            generic = {"lora", "diffusers", "text-to-image", "stable-diffusion", "template:sd-lora",
                       "stable-diffusion-diffusers", "stable-diffusion-xl", "stable-diffusion-xl-diffusers"}
            tags = [t for t in (m.tags or []) if t not in generic and ":" not in t]
            rows.append(HubLora(repo=m.id, base_model=bm, family=cardmod.base_family(bm), downloads=m.downloads,
                                likes=m.likes, tags=tags[:8],
                                updated=m.last_modified.strftime("%Y-%m-%d") if m.last_modified else None))
    return rows
