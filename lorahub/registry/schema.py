"""The catalogue database: where a home is, connecting, the one write-transaction helper, migrations.

The schema is the numbered SQL files of ``registry/migrations/`` (``NNNN_name.sql``); the database's
``PRAGMA user_version`` says how many of them it has. Standard library only: every catalogue
command opens the database, and ``lorahub search`` must start fast.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

from lorahub.errors import LorahubError

DB_NAME = "lorahub.db"


def now_iso() -> str:
    """The current UTC time as the catalogue stores it (``2026-01-31T12:00:00Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_home() -> Path:
    """The registry home: ``$LORAHUB_HOME``, else ``~/.lorahub``."""
    env = os.environ.get("LORAHUB_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".lorahub"


def migrations() -> list[tuple[int, Path]]:
    """The numbered migration files, in order: ``[(1, .../0001_init.sql), (2, ...), ...]``."""
    from lorahub.resources import migrations_dir

    out = []
    for p in sorted(migrations_dir().glob("*.sql")):
        m = re.match(r"^(\d+)_", p.name)
        if m:
            out.append((int(m.group(1)), p))
    nums = [n for n, _ in out]
    if not nums or nums[0] != 1 or len(set(nums)) != len(nums):  # gaps allowed: each migration stands alone
        raise LorahubError(f"registry migrations are not numbered 1, ... without repeats: {nums}")
    return out


def _statements(sql: str) -> Iterable[str]:
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip() and not all(l.strip().startswith("--") or not l.strip() for l in buf.splitlines()):
        raise LorahubError("registry migration ends with an incomplete SQL statement")


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One short write transaction: ``BEGIN IMMEDIATE`` (the write lock, waiting up to the busy
    timeout), ``COMMIT`` on success, ``ROLLBACK`` on any error. The only way lorahub writes."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        raise LorahubError(f"the registry database is busy or read-only ({exc})") from None
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def insert(conn: sqlite3.Connection, table: str, row: dict, *, or_ignore: bool = False) -> None:
    """Insert ``row`` (column -> value) into ``table`` (``or_ignore``: skip it on a UNIQUE conflict)."""
    cols = ", ".join(f'"{c}"' for c in row)
    verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
    conn.execute(f'{verb} INTO "{table}" ({cols}) VALUES ({", ".join("?" * len(row))})', list(row.values()))


def migrate(conn: sqlite3.Connection, *, target: int | None = None) -> int:
    """Apply the numbered migrations above the database's ``user_version`` (up to ``target``)."""
    migs = migrations()
    latest = migs[-1][0] if migs else 0
    target = latest if target is None else target
    version = schema_version(conn)
    if version > latest:
        raise LorahubError(
            f"the registry database has schema version {version}, newer than this lorahub supports "
            f"({latest}); upgrade lorahub to open it")
    if version >= target:
        return version
    with transaction(conn):
        version = schema_version(conn)  # another process may have migrated meanwhile
        for num, path in migs:
            if version < num <= target:
                for stmt in _statements(path.read_text(encoding="utf-8")):
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {num}")
                version = num
    return version


def connect(db: Path) -> sqlite3.Connection:
    """A connection to the catalogue at ``db`` in autocommit mode (writes go through
    :func:`transaction`), WAL journal, rows as :class:`sqlite3.Row`, foreign keys on."""
    try:
        conn = sqlite3.connect(str(db), timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        raise LorahubError(f"{db}: cannot open the registry database ({exc})") from None
    return conn


def connect_readonly(db: Path) -> sqlite3.Connection:
    """A read-only connection (``mode=ro``, ``query_only``): no statement can change the catalogue."""
    db = Path(db)
    if not db.is_file():
        raise LorahubError(f"{db.parent}: no lorahub registry here (no {DB_NAME})")
    try:
        conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=30.0, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA query_only = ON")
        schema_version(conn)
    except sqlite3.DatabaseError as exc:
        raise LorahubError(f"{db}: cannot open the registry database ({exc})") from None
    return conn
