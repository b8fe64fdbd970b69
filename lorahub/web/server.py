"""Running the gallery: bind a socket, serve the application with uvicorn, stop.

    srv = GalleryServer.bind(home, host="127.0.0.1", port=8765)   # LorahubError when the port is taken
    print(srv.url)
    srv.run()                       # until interrupted (Ctrl+C), or
    srv.start(); ...; srv.stop()    # in a background thread (tests, benchmarks)

The socket is bound before uvicorn starts, so a port in use is one clear error and ``port=0`` picks a
free port (``srv.port`` tells which).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorahub.errors import LorahubError
from lorahub.web.security import Guard, is_loopback

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


@dataclass
class GalleryServer:
    """A bound gallery server (see the module docs). ``exposed``: it listens on an address other
    machines can reach; ``entries``: how many entries the registry had when it started."""

    home: Path
    host: str
    port: int
    read_only: bool
    entries: int
    sock: socket.socket = field(repr=False)
    app: object = field(repr=False)
    _server: object = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @classmethod
    def bind(cls, home: Path | str | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
             read_only: bool = False) -> "GalleryServer":
        """Open the registry at ``home`` and bind ``host:port`` (``port=0``: any free port)."""
        from lorahub.registry.schema import default_home
        from lorahub.web.app import create_app

        if not 0 <= int(port) <= 65535:
            raise LorahubError(f"port {port}: expected a number from 0 to 65535")
        home = Path(home).expanduser() if home else default_home()
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise LorahubError(f"cannot listen on {host!r}: {exc.strerror}") from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.set_inheritable(True)
        except OSError as exc:
            sock.close()
            why = "the port is in use" if exc.errno in (98, 48) else (exc.strerror or str(exc))
            raise LorahubError(f"cannot listen on {host}:{port}: {why}") from None
        bound_port = sock.getsockname()[1]
        try:
            app = create_app(home, read_only=read_only, guard=Guard(host, bound_port, read_only=read_only))
        except BaseException:
            sock.close()
            raise
        count = app.state.registries.get().count()
        return cls(home, host, bound_port, read_only, count, sock, app)

    @property
    def exposed(self) -> bool:
        return not is_loopback(self.host)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def _uvicorn(self):
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on",
                                server_header=False, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        return self._server

    def run(self) -> None:
        """Serve until interrupted (Ctrl+C: returns normally; SIGTERM: the process ends); then close the socket."""
        try:
            self._uvicorn().run(sockets=[self.sock])
        except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the SIGINT it captured
            pass
        finally:
            self.sock.close()

    def start(self, timeout: float = 30.0) -> "GalleryServer":
        """Serve in a background thread; returns once requests are answered."""
        server = self._uvicorn()
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                        name="lorahub-gallery")
        self._thread.start()
        t0 = time.monotonic()
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                raise LorahubError("the gallery server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop a server started with :meth:`start`."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
