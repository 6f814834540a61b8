"""The annotation database: one SQLite file holding the items, the annotators' tokens and every decision.

The database is the only state of `dpokit annotate serve`: the server keeps nothing in memory that a restart would
lose. Each decision is one row, committed in write-ahead-log mode with ``synchronous=FULL`` (the log is fsynced at
every commit) before the server answers, and the page moves on only after that answer: a reload, a closed tab, a
killed server or a power cut loses nothing. Decisions are keyed by (item, annotator), so one annotator decides an
item once whatever the page or the network repeats.

Items are handed out as *assignments*. An annotator who asks for work first gets back an assignment they left open
(a reload shows the same item, in the same order); otherwise the first item, in file order, that they have not seen
and that still needs labels: fewer than `overlap` annotators have labelled it (a skip does not count) or hold it
open. An open assignment holds its place for `LEASE_S` seconds, so that two annotators working at once do not both
label an item that needs one label, yet an abandoned tab does not block the item for ever. Which response is shown
on the left is drawn at random when the item is assigned, and stored with the decision.

Several server processes may share one file: every write is a transaction taken with ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

from dpokit.errors import ConfigError, DpokitError

SCHEMA_VERSION = 1
KINDS = ("pairs", "ab")
"""`pairs`: two responses to compare (a preference file, scored samples, Label Studio tasks); `ab`: a policy's and
its reference's samples of one prompt (`dpokit eval --save_samples`), for a blind A/B comparison."""
CHOICES = ("a", "b", "tie", "skip")
SHOWN_CHOICES = ("left", "right", "tie", "skip")
LEASE_S = 900.0
"""How long an open assignment keeps its item from other annotators (15 minutes)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    position INTEGER NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    system TEXT,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    source TEXT NOT NULL,
    meta TEXT NOT NULL,
    serve INTEGER NOT NULL,
    labels INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS items_open ON items (done, position);
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    item_id TEXT NOT NULL REFERENCES items (id),
    annotator TEXT NOT NULL,
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    assigned_at REAL NOT NULL,
    choice TEXT CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    rationale TEXT,
    decided_at REAL,
    seq INTEGER UNIQUE,
    PRIMARY KEY (item_id, annotator)
);
CREATE INDEX IF NOT EXISTS assignments_open ON assignments (annotator, choice);
"""


