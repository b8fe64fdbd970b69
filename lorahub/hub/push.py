"""``lorahub push``: registry entries -> one commit on a Hub model repo, with a model card.

Files in the commit:
* the LoRA in diffusers form as ``pytorch_lora_weights.safetensors`` (what ``load_lora_weights`` looks for),
* the webui file under its own name (the original kohya/LyCORIS file, or a kohya conversion),
* embeddings under their own names, sweep preview images under ``images/``,
* ``README.md`` written from the entry (see :mod:`lorahub.hub.card`).

A re-push of the same entries is a no-op: the card is deterministic, so when the card on the Hub is
byte-identical nothing is uploaded and no commit is made; otherwise the client skips files whose oid
already matches the remote one.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lorahub.errors import LorahubError
from lorahub.hub import card as cardmod
from lorahub.hub.client import (check_online, check_repo_id, hub_errors, quiet_client, resolve_endpoint,
                                resolve_token)
from lorahub.vocab import NETWORK_KINDS, safe_filename

MAX_PREVIEWS = 8
DIFFUSERS_KINDS = ("lora", "locon")   # what diffusers' load_lora_weights can take


def _repo_file(name: str) -> str:
    """A file name for the repo root: the base name, its stem made safe (:func:`safe_filename`)."""
    stem, dot, ext = Path(str(name or "")).name.rpartition(".")
    if not dot:
        stem, ext = ext, "safetensors"
    ext = re.sub(r"[^A-Za-z0-9]+", "", ext)[:16] or "safetensors"
    return f"{safe_filename(stem, max_len=100)}.{ext}"


def _unique(path: str, used: set[str]) -> str:
    if path not in used:
        used.add(path)
        return path
    stem, _, ext = path.rpartition(".")
    i = 2
    while f"{stem}-{i}.{ext}" in used:
        i += 1
    used.add(f"{stem}-{i}.{ext}")
    return f"{stem}-{i}.{ext}"


def canonical_safetensors(path: Path) -> Path:
    """Rewrite a safetensors header with sorted keys (metadata order is otherwise random per process),
    so the same weights always give the same bytes -- and the same LFS oid on the Hub."""
    import json
    import struct

    from lorahub.fsutil import atomic_write_bytes

    data = Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    atomic_write_bytes(path, struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return Path(path)


def convert(reg, entry: dict, dialect: str, dest: Path) -> Path:
    """Write ``entry`` in ``dialect`` to ``dest`` (deterministic bytes)."""
    from lorahub.formats.io import load_lora, save_lora

    model = load_lora(reg.blob_path(entry))
    return canonical_safetensors(Path(save_lora(model, dest, dialect=dialect)))


class _Lazy:
    """Plans conversions without doing them (a re-push whose card is unchanged never converts)."""

    def __init__(self, failed: dict):
        self.failed = failed
        self.todo: list[tuple[dict, str, Path]] = []

    def __call__(self, reg, entry: dict, dialect: str, dest: Path) -> Path:
        msg = self.failed.get((entry["id"], dialect))
        if msg is not None:
            raise LorahubError(msg)
        self.todo.append((entry, dialect, dest))
        return dest


def plan_push(reg, entries: list[dict], *, repo: str, workdir: Path, base_model: str | None = None,
              converter=None, alpha: float | None = None) -> dict:
    """Which files go where, and the card text. Conversions are written into ``workdir`` by
    ``converter(reg, entry, dialect, dest)`` (default: :func:`convert`, done now)."""
    _convert = converter or convert
    if not entries:
        raise LorahubError("push: give at least one registry entry")
    loras = [e for e in entries if e.get("kind") in NETWORK_KINDS]
    embeds = [e for e in entries if e.get("kind") == "textual-inversion"]
    others = [e for e in entries if e not in loras and e not in embeds]
    if others:
        raise LorahubError(f"push: {others[0]['name']} is a {others[0].get('kind')}, not a LoRA or an embedding")
    main = loras[0] if loras else embeds[0]
    used: set[str] = {"README.md"}
    files: list[dict] = []
    notes: list[str] = []
    plan: dict = {"repo": repo, "files": files, "notes": notes, "diffusers_file": None, "webui_file": None,
                  "diffusers_converted": False, "embeddings": []}

    def add_webui_copy(e: dict, name: str) -> None:
        """A kohya copy of ``e`` for webui users; a conversion we cannot do is reported, not fatal."""
        try:
            conv = _convert(reg, e, "kohya", workdir / "webui.safetensors")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"no webui (kohya) copy: {exc}")
            return
        wpath = _unique(_repo_file(name), used)
        files.append({"path": wpath, "src": conv, "role": "converted", "entry": None,
                      "from_sha256": e["sha256"], "dialect": "kohya",
                      "form": "kohya (converted by lorahub)", "for": "AUTOMATIC1111 / Forge / ComfyUI"})
        plan["webui_file"] = wpath

    for e in loras:
        blob = reg.blob_path(e)
        is_main = e is main
        fmt = e.get("format")
        if is_main and fmt in ("diffusers", "peft") and e.get("kind") in DIFFUSERS_KINDS:
            path = _unique("pytorch_lora_weights.safetensors", used)
            files.append({"path": path, "src": blob, "role": "original", "entry": e,
                          "form": f"{fmt} (original)", "for": "diffusers `load_lora_weights`"})
            plan["diffusers_file"] = path
            add_webui_copy(e, f"{e['name']}.safetensors")
            continue
        own = e.get("file_name") or f"{e['name']}.safetensors"
        if own == "pytorch_lora_weights.safetensors":
            own = f"{e['name']}.safetensors"
        path = _unique(_repo_file(own), used)
        webui_ok = fmt in ("kohya", "lycoris")
        files.append({"path": path, "src": blob, "role": "original", "entry": e,
                      "form": f"{fmt} (original)",
                      "for": "AUTOMATIC1111 / Forge / ComfyUI" if webui_ok else "lorahub / the tool that made it"})
        if is_main and webui_ok:
            plan["webui_file"] = path
        if is_main and not webui_ok:
            add_webui_copy(e, f"{e['name']}-kohya.safetensors")
        if is_main and e.get("kind") in DIFFUSERS_KINDS:
            try:
                conv = _convert(reg, e, "diffusers", workdir / "pytorch_lora_weights.safetensors")
                dpath = _unique("pytorch_lora_weights.safetensors", used)
                files.append({"path": dpath, "src": conv, "role": "converted", "entry": None,
                              "from_sha256": e["sha256"], "dialect": "diffusers",
                              "form": "diffusers (converted by lorahub)", "for": "diffusers `load_lora_weights`"})
                plan["diffusers_file"] = dpath
                plan["diffusers_converted"] = True
            except Exception as exc:  # noqa: BLE001
                notes.append(f"no diffusers copy: {exc}")
                if fmt == "kohya":  # diffusers' load_lora_weights reads kohya files itself
                    plan["diffusers_file"] = path
        elif is_main:
            notes.append(f"diffusers cannot load a {e.get('kind')} adapter; only the original file is uploaded")

    for e in embeds:
        path = _unique(_repo_file(e.get("file_name") or f"{e['name']}.safetensors"), used)
        token = (e.get("tokens") or [None])[0] or path.rsplit(".", 1)[0]
        files.append({"path": path, "src": reg.blob_path(e), "role": "embedding", "entry": e,
                      "form": "textual-inversion embedding", "for": "diffusers `load_textual_inversion` / webui"})
        plan["embeddings"].append({"path": path, "token": token})

    # previews of the main entry: sweep images become the card's widget
    previews = reg.previews(main["id"])[:MAX_PREVIEWS]
    triggers = list(main.get("triggers") or [])
    for emb in plan["embeddings"]:
        if emb["token"] not in triggers:
            triggers.append(emb["token"])
    widget = []
    for p in previews:
        src = Path(p["path"])
        ext = (p.get("ext") or src.suffix.lstrip(".") or "png").lstrip(".")
        path = _unique(f"images/{p['sha256'][:16]}.{ext}", used)
        files.append({"path": path, "src": src, "role": "preview", "entry": None, "form": "image", "for": "card"})
        params = p.get("params") or {}
        text = params.get("prompt") if isinstance(params.get("prompt"), str) else None
        prompts = params.get("prompts")
        if text is None and isinstance(prompts, list) and prompts and isinstance(prompts[0], str):
            text = prompts[0]
        widget.append({"text": text or (", ".join(triggers) if triggers else main["name"]),
                       "output": {"url": path}})
    rec, swept = cardmod.recommended_alpha(previews, main["id"])
    if alpha is not None:
        rec = float(alpha)
    fam = main.get("base") or "unknown"
    lineage = []
    for e in entries:
        for item in reg.lineage(e["id"]):
            if item not in lineage:
                lineage.append(item)
    plan.update({
        "main": {"entry": main}, "triggers": triggers, "alpha": rec, "alphas": swept, "widget": widget,
        "base_model": base_model or cardmod.BASE_MODEL_IDS.get(fam), "lineage": lineage,
        "entries": entries,
    })
    plan["readme"] = cardmod.render(plan)
    return plan


def _remote_readme(api, repo: str, revision: str) -> bytes | None:
    """The README.md at ``revision`` (None when the repo, branch or file is missing)."""
    from huggingface_hub import errors as hf_errors

    try:
        p = api.hf_hub_download(repo_id=repo, filename="README.md", revision=revision)
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.EntryNotFoundError):
        return None
    return Path(p).read_bytes()


@dataclass
class PushResult:
    """What :func:`push` did: the commit on ``repo@revision`` (``uploaded`` False when the repo was
    already up to date), the files of the commit, the entries pushed and notes."""

    repo: str
    revision: str
    commit: str
    endpoint: str
    url: str
    uploaded: bool
    files: list[str] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "commit": self.commit, "endpoint": self.endpoint,
                "url": self.url, "uploaded": self.uploaded, "up_to_date": not self.uploaded, "files": self.files,
                "entries": self.entries, "notes": self.notes}


def push(refs: list[str], *, repo: str, registry=None, private: bool = False, revision: str | None = None,
         message: str | None = None, endpoint: str | None = None, token_env: str | None = None,
         base_model: str | None = None, alpha: float | None = None) -> PushResult:
    """Upload the registry entries ``refs`` (the LoRA first, then embeddings or more LoRAs) to the Hub
    model repo ``repo`` (created if missing) in one commit, with a model card, and record the remote on
    every entry. Pushing the same entries again uploads nothing.

    ``revision``: the branch (default main; created if missing). ``base_model``: the Hub id the card
    names (default: the family's reference model); ``alpha``: the recommended strength it states
    (default: what a sweep recorded). ``endpoint``: the hub URL (default ``$HF_ENDPOINT``, else
    huggingface.co); ``token_env``: the environment variable holding the token (default:
    huggingface_hub's own lookup). ``registry``: a Registry, a home folder or None (the default home).
    """
    from lorahub.refs import LazyRegistry

    with LazyRegistry.using(registry) as regs:
        return _push(regs.get(), refs, repo=repo, private=private, revision=revision, message=message,
                     endpoint=endpoint, token_env=token_env, base_model=base_model, alpha=alpha)


def _push(reg, refs: list[str], *, repo: str, private: bool, revision: str | None, message: str | None,
          endpoint: str | None, token_env: str | None, base_model: str | None, alpha: float | None) -> PushResult:
    check_repo_id(repo)
    branch = revision or "main"
    if not re.fullmatch(r"[A-Za-z0-9._/-]{1,200}", branch) or ".." in branch:
        raise LorahubError(f"revision {branch!r}: not a branch name")
    ep = resolve_endpoint(endpoint)
    token = resolve_token(token_env)
    entries: list[dict] = []
    for r in refs:
        e = reg.resolve(r)
        if all(x["id"] != e["id"] for x in entries):
            entries.append(e)

    check_online()
    quiet_client()
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=ep, token=token, library_name="lorahub")
    with tempfile.TemporaryDirectory(prefix="lorahub-push-") as td:
        failed: dict = {}
        lazy = _Lazy(failed)
        plan = plan_push(reg, entries, repo=repo, workdir=Path(td), base_model=base_model, alpha=alpha,
                         converter=lazy)
        readme = plan["readme"].encode("utf-8")
        with hub_errors("push", endpoint=ep, token=token, repo=repo):
            url = api.create_repo(repo_id=repo, private=private, exist_ok=True, repo_type="model")
            if branch != "main":
                api.create_branch(repo_id=repo, branch=branch, exist_ok=True)
            remote = _remote_readme(api, repo, branch)
        keep: set[str] = set()
        if remote != readme and lazy.todo:
            # a converted file already on the Hub from the same source bytes is neither redone nor re-sent
            marker = cardmod.converted_marker(remote.decode("utf-8", "replace")) if remote else {}
            if marker:
                with hub_errors("push", endpoint=ep, token=token, repo=repo):
                    have = set(api.list_repo_files(repo, revision=branch))
                for f in plan["files"]:
                    if f["role"] == "converted" and f["path"] in have and marker.get(f["path"]) == {
                            "from": f["from_sha256"], "dialect": f["dialect"]}:
                        keep.add(f["path"])
            # convert now; a conversion that fails is left out and the card re-planned without it
            for entry, dialect, dest in lazy.todo:
                if any(f["path"] in keep and Path(f["src"]) == dest for f in plan["files"]):
                    continue
                try:
                    convert(reg, entry, dialect, dest)
                except Exception as exc:  # noqa: BLE001
                    failed[(entry["id"], dialect)] = " ".join(str(exc).split())[:300] or type(exc).__name__
            if failed:
                plan = plan_push(reg, entries, repo=repo, workdir=Path(td), base_model=base_model, alpha=alpha,
                                 converter=_Lazy(failed))
                readme = plan["readme"].encode("utf-8")
        with hub_errors("push", endpoint=ep, token=token, repo=repo):
            if remote == readme:
                info = api.model_info(repo, revision=branch)
                commit, uploaded = info.sha, False
            else:
                ops = [CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=str(f["src"]))
                       for f in plan["files"] if f["path"] not in keep]
                ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
                msg = message or f"lorahub push: {', '.join(e['name'] for e in entries)}"
                ci = api.create_commit(repo_id=repo, operations=ops, commit_message=msg, revision=branch,
                                       repo_type="model")
                commit, uploaded = ci.oid, True
    for e in entries:
        reg.set_remote(e["id"], repo=repo, revision=branch, commit=commit, endpoint=ep)
    return PushResult(repo=repo, revision=branch, commit=commit, endpoint=ep,
                      url=str(getattr(url, "url", url)) if url else f"{ep}/{repo}", uploaded=uploaded,
                      files=[f["path"] for f in plan["files"]] + ["README.md"],
                      entries=[{"id": e["id"], "name": e["name"]} for e in entries], notes=plan["notes"])
