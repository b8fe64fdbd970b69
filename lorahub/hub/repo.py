"""One revision of a Hub repo as a pull sees it: its files, its card, the headers of its safetensors
files and the files themselves -- read from the Hub, or from the Hugging Face cache when offline.

Online (:meth:`RepoSource.open` with ``HF_HUB_OFFLINE`` unset) the revision is pinned to its commit,
the file listing comes from the tree API (paginated by the client), a safetensors header is read with
an HTTP range request (the weights are not downloaded to decide what a file is) and files are
downloaded with ``hf_hub_download`` into the cache (``HF_HOME`` / ``HF_HUB_CACHE``), which records
the revision's ref as the client always does.

Offline (``HF_HUB_OFFLINE=1``) the revision is found in the cache the way ``hf_hub_download`` finds it:
a full commit sha with a snapshot, or a ref (``main``, a branch, a tag) recorded under ``refs/``. The
listing is the snapshot's files (what earlier pulls downloaded); LFS files are checked against the
SHA-256 their cache blob is named after.

Every file name is checked before use (no ``..``, no absolute or Windows paths, no control characters),
and the sizes and LFS SHA-256s the Hub announces are checked against what arrives.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lorahub.errors import FormatError, LorahubError, NotFound
from lorahub.hub import card as cardmod
from lorahub.hub.client import hub_errors, is_offline, quiet_client

HEADER_PEEK = 100_000   # bytes asked for first (most LoRA headers are smaller)
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


@dataclass
class RemoteFile:
    """A file of the revision: ``size`` and ``sha256`` as announced (LFS files; None when unknown),
    ``local`` its copy in the cache once fetched (offline: from the start)."""

    path: str
    size: int | None
    sha256: str | None
    local: Path | None = None
    checked: bool = False     # its SHA-256 was compared with the announced one


@dataclass
class RepoSource:
    """A repo revision, pinned to ``commit``; ``offline`` when read from the cache only."""

    repo: str
    revision: str
    commit: str
    endpoint: str
    offline: bool
    files: dict[str, RemoteFile] = field(default_factory=dict)
    gated: bool = False
    _api: object = None
    _token: str | None = None
    _card: tuple | None = None

    # -------------------------------------------------------------------- opening
    @classmethod
    def open(cls, repo: str, rev: str | None, *, endpoint: str, token: str | None) -> "RepoSource":
        """The revision ``rev`` (default main) of ``repo``: from the Hub, or from the cache when
        HF_HUB_OFFLINE is set."""
        if is_offline():
            return cls._open_cached(repo, rev, endpoint=endpoint)
        quiet_client()
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=endpoint, token=token, library_name="lorahub")
        with hub_errors("pull", endpoint=endpoint, token=token, repo=repo):
            info = api.model_info(repo, revision=rev)
            commit = info.sha
            if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
                raise LorahubError(f"pull: {endpoint} gave no commit id for {repo}; is it a Hugging Face Hub endpoint?")
            listing = [f for f in api.list_repo_tree(repo, revision=commit, recursive=True) if isinstance(f, RepoFile)]
        files = {}
        for f in listing:
            check_repo_path(f.path)
            sha = f.lfs.sha256 if f.lfs is not None and _SHA256.fullmatch(str(f.lfs.sha256)) else None
            files[f.path] = RemoteFile(f.path, f.size if isinstance(f.size, int) else None, sha)
        return cls(repo=repo, revision=rev or "main", commit=commit, endpoint=endpoint, offline=False, files=files,
                   gated=bool(info.gated), _api=api, _token=token)

    @classmethod
    def _open_cached(cls, repo: str, rev: str | None, *, endpoint: str) -> "RepoSource":
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        from lorahub.fsutil import is_within

        storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
        want = rev or "main"
        commit = None
        if re.fullmatch(r"[0-9a-f]{40}", want) and (storage / "snapshots" / want).is_dir():
            commit = want
        else:
            ref = storage / "refs" / want
            if ref.is_file() and is_within(ref, storage / "refs"):
                text = ref.read_text(encoding="utf-8", errors="replace").strip()
                if re.fullmatch(r"[0-9a-f]{40}", text) and (storage / "snapshots" / text).is_dir():
                    commit = text
        if commit is None:
            raise LorahubError(f"HF_HUB_OFFLINE is set and {repo}@{want} is not in the Hugging Face cache "
                               f"({constants.HF_HUB_CACHE}); pull it once online (or unset HF_HUB_OFFLINE)")
        snap = storage / "snapshots" / commit
        files = {}
        for root, _dirs, names in os.walk(snap):
            for n in names:
                p = Path(root) / n
                rel = p.relative_to(snap).as_posix()
                check_repo_path(rel)
                if not is_within(p, storage):
                    raise LorahubError(f"pull: cached {rel} points outside the Hugging Face cache; refusing it")
                real = p.resolve()
                sha = real.name if _SHA256.fullmatch(real.name) else None
                files[rel] = RemoteFile(rel, real.stat().st_size, sha, local=p)
        return cls(repo=repo, revision=want, commit=commit, endpoint=endpoint, offline=True, files=files)

    # -------------------------------------------------------------------- reading
    def _errors(self):
        return hub_errors("pull", endpoint=self.endpoint, token=self._token, repo=self.repo)

    def card(self) -> tuple[dict, str]:
        """(front matter, text) of README.md ({}, "" without one)."""
        if self._card is None:
            if "README.md" not in self.files:
                self._card = ({}, "")
            else:
                data = self.fetch("README.md").read_bytes()
                meta = cardmod.parse_card(data, where=f"{self.repo}/README.md")
                self._card = (meta, data.decode("utf-8", "replace"))
        return self._card

    def _range(self, path: str, end: int) -> tuple[bytes, int | None]:
        """Bytes 0..end of ``path`` and the file's real size (from Content-Range), never reading more
        than asked even from a server that ignores ranges."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(repo_id=self.repo, filename=path, revision=self.commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token, library_name="lorahub")
        headers["Range"] = f"bytes=0-{end}"
        with self._errors(), get_session().stream("GET", url, headers=headers, follow_redirects=True) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            total = None
            m = re.fullmatch(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range", ""))
            if m:
                total = int(m.group(1))
            elif r.status_code == 200 and str(r.headers.get("Content-Length", "")).isdigit():
                total = int(r.headers["Content-Length"])
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > end:
                    break
        return bytes(buf[:end + 1]), total

    def header(self, path: str):
        """The :class:`~lorahub.formats.detect.Detection` of a safetensors file from its header alone
        (online: a range request; the weights are not downloaded). Bad headers -> FormatError."""
        from lorahub.formats.detect import classify
        from lorahub.formats.header import MAX_HEADER_BYTES, parse_header_bytes

        rf = self.files[path]
        if rf.local is not None:
            with open(rf.local, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
                prefix += f.read(min(n, MAX_HEADER_BYTES + 1))
        else:
            prefix, size = self._range(path, HEADER_PEEK - 1)
            if size is not None and rf.size is not None and size != rf.size:
                raise LorahubError(f"pull: {path} is {size} bytes but the Hub announced {rf.size}; nothing registered")
            size = size if size is not None else (rf.size or len(prefix))
            n = int.from_bytes(prefix[:8], "little") if len(prefix) >= 8 else 0
            if 8 + n > len(prefix) and 8 <= 8 + n <= 8 + MAX_HEADER_BYTES and 8 + n <= size:
                prefix, _ = self._range(path, 8 + n - 1)
        try:
            h = parse_header_bytes(prefix, size, name=path)
            return classify(h.tensors, h.metadata, name=path)
        except FormatError as exc:
            raise FormatError(f"pull: {exc}; nothing registered") from None

    def fetch(self, path: str, *, max_bytes: int | None = None) -> Path:
        """The file ``path`` in the cache (downloaded when online), checked against the announced size
        and LFS SHA-256."""
        from lorahub.fsutil import is_within
        from lorahub.hashing import sha256_file

        rf = self.files[path]
        if rf.local is None:
            from huggingface_hub import constants

            # the revision's own name, so that the cache records its ref (offline pulls find it)
            rev = self.revision if self.revision != self.commit[:len(self.revision)] else self.commit
            with self._errors():
                lp = Path(self._api.hf_hub_download(repo_id=self.repo, filename=path, revision=rev))
            cache = Path(constants.HF_HUB_CACHE)
            if not is_within(lp, cache):
                raise LorahubError(f"pull: {path} was not stored inside the Hugging Face cache; refusing it")
            depth = len(PurePosixPath(path).parts)
            if lp.parts[-depth - 1] != self.commit:
                raise LorahubError(f"pull: {self.repo}@{self.revision} moved to another commit during the pull "
                                   f"(now {lp.parts[-depth - 1][:12]}); pull again")
            real = lp.stat().st_size
            if max_bytes is not None and real > max_bytes:
                raise LorahubError(f"pull: {path} is {real / 2**20:.0f} MiB, over the size limit of "
                                   f"{max_bytes / 2**20:g} MiB")
            if rf.size is not None and real != rf.size:
                raise LorahubError(f"pull: {path} is {real} bytes but the Hub announced {rf.size}; nothing registered")
            rf.local = lp
        if rf.sha256 is not None and not rf.checked:
            if sha256_file(rf.local) != rf.sha256:
                raise LorahubError(f"pull: {path} does not match its LFS sha256; nothing registered")
            rf.checked = True
        return rf.local

    def require(self, path: str) -> RemoteFile:
        if path not in self.files:
            raise NotFound(f"pull: {self.repo}@{self.commit[:12]} has no file {path!r}")
        return self.files[path]
