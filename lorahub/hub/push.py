"""``lorahub push``: registry entries -> one commit on a Hub model repo, with a model card.

Files in the commit:
* the LoRA in diffusers form as ``pytorch_lora_weights.safetensors`` (what ``load_lora_weights`` looks for),
* the webui file under its own name (the original kohya/LyCORIS file, or a kohya conversion),
* embeddings under their own names, sweep preview images under ``images/``,
* ``README.md`` written from the entry (see :mod:`lorahub.hub.card`), whose ``lorahub:`` section lists
  every file with its SHA-256 and role, and every entry's fields.

What is uploaded is decided from the remote tree: every planned file is compared by content (the LFS
SHA-256, or the git blob id of a regular file) with the file at the same path on the branch, and only
what differs or is missing goes into the commit. When nothing differs there is no commit: the branch
is up to date. A converted copy already on the Hub from the same original (per the card there) is
neither converted nor uploaded again. Files an earlier lorahub push put there (per the card there) that
this push no longer has are removed in the same commit.

A new repo that the push fails to fill is deleted again: a failed first push leaves nothing behind.
huggingface_hub uploads through Xet when ``hf_xet`` is installed; a hub without Xet storage refuses
the Xet token, and the upload is then made again through Git LFS (noted in the result).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lorahub.errors import LorahubError, NotFound
from lorahub.hub import card as cardmod
from lorahub.hub.client import (check_online, check_repo_id, hub_errors, quiet_client, resolve_endpoint,
                                resolve_token, xet_disabled, xet_refusal)
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


def git_blob_id(data: bytes) -> str:
    """The git blob id (SHA-1 of ``blob <size>\\0<data>``): the oid the Hub gives a regular file."""
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def canonical_safetensors(path: Path) -> Path:
    """Rewrite a safetensors header with sorted keys (metadata order is otherwise random per process),
    so the same weights always give the same bytes -- and the same LFS oid on the Hub."""
    from lorahub.formats.header import canonical_bytes
    from lorahub.fsutil import atomic_write_bytes

    atomic_write_bytes(path, canonical_bytes(Path(path).read_bytes()))
    return Path(path)


def convert(reg, entry: dict, dialect: str, dest: Path) -> Path:
    """Write ``entry`` in ``dialect`` to ``dest`` (deterministic bytes)."""
    from lorahub.formats.io import load_lora, save_lora

    model = load_lora(reg.blob_path(entry))
    return canonical_safetensors(Path(save_lora(model, dest, dialect=dialect)))


def plan_push(reg, entries: list[dict], *, repo: str, workdir: Path, base_model: str | None = None,
              alpha: float | None = None, known: dict | None = None, converter=None) -> dict:
    """Which files go where, their SHA-256s, and the card text.

    Converted copies are written into ``workdir`` by ``converter(reg, entry, dialect, dest)`` (default
    :func:`convert`); a conversion that fails is left out with a note. ``known`` maps
    ``(path, original sha256, dialect)`` to the SHA-256 of a converted copy already on the Hub: such a
    copy is kept as it is (``src`` None), not converted again.
    """
    from lorahub.hashing import sha256_file

    _convert = converter or convert
    known = known or {}
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

    def converted(e: dict, dialect: str, name: str) -> dict | None:
        """A converted copy of ``e`` at the repo path ``name`` (None when the conversion fails)."""
        path = _unique(name, used)
        sha = known.get((path, e["sha256"], dialect))
        src = None
        if sha is None:
            try:
                src = _convert(reg, e, dialect, workdir / f"{e['id']}-{dialect}.safetensors")
            except Exception as exc:  # noqa: BLE001 - a conversion we cannot do is reported, not fatal
                used.discard(path)
                notes.append(f"no {'webui (kohya)' if dialect == 'kohya' else dialect} copy: "
                             f"{' '.join(str(exc).split())[:300] or type(exc).__name__}")
                return None
            sha = sha256_file(src)
        form = "kohya (converted by lorahub)" if dialect == "kohya" else f"{dialect} (converted by lorahub)"
        use = "AUTOMATIC1111 / Forge / ComfyUI" if dialect == "kohya" else "diffusers `load_lora_weights`"
        f = {"path": path, "src": src, "sha256": sha, "role": "converted", "entry": None,
             "from_sha256": e["sha256"], "dialect": dialect, "form": form, "for": use}
        files.append(f)
        return f

    for e in loras:
        blob = reg.blob_path(e)
        is_main = e is main
        fmt = e.get("format")
        if is_main and fmt in ("diffusers", "peft") and e.get("kind") in DIFFUSERS_KINDS:
            path = _unique("pytorch_lora_weights.safetensors", used)
            files.append({"path": path, "src": blob, "sha256": e["sha256"], "role": "original", "entry": e,
                          "form": f"{fmt} (original)", "for": "diffusers `load_lora_weights`"})
            plan["diffusers_file"] = path
            w = converted(e, "kohya", _repo_file(f"{e['name']}.safetensors"))
            if w is not None:
                plan["webui_file"] = w["path"]
            continue
        own = e.get("file_name") or f"{e['name']}.safetensors"
        if own == "pytorch_lora_weights.safetensors":
            own = f"{e['name']}.safetensors"
        path = _unique(_repo_file(own), used)
        webui_ok = fmt in ("kohya", "lycoris")
        files.append({"path": path, "src": blob, "sha256": e["sha256"], "role": "original", "entry": e,
                      "form": f"{fmt} (original)",
                      "for": "AUTOMATIC1111 / Forge / ComfyUI" if webui_ok else "lorahub / the tool that made it"})
        if is_main and webui_ok:
            plan["webui_file"] = path
        if is_main and not webui_ok:
            w = converted(e, "kohya", _repo_file(f"{e['name']}-kohya.safetensors"))
            if w is not None:
                plan["webui_file"] = w["path"]
        if is_main and e.get("kind") in DIFFUSERS_KINDS:
            d = converted(e, "diffusers", "pytorch_lora_weights.safetensors")
            if d is not None:
                plan["diffusers_file"] = d["path"]
                plan["diffusers_converted"] = True
            elif fmt == "kohya":  # diffusers' load_lora_weights reads kohya files itself
                plan["diffusers_file"] = path
        elif is_main:
            notes.append(f"diffusers cannot load a {e.get('kind')} adapter; only the original file is uploaded")

    for e in embeds:
        path = _unique(_repo_file(e.get("file_name") or f"{e['name']}.safetensors"), used)
        token = (e.get("tokens") or [None])[0] or path.rsplit(".", 1)[0]
        files.append({"path": path, "src": reg.blob_path(e), "sha256": e["sha256"], "role": "embedding", "entry": e,
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
        params = p.get("params") or {}
        files.append({"path": path, "src": src, "sha256": p["sha256"], "role": "preview", "entry": None,
                      "form": "image", "for": "card", "params": params})
        text = params.get("prompt") if isinstance(params.get("prompt"), str) else None
        prompts = params.get("prompts")
        if text is None and isinstance(prompts, list) and prompts and isinstance(prompts[0], str):
            text = prompts[0]
        widget.append({"text": text or (", ".join(triggers) if triggers else main["name"]),
                       "output": {"url": path}})
    rec, swept = cardmod.recommended_alpha(previews, main["id"])
    alpha_from = "sweep" if rec is not None else None
    weight = (main.get("extra") or {}).get("preferred_weight")
    if alpha is not None:
        rec, alpha_from = float(alpha), "given"
    elif rec is None and isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight:
        rec, alpha_from = float(weight), "entry"
    lineage = []
    for e in entries:
        for item in reg.lineage(e["id"]):
            # "pulled from this very repo" says nothing on its own card (and keeps a re-push a no-op)
            here = item["relation"] == "pulled-from" and str(item.get("parent") or "").startswith(f"{repo}@")
            if item not in lineage and not here:
                lineage.append(item)
    plan.update({
        "main": {"entry": main}, "triggers": triggers, "alpha": rec, "alphas": swept, "alpha_from": alpha_from,
        "widget": widget, "base_model": cardmod.card_base_model(main, base_model), "lineage": lineage,
        "entries": entries, "preferred_weight": float(alpha) if alpha is not None else None,
    })
    plan["readme"] = cardmod.render(plan)
    return plan


@dataclass
class PushResult:
    """What :func:`push` did: the commit on ``repo@revision`` (``uploaded`` False when the branch was
    already up to date), the files the repo holds for these entries, the ones ``sent`` in the commit,
    the ones ``removed`` (left by an earlier push), the entries pushed and notes. With a pull request,
    ``revision`` is its ref (``refs/pr/N``) and ``pr_url`` its page."""

    repo: str
    revision: str
    commit: str
    endpoint: str
    url: str
    uploaded: bool
    files: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: bool = False
    private: bool | None = None
    pr_url: str | None = None
    transfer: str | None = None

    def to_dict(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "commit": self.commit, "endpoint": self.endpoint,
                "url": self.url, "uploaded": self.uploaded, "up_to_date": not self.uploaded, "files": self.files,
                "sent": self.sent, "removed": self.removed, "entries": self.entries, "notes": self.notes,
                "created": self.created, "private": self.private, "pr_url": self.pr_url, "transfer": self.transfer}


def push(refs: list[str], *, repo: str, registry=None, private: bool = False, revision: str | None = None,
         message: str | None = None, endpoint: str | None = None, token_env: str | None = None,
         base_model: str | None = None, alpha: float | None = None, create_pr: bool = False) -> PushResult:
    """Upload the registry entries ``refs`` (the LoRA first, then embeddings or more LoRAs) to the Hub
    model repo ``repo`` (created if missing) in one commit, with a model card, and record the remote on
    every entry. Only files that differ from the branch's are sent; when none does, nothing is committed.

    ``revision``: the branch (default main; created from main if missing). ``private``: the repo is
    created private, or an existing public repo is made private. ``create_pr``: open a pull request
    against ``revision`` instead of committing to it (the repo must exist; it may be someone else's).
    ``base_model``: the Hub id the card names (default: the one the entry came with, else the family's
    reference model); ``alpha``: the recommended strength it states (default: what a sweep recorded,
    else the entry's preferred weight). ``endpoint``: the hub URL (default ``$HF_ENDPOINT``, else
    huggingface.co); ``token_env``: the environment variable holding the token (default:
    huggingface_hub's own lookup). ``registry``: a Registry, a home folder or None (the default home).
    """
    from lorahub.refs import LazyRegistry

    with LazyRegistry.using(registry) as regs:
        return _push(regs.get(create=False), refs, repo=repo, private=private, revision=revision, message=message,
                     endpoint=endpoint, token_env=token_env, base_model=base_model, alpha=alpha, create_pr=create_pr)


@dataclass
class _Remote:
    """The branch a push compares with: its head commit, files (path -> RepoFile) and card marker."""

    head: str | None
    tree: dict
    marker: dict


def _remote_state(api, repo: str, revision: str) -> _Remote:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.hf_api import RepoFile

    try:
        head = api.model_info(repo, revision=revision).sha
    except hf_errors.RevisionNotFoundError:
        return _Remote(None, {}, {})
    tree = {f.path: f for f in api.list_repo_tree(repo, revision=head, recursive=True) if isinstance(f, RepoFile)}
    marker = {}
    if "README.md" in tree:
        text = Path(api.hf_hub_download(repo_id=repo, filename="README.md", revision=head)).read_bytes()
        try:
            marker = cardmod.read_marker(cardmod.parse_card(text), text.decode("utf-8", "replace"))
        except LorahubError:
            marker = {}   # a card we cannot read is replaced; its files are left alone
    return _Remote(head, tree, marker)


def _same(local: dict, remote) -> bool:
    """Whether the remote file (a RepoFile or None) holds the planned file's content."""
    if remote is None:
        return False
    if local.get("src") is None and "data" not in local:
        return True   # a converted copy kept from the Hub
    if remote.lfs is not None:
        return remote.lfs.sha256 == local["sha256"]
    data = local["data"] if "data" in local else Path(local["src"]).read_bytes()
    return remote.blob_id == git_blob_id(data)


def _commit(api, repo: str, ops_fn, *, ep: str, token: str | None, **kw):
    """``create_commit`` with the ops ``ops_fn()`` builds; when the hub refuses Xet, the same commit
    again through Git LFS. Returns (CommitInfo, transfer note or None)."""
    refusal = None
    with hub_errors("push", endpoint=ep, token=token, repo=repo):
        try:
            return api.create_commit(repo_id=repo, operations=ops_fn(), repo_type="model", **kw), None
        except Exception as exc:  # noqa: BLE001 - only a Xet refusal is handled here
            refusal = xet_refusal(exc)
            if refusal is None:
                raise
    why = f"{ep} has no Xet storage ({refusal[0]})"
    try:
        with xet_disabled(), hub_errors("push", endpoint=ep, token=token, repo=repo):
            ci = api.create_commit(repo_id=repo, operations=ops_fn(), repo_type="model", **kw)
    except LorahubError as exc:
        detail = str(exc).removeprefix("push: ")
        raise LorahubError(f"push: {why}, and the upload through Git LFS failed too: {detail}") from None
    return ci, f"{why}; the files went through Git LFS"


def _push(reg, refs: list[str], *, repo: str, private: bool, revision: str | None, message: str | None,
          endpoint: str | None, token_env: str | None, base_model: str | None, alpha: float | None,
          create_pr: bool) -> PushResult:
    check_repo_id(repo)
    branch = revision or "main"
    if not re.fullmatch(r"[A-Za-z0-9._/-]{1,200}", branch) or ".." in branch:
        raise LorahubError(f"revision {branch!r}: not a branch name")
    if create_pr and private:
        raise LorahubError("push: a pull request cannot change a repo's visibility; push it without private")
    ep = resolve_endpoint(endpoint)
    token = resolve_token(token_env)
    entries: list[dict] = []
    for r in refs:
        e = reg.resolve(r)
        if all(x["id"] != e["id"] for x in entries):
            entries.append(e)

    check_online("push")
    quiet_client()
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub import errors as hf_errors

    api = HfApi(endpoint=ep, token=token, library_name="lorahub")
    notes: list[str] = []
    with hub_errors("push", endpoint=ep, token=token, repo=repo):
        try:
            info = api.model_info(repo)
        except hf_errors.RepositoryNotFoundError:
            info = None
        if info is None and create_pr:
            raise NotFound(f"push: repo {repo} on {ep} not found; a pull request needs an existing repo")
        remote = _remote_state(api, repo, branch) if info is not None else _Remote(None, {}, {})
        if info is not None and remote.head is None:
            if create_pr:
                raise NotFound(f"push: {repo} has no branch {branch!r} to open a pull request against")
            remote = _remote_state(api, repo, "main")   # the new branch starts from main
    known = {(p, m.from_sha256, m.dialect): m.sha256 for p, m in remote.marker.items()
             if m.role == "converted" and m.sha256 and p in remote.tree
             and remote.tree[p].lfs is not None and remote.tree[p].lfs.sha256 == m.sha256}

    with tempfile.TemporaryDirectory(prefix="lorahub-push-") as td:
        plan = plan_push(reg, entries, repo=repo, workdir=Path(td), base_model=base_model, alpha=alpha, known=known)
        notes.extend(plan["notes"])
        readme = {"path": "README.md", "data": plan["readme"].encode("utf-8"), "src": None,
                  "sha256": None, "role": "card"}
        planned = plan["files"] + [readme]
        send = [f for f in planned if not _same(f, remote.tree.get(f["path"]))]
        paths = {f["path"] for f in planned}
        stale = sorted(p for p, m in remote.marker.items()
                       if p not in paths and p in remote.tree and m.sha256 and remote.tree[p].lfs is not None
                       and remote.tree[p].lfs.sha256 == m.sha256)
        created = False
        now_private = info.private if info is not None else private
        try:
            with hub_errors("push", endpoint=ep, token=token, repo=repo):
                if info is None:
                    url = api.create_repo(repo_id=repo, private=private, exist_ok=False, repo_type="model")
                    created = True
                    remote = _remote_state(api, repo, "main")
                    send = [f for f in planned if not _same(f, remote.tree.get(f["path"]))]
                else:
                    url = f"{ep}/{repo}"
                    if private and not info.private:
                        api.update_repo_settings(repo, private=True, repo_type="model")
                        now_private = True
                        notes.append(f"{repo} was public; it is private now")
                if branch != "main" and not create_pr:
                    api.create_branch(repo_id=repo, branch=branch, revision=remote.head, exist_ok=True)
            transfer = None
            if not send and not stale:
                commit, uploaded, rev_done, pr_url = remote.head, False, branch, None
            else:
                def ops():
                    out = [CommitOperationAdd(path_in_repo=f["path"],
                                              path_or_fileobj=f["data"] if "data" in f else str(f["src"]))
                           for f in send]
                    return out + [CommitOperationDelete(path_in_repo=p) for p in stale]

                msg = message or f"lorahub push: {', '.join(e['name'] for e in entries)}"
                ci, transfer = _commit(api, repo, ops, ep=ep, token=token, commit_message=msg, revision=branch,
                                       parent_commit=remote.head, create_pr=create_pr)
                commit, uploaded = ci.oid, True
                rev_done, pr_url = (ci.pr_revision or branch, ci.pr_url) if create_pr else (branch, None)
                if transfer:
                    notes.append(transfer)
        except BaseException as exc:
            if created:
                msg = _undo_create(api, repo, exc, ep=ep, token=token)
                if isinstance(exc, LorahubError):
                    raise LorahubError(msg) from None
            raise
    if stale:
        notes.append(f"removed {len(stale)} file(s) an earlier lorahub push left: {', '.join(stale[:5])}")
    for e in entries:
        reg.set_remote(e["id"], repo=repo, revision=rev_done, commit=commit, endpoint=ep)
    return PushResult(repo=repo, revision=rev_done, commit=commit, endpoint=ep,
                      url=str(getattr(url, "url", url)) if url else f"{ep}/{repo}", uploaded=uploaded,
                      files=[f["path"] for f in planned], sent=[f["path"] for f in send] if uploaded else [],
                      removed=stale if uploaded else [], entries=[{"id": e["id"], "name": e["name"]} for e in entries],
                      notes=notes, created=created, private=now_private, pr_url=pr_url,
                      transfer=("lfs" if transfer else None) if uploaded else None)


def _undo_create(api, repo: str, exc: BaseException, *, ep: str, token: str | None) -> str:
    """Delete the repo a failed first push created; the error message says what happened to it."""
    msg = str(exc)
    try:
        with hub_errors("push", endpoint=ep, token=token, repo=repo):
            api.delete_repo(repo_id=repo, repo_type="model", missing_ok=True)
    except LorahubError as undo:
        return f"{msg}; the empty repo {repo} it created could not be deleted ({str(undo).removeprefix('push: ')})"
    return f"{msg}; the repo {repo} created for this push was deleted again"
