"""The resumable state of a run: one cursor per resource type plus the tallies so far.

Written atomically (temporary file, fsync, rename) after every completed page, so an
interrupted run resumes at the first page it had not finished; pages are idempotent, so
repeating the one that was in flight changes nothing. The file holds resource ids and
timestamps, never resource content; it is still written with mode 0600. A checkpoint
records the run it belongs to (policy digest, keys, shard, mode) and is refused for any
other run, since skipping pages that were judged under other settings would be wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "fhircrypt-reencrypt-checkpoint/1"


@dataclass
class Cursor:
    """Where the walk of one type stands: everything before ``since`` is done, and ``seen`` at it.

    ``after`` means every resource last updated exactly at ``since`` is done too (the next
    query asks ``gt`` instead of ``ge``). ``until`` bounds the walk to what existed when it
    began (see ``walker``); it is kept across resumes so the run's own writes stay outside.
    """

    since: str | None = None
    seen: list[str] = field(default_factory=list)
    after: bool = False
    done: bool = False
    until: str | None = None

    def to_json(self) -> dict:
        return {"since": self.since, "seen": self.seen, "after": self.after, "done": self.done, "until": self.until}

    @classmethod
    def from_json(cls, doc: dict) -> Cursor:
        seen = list(doc.get("seen") or [])
        return cls(doc.get("since"), seen, bool(doc.get("after")), bool(doc.get("done")), doc.get("until"))


class CheckpointError(ValueError):
    """The checkpoint belongs to another run or cannot be read."""


class Checkpoint:
    def __init__(self, path: str | None, run: dict) -> None:
        self.path = Path(path) if path else None
        self.run = run
        self.cursors: dict[str, Cursor] = {}
        self.tally: dict = {}  # the counts as loaded
        self.snapshot: Callable[[], dict] | None = None  # the live counts, asked for at every save

    def load(self) -> Checkpoint:
        if self.path is None or not self.path.exists():
            return self
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(f"checkpoint {self.path} cannot be read") from None
        if doc.get("format") != FORMAT:
            raise CheckpointError(f"{self.path} is not a reencrypt checkpoint")
        if doc.get("run") != self.run:
            raise CheckpointError(
                f"checkpoint {self.path} was written by a run with other settings (policy, keys, types, shard "
                "or mode); remove it or give another --checkpoint"
            )
        self.cursors = {t: Cursor.from_json(c) for t, c in (doc.get("cursors") or {}).items()}
        self.tally = doc.get("tally") or {}
        return self

    def cursor(self, rtype: str) -> Cursor:
        return self.cursors.setdefault(rtype, Cursor())

    def save(self) -> None:
        if self.path is None:
            return
        doc = {
            "format": FORMAT,
            "run": self.run,
            "cursors": {t: c.to_json() for t, c in self.cursors.items()},
            "tally": self.snapshot() if self.snapshot else self.tally,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
