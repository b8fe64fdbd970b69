"""``lorahub verify --repair``: bring back missing or corrupt blobs from where they came from, and
re-register the stored files of a home whose catalogue database was lost.

Sources tried for an entry, in order, each accepted only if its bytes hash to the entry's SHA-256:
1. the entry's recorded ``source`` when it is a local file that still exists;
2. the Hub remote the entry was pulled from or pushed to (repo, commit, file name), downloaded through
   huggingface_hub into its cache (needs network access to that endpoint; skipped when offline).

:func:`recover_entries` turns the blobs of a store whose database is missing or empty back into
entries (``Registry.open(recover=True)``): each blob that is a LoRA / embedding / checkpoint file
becomes an entry named from its own metadata (else ``recovered-<sha256[:12]>``); what only the lost
database knew (tags, lineage, sidecar fields, previews) cannot come back -- restore a backup for that.
"""

from __future__ import annotations

import os
from pathlib import Path


def _hub_candidates(reg, entry: dict):
    hub = (entry.get("extra") or {}).get("hub") or {}
    names = [n for n in (hub.get("file"), entry.get("file_name")) if n]
    for r in reg.remotes(entry["id"]):
        for name in dict.fromkeys(names):
            yield r, name


def _download(remote: dict, filename: str) -> Path | None:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    from huggingface_hub import hf_hub_download

    from lorahub.hub.client import check_repo_id, resolve_endpoint
    from lorahub.hub.pull import check_repo_path

    try:
        repo = check_repo_id(remote["repo"])
        name = check_repo_path(filename)
        endpoint = resolve_endpoint(remote.get("endpoint"))
        return Path(hf_hub_download(repo, name, revision=remote.get("commit") or remote.get("revision"),
                                    endpoint=endpoint))
    except Exception:  # unreachable, gone, refused: this source does not help
        return None


def repair(reg, problems: list[dict]) -> list[dict]:
    """Try to repair each problem of ``Registry.verify``; return one result per problem."""
    results = []
    for p in problems:
        out = {**p, "repaired": False, "from": None}
        if p.get("what") == "entry":
            entry = reg.get(p["id"])
            src = entry.get("source") or ""
            if src and Path(src).is_file() and reg.restore_blob(entry["sha256"], src):
                out.update(repaired=True, **{"from": src})
            else:
                for remote, name in _hub_candidates(reg, entry):
                    path = _download(remote, name)
                    if path is not None and reg.restore_blob(entry["sha256"], path):
                        out.update(repaired=True, **{"from": f"{remote['repo']}@{remote.get('commit')}/{name}"})
                        break
        results.append(out)
    return results


def recover_entries(reg) -> list[dict]:
    """Register every blob of the store that no entry refers to and that is a model file lorahub
    reads (hard-linked, not copied); blobs that are not (preview images) are left for ``gc``, and a
    blob whose bytes no longer match its name is left alone. Returns the new entries."""
    from lorahub.errors import LorahubError
    from lorahub.formats.pickle_safe import ZIP_MAGIC
    from lorahub.fsutil import temp_name
    from lorahub.registry import ingest

    refs = {r[0] for r in reg.conn.execute("SELECT sha256 FROM entries UNION SELECT sha256 FROM previews")}
    out = []
    for blob in list(reg.store.blobs()):
        if blob.name in refs:
            continue
        with open(blob, "rb") as f:
            magic = f.read(len(ZIP_MAGIC))
        # detection reads pickles by their suffix: give the blob one through a hard link
        link = reg.store.root / temp_name(".pt" if magic == ZIP_MAGIC else ".safetensors")
        try:
            os.link(blob, link)
        except OSError:
            continue
        try:
            try:
                prep = ingest.prepare(reg.store, link, copy=False, sidecars=False, source="recovered from the store")
            except LorahubError:
                continue
            if prep.sha256 != blob.name:
                prep.discard()
                continue
            prep.file_name = f"{blob.name[:12]}{link.suffix}"
            if not prep.imported.name:
                prep.name = f"recovered-{blob.name[:12]}"
            entry, created = ingest.commit(reg, prep)
            if created:
                out.append(entry)
        finally:
            link.unlink(missing_ok=True)
    return out
