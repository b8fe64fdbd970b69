"""Connecting to a Hub: endpoint, token, offline mode, and turning client errors into one clear line.

huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` when it is imported, so the endpoint is
always passed explicitly (``HfApi(endpoint=...)``, ``hf_hub_download(endpoint=...)``). The token comes
only from the environment variable the user names (``--token-env VAR``) or from huggingface_hub's own
lookup (``HF_TOKEN`` / ``hf auth login``); it is never stored, logged or printed, and it is scrubbed
from every error message.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from typing import Iterator

from lorahub.errors import LorahubError, NotFound

DEFAULT_ENDPOINT = "https://huggingface.co"
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def use_endpoint(endpoint: str | None) -> None:
    """Point huggingface_hub at ``endpoint`` before it is imported (it reads ``HF_ENDPOINT`` then), so
    that no call goes to another hub, and keep its progress bars off (lorahub shows its own)."""
    if endpoint:
        os.environ["HF_ENDPOINT"] = endpoint.rstrip("/")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def resolve_endpoint(endpoint: str | None) -> str:
    use_endpoint(endpoint)
    ep = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", ep):
        raise LorahubError(f"endpoint {ep!r}: expected an http(s) URL such as {DEFAULT_ENDPOINT}")
    if "@" in ep.split("://", 1)[1].split("/", 1)[0]:
        raise LorahubError("the endpoint must not carry credentials; give the token in an environment variable")
    return ep


def resolve_token(token_env: str | None) -> str | None:
    """The token held by the environment variable ``token_env``, or None (huggingface_hub then uses
    HF_TOKEN / its login)."""
    if token_env is None:
        return None
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token_env):
        raise LorahubError(f"token variable {token_env!r}: not an environment variable name")
    tok = os.environ.get(token_env, "").strip()
    if not tok:
        raise LorahubError(f"token variable {token_env}: that environment variable is not set or empty")
    return tok


def check_repo_id(repo: str) -> str:
    if not REPO_RE.match(repo or "") or ".." in repo or repo.endswith((".git", ".")):
        raise LorahubError(f"{repo!r}: not a Hub repo id (expected user/name)")
    return repo


def check_online(what: str = "push") -> None:
    """Refuse ``what`` when HF_HUB_OFFLINE is set: it needs the Hub itself, not the cache."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise LorahubError(f"HF_HUB_OFFLINE is set: {what} needs the Hub (unset it or set HF_HUB_OFFLINE=0)")


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ------------------------------------------------------------------------------------------ Xet
_XET_LOCK = threading.Lock()
_XET_TOKEN = re.compile(r"xet-(write|read)-token")


def xet_refusal(exc: BaseException) -> tuple[str, int | None] | None:
    """(what happened, HTTP status) when ``exc`` is the client failing to get a Xet token from the
    hub, else None. huggingface_hub uploads through Xet whenever ``hf_xet`` is installed; a hub
    without Xet storage answers the token request with 404 and the client reports it as a
    ConnectionError naming the token URL."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = " ".join(str(exc).split())
        if _XET_TOKEN.search(text):
            m = re.search(r"\(([1-5]\d\d)[ )]", text)
            status = int(m.group(1)) if m else None
            return (f"it answered {status} to the request for a Xet storage token" if status else
                    "it gave no Xet storage token"), status
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def xet_disabled() -> Iterator[None]:
    """Uploads inside the block go through Git LFS, as with ``HF_HUB_DISABLE_XET=1`` (the client's
    own switch, read on every upload)."""
    from huggingface_hub import constants

    with _XET_LOCK:
        old = constants.HF_HUB_DISABLE_XET
        constants.HF_HUB_DISABLE_XET = True
        try:
            yield
        finally:
            constants.HF_HUB_DISABLE_XET = old


def xet_enabled() -> bool:
    """Whether the client will try Xet first for uploads (``hf_xet`` installed, not disabled)."""
    import importlib.util

    from huggingface_hub import constants

    return not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None


def quiet_client() -> None:
    """No tqdm bars from huggingface_hub (lorahub shows its own progress)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def scrub(text: str, token: str | None) -> str:
    text = " ".join(str(text).split())
    if token:
        text = text.replace(token, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    text = re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)
    return text[:400]


@contextlib.contextmanager
def hub_errors(what: str, *, endpoint: str, token: str | None = None, repo: str | None = None) -> Iterator[None]:
    """Translate huggingface_hub / HTTP errors raised inside the block into one-line LorahubErrors."""
    try:
        yield
    except LorahubError:
        raise
    except Exception as exc:  # noqa: BLE001 - every client error becomes one line
        from huggingface_hub import errors as hf_errors

        name = type(exc).__name__
        resp = getattr(exc, "response", None)
        status = getattr(resp, "status_code", None)
        server_msg = ""
        if resp is not None:
            try:
                server_msg = resp.headers.get("X-Error-Message") or ""
            except Exception:
                server_msg = ""
        where = f"{repo} on {endpoint}" if repo else endpoint
        if isinstance(exc, hf_errors.OfflineModeIsEnabled):
            raise LorahubError("HF_HUB_OFFLINE is set: push and pull need the Hub") from None
        if isinstance(exc, hf_errors.GatedRepoError):
            raise LorahubError(f"{what}: {where} is gated; accept its terms on the Hub and use a token") from None
        if isinstance(exc, hf_errors.RepositoryNotFoundError) or (status == 404 and "RepoNotFound" in str(
                getattr(resp, "headers", {}).get("X-Error-Code", ""))):
            raise NotFound(f"{what}: repo {where} not found (or private: give a token)") from None
        if isinstance(exc, hf_errors.RevisionNotFoundError):
            raise NotFound(f"{what}: revision not found in {where}") from None
        if isinstance(exc, hf_errors.EntryNotFoundError):
            raise NotFound(f"{what}: file not found in {where}") from None
        if status == 401 and "Invalid credentials" in server_msg:
            raise LorahubError(f"{what}: {endpoint} refused the token (401 {server_msg}); the token is invalid "
                               "or expired") from None
        if status in (401, 403):
            need = "a token with write access to it" if what == "push" else "a token"
            raise LorahubError(f"{what}: {where} refused the request ({status} {scrub(server_msg, token) or 'unauthorized'}); "
                               f"{need}, or log in with `hf auth login`") from None
        xet = xet_refusal(exc)
        if xet is not None:
            raise LorahubError(f"{what}: {endpoint} has no Xet storage: {xet[0]}") from None
        if status is not None:
            msg = server_msg or str(exc).splitlines()[0]
            raise LorahubError(f"{what}: {where} answered {status}: {scrub(msg, token)}") from None
        if "Connect" in name or "Timeout" in name or isinstance(exc, (ConnectionError, TimeoutError)):
            raise LorahubError(f"{what}: cannot reach {endpoint} ({scrub(exc, token) or name})") from None
        if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
            raise LorahubError(f"{what}: a file from {where} did not match the size the Hub announced; "
                               "nothing registered") from None
        if isinstance(exc, (ValueError, OSError)) or "httpx" in type(exc).__module__:
            raise LorahubError(f"{what}: {scrub(exc, token) or name}") from None
        raise