class Refused(Exception):
    """A request the store turns down; `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def item_id(kind: str, prompt, system, a, b, extra=None) -> str:
    """The same content gives the same id: loading a file again adds only what is new."""
    text = json.dumps([kind, prompt, system, a, b, extra], ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Store:
    """One annotation database. Thread-safe: the server calls it from a pool of threads."""

    def __init__(self, path, *, create: bool = True, lease_s: float = LEASE_S):
        self.path = Path(path)
        self.lease_s = lease_s
        self.overlap = 1  # annotators per item (`set_overlap`)
        if not create and not self.path.is_file():
            raise ConfigError(f"--db {self.path}: no such file (`dpokit annotate serve ITEMS --db {self.path}` "
                              "creates it)")
        if self.path.is_dir():
            raise ConfigError(f"--db {self.path} is a directory; give a file such as annotations.sqlite")
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise DpokitError(f"--db {self.path}: SQLite refused write-ahead logging (journal mode {mode}); "
                                  "put the database on a local file system")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            if self.path.is_file() and not os.access(self.path.parent, os.W_OK):
                raise DpokitError(f"--db {self.path}: its directory is not writable, and SQLite writes beside the "
                                  "database (its write-ahead log) even to read it; copy it to a writable disk") from None
            raise DpokitError(f"--db {self.path}: not a usable SQLite database ({exc})") from None

    def _check_schema(self) -> None:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise DpokitError(f"--db {self.path}: an SQLite database of something else (tables: "
                              f"{', '.join(sorted(tables))}); give a new file")
        with self._tx() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            version = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if version is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(version[0]) != SCHEMA_VERSION:
                raise DpokitError(f"--db {self.path}: schema version {version[0]}, this dpokit reads "
                                  f"{SCHEMA_VERSION}")

    @contextmanager
    def _tx(self):
        """One write transaction, taken at once (BEGIN IMMEDIATE) so that two processes never interleave."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------------ meta

    def get_meta(self, key: str) -> Optional[str]:
        rows = self._read("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                       (key, value))

    @property
    def kind(self) -> Optional[str]:
        return self.get_meta("kind")

    # ------------------------------------------------------------------------------------------------ items

    def add_items(self, kind: str, items: Iterable[dict]) -> tuple[int, int]:
        """Add items (dicts of id, prompt, system, a, b, source, meta, serve); returns (added, already there).
        A database holds one kind of item: A/B samples and preference pairs are exported differently."""
        if kind not in KINDS:
            raise ValueError(kind)
        added = present = 0
        with self._tx() as db:
            stored = db.execute("SELECT value FROM meta WHERE key='kind'").fetchone()
            if stored is not None and stored[0] != kind:
                raise ConfigError(f"--db {self.path} holds {stored[0]} items; these are {kind} items: use another "
                                  "database for them")
            if stored is None:
                db.execute("INSERT INTO meta VALUES ('kind', ?)", (kind,))
            position = db.execute("SELECT COALESCE(MAX(position), 0) FROM items").fetchone()[0]
            for it in items:
                if db.execute("SELECT 1 FROM items WHERE id=?", (it["id"],)).fetchone():
                    present += 1
                    continue
                position += 1
                db.execute("INSERT INTO items (id, position, prompt, system, a, b, source, meta, serve) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (it["id"], position, json.dumps(it["prompt"], ensure_ascii=False), it.get("system"),
                            json.dumps(it["a"], ensure_ascii=False), json.dumps(it["b"], ensure_ascii=False),
                            it["source"], json.dumps(it.get("meta") or {}, ensure_ascii=False),
                            int(it.get("serve", True))))
                added += 1
        return added, present

    def set_overlap(self, overlap: int) -> None:
        """Mark the items that `overlap` labels complete (the overlap may change from one start to the next)."""
        with self._tx() as db:
            db.execute("UPDATE items SET done = (labels >= ?)", (overlap,))
        self.overlap = overlap

    def items(self) -> list[dict]:
        return [_item(r) for r in self._read("SELECT * FROM items ORDER BY position")]

    def count_items(self) -> dict:
        rows = self._read("SELECT COUNT(*), COALESCE(SUM(serve), 0), COALESCE(SUM(done AND serve), 0) FROM items")
        total, served, done = rows[0]
        return {"items": total, "served": served, "complete": done}

    # ------------------------------------------------------------------------------------------------ annotators

    def add_tokens(self, names: Iterable[str]) -> dict[str, str]:
        """A new token for each name (replacing one it had); only the tokens' SHA-256 is stored."""
        tokens = {}
        with self._tx() as db:
            for name in names:
                token = secrets.token_urlsafe(24)
                db.execute("INSERT INTO annotators VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                           "token_sha256=excluded.token_sha256", (name, token_digest(token), time.time()))
                tokens[name] = token
        return tokens

    def has_tokens(self) -> bool:
        return bool(self._read("SELECT 1 FROM annotators WHERE token_sha256 IS NOT NULL LIMIT 1"))

    def annotator_for_token(self, token: str) -> Optional[str]:
        rows = self._read("SELECT name FROM annotators WHERE token_sha256=?", (token_digest(token),))
        return rows[0][0] if rows else None

    # ------------------------------------------------------------------------------------------------ work

    def _taken(self, db, item: str, fresh_after: float, exclude: str) -> int:
        """Labels an item has (skips do not count) plus assignments others hold open, `exclude` not counted."""
        return db.execute("SELECT COUNT(*) FROM assignments WHERE item_id=? AND annotator != ? AND "
                          "(choice IN ('a', 'b', 'tie') OR (choice IS NULL AND assigned_at > ?))",
                          (item, exclude, fresh_after)).fetchone()[0]

    def next_item(self, annotator: str, now: Optional[float] = None) -> Optional[dict]:
        """The item to show `annotator` (module docstring), as the page shows it: ``{id, position, prompt, system,
        left, right}``; None when nothing is left for them."""
        now = time.time() if now is None else now
        overlap = self.overlap
        fresh_after = now - self.lease_s
        with self._tx() as db:
            for row in db.execute("SELECT item_id, left_side FROM assignments WHERE annotator=? AND choice IS NULL "
                                  "ORDER BY assigned_at, item_id", (annotator,)).fetchall():
                if self._taken(db, row["item_id"], fresh_after, annotator) < overlap:
                    return self._shown(db, row["item_id"], row["left_side"])
                # Others labelled it while this assignment lay idle past its lease: it needs no more labels.
                db.execute("DELETE FROM assignments WHERE item_id=? AND annotator=? AND choice IS NULL",
                           (row["item_id"], annotator))
            found = db.execute(
                "SELECT i.id FROM items i WHERE i.done = 0 AND i.serve = 1 "
                "AND NOT EXISTS (SELECT 1 FROM assignments x WHERE x.item_id = i.id AND x.annotator = ?) "
                "AND (SELECT COUNT(*) FROM assignments y WHERE y.item_id = i.id AND (y.choice IN ('a', 'b', 'tie') "
                "OR (y.choice IS NULL AND y.assigned_at > ?))) < ? ORDER BY i.position LIMIT 1",
                (annotator, fresh_after, overlap)).fetchone()
            if found is None:
                return None
            left = "a" if secrets.randbelow(2) == 0 else "b"
            db.execute("INSERT INTO assignments (item_id, annotator, left_side, assigned_at) VALUES (?, ?, ?, ?)",
                       (found["id"], annotator, left, now))
            return self._shown(db, found["id"], left)

    @staticmethod
    def _shown(db, item: str, left: str) -> dict:
        r = db.execute("SELECT id, position, prompt, system, a, b FROM items WHERE id=?", (item,)).fetchone()
        sides = {"a": json.loads(r["a"]), "b": json.loads(r["b"])}
        return {"id": r["id"], "position": r["position"], "prompt": json.loads(r["prompt"]), "system": r["system"],
                "left": sides[left], "right": sides["b" if left == "a" else "a"]}

    def decide(self, annotator: str, item: str, shown: str, rationale: str = "", now: Optional[float] = None
               ) -> bool:
        """Record `annotator`'s decision on `item` (`shown`: left, right, tie or skip, as the page showed it).
        Returns False for a new decision, True when the same decision was recorded before (a repeated request);
        raises `Refused` for an unknown item (404), one not assigned to them or decided otherwise before (409)."""
        if shown not in SHOWN_CHOICES:
            raise Refused(400, f"choice must be one of {', '.join(SHOWN_CHOICES)}")
        now = time.time() if now is None else now
        with self._tx() as db:
            if db.execute("SELECT 1 FROM items WHERE id=?", (item,)).fetchone() is None:
                raise Refused(404, f"no item {item}")
            row = db.execute("SELECT left_side, choice, rationale FROM assignments WHERE item_id=? AND annotator=?",
                             (item, annotator)).fetchone()
            if row is None:
                raise Refused(409, f"item {item} is not assigned to {annotator}; ask for the next item")
            choice = {"left": row["left_side"], "right": "b" if row["left_side"] == "a" else "a"}.get(shown, shown)
            if row["choice"] is not None:
                if row["choice"] == choice and (row["rationale"] or "") == rationale:
                    return True
                raise Refused(409, f"{annotator} already decided item {item}")
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM assignments").fetchone()[0]
            db.execute("UPDATE assignments SET choice=?, rationale=?, decided_at=?, seq=? WHERE item_id=? AND "
                       "annotator=?", (choice, rationale, now, seq, item, annotator))
            if choice != "skip":
                db.execute("UPDATE items SET labels = labels + 1, done = (labels + 1 >= ?) WHERE id=?",
                           (self.overlap, item))
        return False

    def import_decision(self, annotator: str, item: str, choice: str, left: str, rationale: str = "",
                        decided_at: Optional[float] = None) -> bool:
        """Record a decision made elsewhere (another tool's export); False when `annotator` had decided `item`."""
        if choice not in CHOICES or left not in ("a", "b"):
            raise ValueError((choice, left))
        with self._tx() as db:
            if db.execute("SELECT 1 FROM assignments WHERE item_id=? AND annotator=? AND choice IS NOT NULL",
                          (item, annotator)).fetchone():
                return False
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM assignments").fetchone()[0]
            when = time.time() if decided_at is None else decided_at
            db.execute("INSERT INTO assignments (item_id, annotator, left_side, assigned_at, choice, rationale, "
                       "decided_at, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (item_id, annotator) DO UPDATE "
                       "SET left_side=excluded.left_side, choice=excluded.choice, rationale=excluded.rationale, "
                       "decided_at=excluded.decided_at, seq=excluded.seq",
                       (item, annotator, left, when, choice, rationale, when, seq))
            if choice != "skip":
                db.execute("UPDATE items SET labels = labels + 1, done = (labels + 1 >= ?) WHERE id=?",
                           (self.overlap, item))
        return True

    def progress(self, annotator: str) -> dict:
        counts = self.count_items()
        mine = self._read("SELECT COUNT(*) FROM assignments WHERE annotator=? AND choice IS NOT NULL", (annotator,))
        return {"yours": mine[0][0], "items": counts["served"], "complete": counts["complete"]}

    def decisions(self) -> list[dict]:
        """Every decision, in item order then decision order: item, annotator, choice (a/b/tie/skip), left (the
        side shown on the left), rationale, decided_at, seq."""
        rows = self._read("SELECT item_id, annotator, choice, left_side, rationale, decided_at, seq FROM assignments "
                          "JOIN items ON items.id = assignments.item_id WHERE choice IS NOT NULL "
                          "ORDER BY items.position, seq")
        return [{"item": r["item_id"], "annotator": r["annotator"], "choice": r["choice"], "left": r["left_side"],
                 "rationale": r["rationale"] or "", "decided_at": r["decided_at"], "seq": r["seq"]} for r in rows]


def _item(r: sqlite3.Row) -> dict:
    return {"id": r["id"], "position": r["position"], "prompt": json.loads(r["prompt"]), "system": r["system"],
            "a": json.loads(r["a"]), "b": json.loads(r["b"]), "source": r["source"], "meta": json.loads(r["meta"]),
            "serve": bool(r["serve"]), "labels": r["labels"]}
