"""The plugin's durable spool: undelivered events, refused ones (dead letters) and its own state, in SQLite."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Any


class Spool:
    """Durable, ordered store of undelivered events (``spool``) and refused ones (``dead``).

    Rows are keyed by the event's reception sequence number, so events written later by a
    different path (queue overflow, a failed batch, the in-memory queue at shutdown)
    still come out in the order Orthanc received them.
    """

    def __init__(self, path: str):
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY, event TEXT NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS dead (seq INTEGER PRIMARY KEY, event TEXT NOT NULL,"
            " status INTEGER, reason TEXT, at REAL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.length = self._count("spool")
        self.dead_length = self._count("dead")

    def _count(self, table: str) -> int:
        return self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def last_seq(self) -> int:
        """The highest sequence number stored (spool or dead), -1 when empty."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(m) FROM (SELECT MAX(seq) AS m FROM spool UNION ALL SELECT MAX(seq) FROM dead)"
            ).fetchone()
        return -1 if row[0] is None else int(row[0])

    def append(self, rows: list[tuple[int, str]]) -> None:
        """Store events (seq, JSON text); an event already spooled is kept once."""
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            added = self._db.executemany("INSERT OR IGNORE INTO spool (seq, event) VALUES (?, ?)", rows).rowcount
            self._db.execute("COMMIT")
            self.length += added  # no COUNT(*): this runs every MaxBatchDelay during an outage

    def head(self, limit: int, below: int) -> list[tuple[int, str]]:
        """The oldest `limit` spooled events numbered below `below`, in reception order."""
        with self._lock:
            return self._db.execute("SELECT seq, event FROM spool WHERE seq < ? ORDER BY seq LIMIT ?",
                                    (below, limit)).fetchall()

    def remove(self, seqs: list[int]) -> None:
        """Forget delivered events."""
        with self._lock:
            self._db.execute("BEGIN")
            removed = self._db.executemany("DELETE FROM spool WHERE seq = ?", [(s,) for s in seqs]).rowcount
            self._db.execute("COMMIT")
            self.length -= removed

    def bury(self, rows: list[tuple[int, str]], status: int, reason: str) -> None:
        """Move refused events to the dead letters (removing them from the spool if there)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO dead (seq, event, status, reason, at) VALUES (?, ?, ?, ?, ?)",
                [(seq, text, status, reason, now) for seq, text in rows],
            )
            self._db.executemany("DELETE FROM spool WHERE seq = ?", [(seq,) for seq, _ in rows])
            self._db.execute("COMMIT")
            self.length = self._count("spool")
            self.dead_length = self._count("dead")

    def resurrect(self) -> int:
        """Move every dead letter back to the spool; returns how many."""
        with self._lock:
            self._db.execute("BEGIN")
            moved = self._db.execute("INSERT OR IGNORE INTO spool (seq, event) SELECT seq, event FROM dead").rowcount
            self._db.execute("DELETE FROM dead")
            self._db.execute("COMMIT")
            self.length = self._count("spool")
            self.dead_length = 0
        return moved

    def dead_letters(self, limit: int) -> list[dict[str, Any]]:
        """The oldest `limit` dead letters with why they were refused."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, status, reason, at, event FROM dead ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [{"seq": s, "status": st, "reason": r, "at": at, "event": json.loads(e)}
                for s, st, r, at, e in rows]

    def instance_ids(self) -> set[str]:
        """Orthanc ids of the instances whose events are spooled or dead letters (read at start only)."""
        with self._lock:
            texts = self._db.execute("SELECT event FROM spool UNION ALL SELECT event FROM dead").fetchall()
        ids = set()
        for (text,) in texts:
            try:
                ids.add(json.loads(text)["orthanc"]["instance"])
            except (ValueError, KeyError, TypeError):  # a series/study event, or an unprocessed item
                pass
        return ids

    def get_state(self, key: str) -> str | None:
        """A value of the plugin's own state (e.g. the change-log checkpoint), None if unset."""
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_state(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        """Close the database (the WAL is checkpointed)."""
        with self._lock:
            self._db.close()

