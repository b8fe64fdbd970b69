"""Read-only SQL over the catalogue, for users who live in the sqlite-utils / Datasette world.

``lorahub.db`` is a plain SQLite file (tables ``entries``, ``lineage``, ``previews``, ``remotes``,
``scan_cache``; full-text index ``entries_fts``; JSON columns hold JSON text, so SQLite's ``json_each``
works on ``tags``/``triggers``): ``sqlite-utils`` and ``datasette`` open it as is. :func:`database`
gives a ``sqlite_utils.Database`` on a read-only connection; :func:`query` runs one statement on it
and refuses anything that would change the catalogue with one clear error.

This is where lorahub uses sqlite-utils. The catalogue's own reads and writes stay on the standard
library: ``import sqlite_utils`` takes ~0.1 s (it imports numpy, and pandas when installed), a third
of ``lorahub search``'s 0.3 s budget.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from lorahub.errors import LorahubError
from lorahub.registry.schema import DB_NAME, connect_readonly, default_home

READ_ONLY = ("the catalogue is opened read-only: only a query that returns rows (SELECT, WITH, a read-only "
             "PRAGMA) can run, nothing that changes it")


class ReadOnly(LorahubError):
    """A statement that would change the catalogue (these queries only read)."""


@dataclass
class QueryResult:
    columns: list[str]      # column names, in order (empty when there are no rows)
    rows: list[dict]


def database(home: str | os.PathLike | None = None):
    """A ``sqlite_utils.Database`` on a read-only connection to the catalogue of ``home`` (default:
    ``$LORAHUB_HOME``, else ``~/.lorahub``): ``db["entries"].rows_where("base = ?", ["sdxl"])``,
    ``db.query(...)``, ``db.table_names()``. Close it when done (``db.close()``)."""
    import sqlite_utils

    db_path = (Path(home).expanduser() if home else default_home()) / DB_NAME
    return sqlite_utils.Database(connect_readonly(db_path), recursive_triggers=False, execute_plugins=False)


def query(sql: str, params: dict | list | None = None, *, home: str | os.PathLike | None = None) -> QueryResult:
    """Run one read-only SQL statement on the catalogue of ``home``; return its columns and rows.

    Statements that write (INSERT, UPDATE, DELETE, CREATE, DROP, PRAGMA assignments, ATTACH,
    transactions, ...) raise :class:`ReadOnly`; the database is opened read-only, so nothing can
    change it either way. Other SQL errors raise :class:`~lorahub.errors.LorahubError`.
    """
    db = database(home)
    try:
        rows = list(db.query(sql, params))
    except ValueError:  # sqlite-utils: the statement returns no rows (a write, a transaction, ATTACH ...)
        raise ReadOnly(READ_ONLY) from None
    except sqlite3.OperationalError as exc:
        if "readonly" in str(exc):
            raise ReadOnly(READ_ONLY) from None
        raise LorahubError(f"SQL error: {exc}") from None
    except sqlite3.Error as exc:
        raise LorahubError(f"SQL error: {exc}") from None
    finally:
        db.close()
    return QueryResult(list(rows[0]) if rows else [], rows)
