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


def check_online() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise LorahubError("HF_HUB_OFFLINE is set: push and pull need the Hub (unset it or set HF_HUB_OFFLINE=0)")


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
        if status in (401, 403):
            raise LorahubError(f"{what}: {where} refused the request ({status} {server_msg or 'unauthorized'}); "
                               "give a write token or log in with `hf auth login`") from None
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
