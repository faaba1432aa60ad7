"""Persistent evaluation store: (model fingerprint, data fingerprint, key) -> summed NLL and tokens.

Every evaluation is committed as soon as it is known, so a long run (Shapley sampling, a search)
killed at any moment resumes without redoing a stored evaluation. A store is bound to the model and
data it was created for, and to the numerics (compute dtype and device type) it was computed in;
opening it for another model, data or precision is an error, since mixing them silently would make a
resumed run wrong. SQLite in WAL mode: one writer, cheap commits, safe against a kill.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from ..errors import LayerpruneError

BUSY_TIMEOUT_S = 60.0
# Stores written before the numerics were recorded were computed in float32 on a CPU (the only
# setting those versions ran: a GPU path had never run).
LEGACY_NUMERICS = "float32@cpu"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evals (
    model_fp TEXT NOT NULL,
    data_fp TEXT NOT NULL,
    key TEXT NOT NULL,
    nll REAL NOT NULL,
    tokens INTEGER NOT NULL,
    extra TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (model_fp, data_fp, key)
);
"""


def mask_key(mask, prefix: str = "b") -> str:
    """Store key of a mask: 'b:' + one 0/1 per block ('m:' for attention/MLP unit masks)."""
    return f"{prefix}:" + "".join("1" if int(b) else "0" for b in mask)


class EvalStore:
    def __init__(
        self,
        path: str | Path,
        model_fp: str,
        data_fp: str,
        protocol: dict | None = None,
        numerics: str = LEGACY_NUMERICS,
    ):
        """`numerics`: what the values are computed in, e.g. 'bfloat16@cuda' (LoadedModel.numerics_key)."""
        self.path = Path(path)
        self.model_fp, self.data_fp = model_fp, data_fp
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = self._open()
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if not meta:  # OR IGNORE: another run may create the store at the same moment; the first wins
            with self.db:
                self.db.executemany(
                    "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                    [
                        ("model_fp", model_fp),
                        ("data_fp", data_fp),
                        ("protocol", json.dumps(protocol or {})),
                        ("numerics", numerics),
                        ("created", str(time.time())),
                    ],
                )
            meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if meta.get("model_fp") != model_fp or meta.get("data_fp") != data_fp:
            raise LayerpruneError(
                f"store {self.path} holds evaluations of model {meta.get('model_fp')} on data {meta.get('data_fp')}, "
                f"not of this model ({model_fp}) and data ({data_fp}); use a new --store path"
            )
        if meta.get("numerics", LEGACY_NUMERICS) != numerics:
            have, want = meta.get("numerics", LEGACY_NUMERICS), numerics
            raise LayerpruneError(
                f"store {self.path} holds evaluations computed in {have.replace('@', ' on ')}, not in "
                f"{want.replace('@', ' on ')}; use a new --store path, or run with the store's --dtype / --device"
            )

    def _open(self) -> sqlite3.Connection:
        """Several runs may share a store (two scorers, a search and its resume): writers wait for
        each other (busy timeout) instead of failing with "database is locked". Switching a new file
        to WAL while another connection does the same can fail at once, without the busy handler
        (SQLite's deadlock rule): the whole opening is then tried again until the same timeout."""
        deadline, attempt = time.monotonic() + BUSY_TIMEOUT_S, 0
        while True:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
            try:
                db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(SCHEMA)
                return db
            except sqlite3.DatabaseError as e:
                db.close()
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise LayerpruneError(
                        f"{self.path} is not an evaluation store ({e}); choose another --store path"
                    ) from None
            time.sleep(min(0.5, 0.01 * 2**attempt) * (0.5 + random.random()))
            attempt += 1

    def get(self, key: str) -> tuple[float, int] | None:
        row = self.db.execute(
            "SELECT nll, tokens FROM evals WHERE model_fp=? AND data_fp=? AND key=?",
            (self.model_fp, self.data_fp, key),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def get_many(self, keys: Iterable[str]) -> dict[str, tuple[float, int]]:
        wanted = set(keys)
        rows = self.db.execute(
            "SELECT key, nll, tokens FROM evals WHERE model_fp=? AND data_fp=?", (self.model_fp, self.data_fp)
        )
        return {k: (nll, tok) for k, nll, tok in rows if k in wanted}

    def put(self, key: str, nll: float, tokens: int, extra: dict | None = None) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO evals VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    self.model_fp,
                    self.data_fp,
                    key,
                    float(nll),
                    int(tokens),
                    json.dumps(extra) if extra else None,
                    time.time(),
                ),
            )

    def __len__(self) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM evals WHERE model_fp=? AND data_fp=?", (self.model_fp, self.data_fp)
        ).fetchone()[0]

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> EvalStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
