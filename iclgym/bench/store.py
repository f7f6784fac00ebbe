"""The results store: one SQLite database (stdlib ``sqlite3``, write-ahead log) holding one row
per (suite version, entry, model, config hash, seed).

Each row records what a score was computed on (the entry's data fingerprint), by what (model
name, config hash, parameter count, a training FLOPs estimate, the iclgym version and git
commit, the device) and the scores themselves (JSON). Every write is one transaction
(``with connection:``): a writer killed at any instant, SIGKILL included, leaves every
committed row whole and no partial row (SQLite's atomic commit; ``synchronous=FULL`` also keeps
committed rows through a power loss). Rows are immutable once written except the ``verified``
flag, which only :meth:`ResultsStore.mark_verified` sets.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from iclgym.validation import is_real

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    suite_version TEXT NOT NULL,
    entry TEXT NOT NULL,
    model TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    seed INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    iclgym_version TEXT NOT NULL,
    git_commit TEXT NOT NULL,
    parameters INTEGER NOT NULL,
    train_flops REAL NOT NULL,
    wall_s REAL NOT NULL,
    device TEXT NOT NULL,
    scores TEXT NOT NULL,
    checkpoint TEXT NOT NULL DEFAULT '',
    verified INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (suite_version, entry, model, config_hash, seed)
)
"""


def check_oracle_bound(entry: str, scores: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming ``entry`` when ``scores`` beat the exact Bayes oracle
    beyond chance: excess loss < -(3 ``excess_loss_se`` + ``oracle_mc_error`` (0 when not
    recorded) + ``ORACLE_MARGIN``, the margin of :func:`iclgym.harness.evaluate.beats_oracle`
    for the heavy-tailed per-sequence excess). No predictor that reads only the context can, so such
    a result reads what it should not (e.g. future tokens) and is never stored or verified."""
    from iclgym.harness.evaluate import oracle_bound  # one rule for eval, bench, verify

    excess = scores.get("excess_loss")
    if not is_real(excess):
        return
    se, mc = scores.get("excess_loss_se"), scores.get("oracle_mc_error")
    if excess < -oracle_bound(se, mc):
        se, mc = (f"{x:.2g}" if is_real(x) else "n/a" for x in (se, mc))
        raise ValueError(
            f"{entry}: excess loss {excess:.4g} +- {se} (SE) nats/token beats the exact "
            f"Bayes oracle (Monte-Carlo error {mc}): the predictor reads information it "
            "should not, e.g. future tokens"
        )


@dataclass(frozen=True)
class ResultRow:
    """One result (the columns of the ``results`` table but ``id``, ``verified`` and
    ``created``, which the store sets). ``scores`` is a JSON-ready mapping (e.g. excess loss,
    accuracy, normalised score, each with its standard error); ``checkpoint`` is the trained
    model's checkpoint file, relative to the store's folder (``""``: none kept), which
    :mod:`iclgym.bench.verify` re-evaluates."""

    suite_version: str
    entry: str
    model: str
    config_hash: str
    seed: int
    fingerprint: str
    iclgym_version: str
    git_commit: str
    parameters: int
    train_flops: float
    wall_s: float
    device: str
    scores: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str = ""


COLUMNS = tuple(f.name for f in fields(ResultRow))


class ResultsStore:
    """The SQLite results store at ``path`` (created with its schema on first use; WAL mode,
    ``synchronous=FULL``). Usable as a context manager (closes the connection). Raises
    ``ValueError`` for a file that is not an SQLite database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = sqlite3.connect(self.path, timeout=30.0)
        try:
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA synchronous=FULL")
            with self.connection:
                self.connection.execute(SCHEMA)
        except sqlite3.DatabaseError as err:
            self.connection.close()
            raise ValueError(f"{str(self.path)!r} is not an iclgym results store: {err}") from None

    def add(self, row: ResultRow) -> int:
        """Insert ``row`` in one transaction; returns its id. Raises ``ValueError`` when a row
        with the same (suite version, entry, model, config hash, seed) exists (rows are
        immutable: a new config is a new config hash) or when its scores beat the Bayes oracle
        beyond chance (:func:`check_oracle_bound`)."""
        check_oracle_bound(row.entry, row.scores)
        values = asdict(row)
        values["scores"] = json.dumps(dict(row.scores), sort_keys=True)
        placeholders = ", ".join("?" for _ in COLUMNS)
        try:
            with self.connection:
                cursor = self.connection.execute(
                    f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                    [values[c] for c in COLUMNS],
                )
        except sqlite3.IntegrityError as err:
            raise ValueError(
                f"a result for ({row.suite_version}, {row.entry}, {row.model}, "
                f"{row.config_hash}, seed {row.seed}) is already stored: {err}"
            ) from None
        return int(cursor.lastrowid)

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        """Stored rows as dicts (``scores`` parsed), filtered by column equality, by id."""
        bad = set(where) - {*COLUMNS, "id", "verified"}
        if bad:
            raise ValueError(f"unknown columns {sorted(bad)}: expected some of {COLUMNS}")
        clause = " AND ".join(f"{k} = ?" for k in where)
        query = "SELECT * FROM results" + (f" WHERE {clause}" if clause else "") + " ORDER BY id"
        cursor = self.connection.execute(query, list(where.values()))
        names = [d[0] for d in cursor.description]
        return [self._parse(dict(zip(names, values, strict=True))) for values in cursor]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows())

    def __len__(self) -> int:
        return int(self.connection.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def mark_verified(self, row_id: int) -> None:
        """Set the ``verified`` flag of row ``row_id`` (``ValueError`` if there is none)."""
        with self.connection:
            cursor = self.connection.execute(
                "UPDATE results SET verified = 1 WHERE id = ?", (row_id,)
            )
        if cursor.rowcount != 1:
            raise ValueError(f"no result with id {row_id}")

    def check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` (``"ok"`` for an intact database)."""
        return str(self.connection.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _parse(row: dict[str, Any]) -> dict[str, Any]:
        row["scores"] = json.loads(row["scores"])
        row["verified"] = bool(row["verified"])
        return row
