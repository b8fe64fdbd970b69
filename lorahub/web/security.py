"""The gallery's defences, as one ASGI middleware and a CSRF check.

* **Host check** (against DNS rebinding): when the server listens on a loopback address, only requests
  whose ``Host`` is that address, ``localhost`` or ``127.0.0.1`` / ``[::1]`` are answered.
* **Sessions and CSRF**: every browser gets a random session cookie (``HttpOnly``, ``SameSite=Strict``);
  every write must carry the session's token (an HMAC of the session id with a secret made when the
  server starts), sent in the form (``csrf``) or the ``X-CSRF-Token`` header, and must not come from
  another site (``Origin`` / ``Sec-Fetch-Site``).
* **Headers** on every response: a strict Content-Security-Policy (scripts and styles only from the
  server, no inline script), ``X-Content-Type-Options: nosniff``, no framing, no referrer to other sites; and
  ``Server-Timing: app;dur=<ms>`` (the time the server took, read by the benchmark).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make Chromium send "Origin: null"
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_SESSION = re.compile(r"^[A-Za-z0-9_-]{32,64}$")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or ``localhost``) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8765`` -> ``[::1]``, ``localhost:80`` -> ``localhost``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if ":" in header else header


class Guard:
    """Settings of the defences of one server: the hosts it answers, the CSRF secret, read-only mode."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, read_only: bool = False):
        self.secret = secrets.token_bytes(32)
        self.read_only = read_only
        self.port = port
        bound = host.lower()
        bound = f"[{bound}]" if ":" in bound and not bound.startswith("[") else bound
        # a loopback server answers only loopback names; one exposed on purpose answers any name
        self.allowed_hosts: tuple[str, ...] | None = (
            tuple(dict.fromkeys((bound,) + LOOPBACK_NAMES)) if is_loopback(host) else None)

    @property
    def cookie(self) -> str:
        # cookies are shared by every port of a host: one name per port keeps two servers apart
        return f"lorahub_session_{self.port}"

    def token(self, session: str) -> str:
        """The CSRF token of a session."""
        return hmac.new(self.secret, session.encode(), hashlib.sha256).hexdigest()

    def host_allowed(self, header: str | None) -> bool:
        if self.allowed_hosts is None:
            return True
        return bool(header) and host_name(header) in self.allowed_hosts

    def write_allowed(self, session: str | None, token: str | None, headers) -> str | None:
        """Why a write request must be refused (None when it may go on)."""
        if self.read_only:
            return "this gallery is read-only"
        site = headers.get("sec-fetch-site")
        if site and site not in ("same-origin", "none"):
            return "cross-site request refused"
        origin = headers.get("origin")
        if origin and origin != "null":
            parts = urlsplit(origin)
            if parts.netloc.lower() != (headers.get("host") or "").lower():
                return "cross-origin request refused"
        elif origin == "null":
            return "cross-origin request refused"
        if not session or not token or not hmac.compare_digest(self.token(session), token):
            return "missing or wrong CSRF token (reload the page and try again)"
        return None


class GuardMiddleware:
    """ASGI middleware: host check, session cookie, security headers, Server-Timing (see module docs).
    The session id is put in ``scope["state"]["session"]`` for the handlers."""

    def __init__(self, app, guard: Guard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self.guard.host_allowed(headers.get("host")):
            return await _plain(send, 421, "this server answers only requests to its own address")
        session = None
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header: start a new session
            cookie = SimpleCookie()
        morsel = cookie.get(self.guard.cookie)
        if morsel is not None and _SESSION.match(morsel.value):
            session = morsel.value
        new = session is None
        if new:
            session = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["session"] = session

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                hdrs = list(message.get("headers", []))
                names = {k.lower() for k, _ in hdrs}
                hdrs += [(k, v) for k, v in HEADERS if k not in names]
                # pages are always fresh; the page's own files (versioned URLs) are kept an hour
                if b"cache-control" not in names:
                    static = scope["path"].startswith("/static/")
                    hdrs.append((b"cache-control", b"max-age=3600" if static else b"no-store"))
                if new:
                    hdrs.append((b"set-cookie", f"{self.guard.cookie}={session}; Path=/; HttpOnly; "
                                                "SameSite=Strict".encode()))
                hdrs.append((b"server-timing", f"app;dur={(time.perf_counter() - t0) * 1000:.1f}".encode()))
                message = {**message, "headers": hdrs}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _plain(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())] + HEADERS})
    await send({"type": "http.response.body", "body": body})
