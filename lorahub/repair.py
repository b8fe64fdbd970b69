"""``lorahub verify --repair``: bring back missing or corrupt blobs from where they came from.

Sources tried for an entry, in order, each accepted only if its bytes hash to the entry's SHA-256:
1. the entry's recorded ``source`` when it is a local file that still exists;
2. the Hub remote the entry was pulled from or pushed to (repo, commit, file name), downloaded through
   huggingface_hub into its cache (needs network access to that endpoint; skipped when offline).
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
