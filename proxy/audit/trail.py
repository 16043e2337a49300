"""The tamper-evident audit trail: an append-only JSON-lines file with a forward-secure HMAC chain.

Record ``i`` (0-based) is one line, the canonical JSON (orjson, sorted keys) of::

    {"seq": i, "prev": <mac of record i-1, "" for i = 0>, "event": <AuditEvent>,
     "mac": base64url(HMAC-SHA256(K_i, canonical({"seq", "prev", "event"})))}

Key schedule: ``K_0`` is 32 random bytes created with the trail and handed to the auditor; the
operator keeps it away from the proxy host. After writing record ``i`` the writer sets
``K_{i+1} = HMAC-SHA256(K_i, b"fhircrypt audit ratchet")`` and overwrites ``K_i``. HMAC is one-way,
so whoever steals the writer's current key ``K_n`` (from memory or the state file) can compute
every later key but none of the earlier ones: records ``0..n-1`` cannot be edited, replaced or
forged without ``verify`` noticing. ``prev`` chains each record to its predecessor, so deleting,
reordering or inserting records breaks the chain too. What a thief of ``K_n`` *can* do is append
records that look genuine, or cut the tail and rewrite it from ``n`` on; shipping the AuditEvents
off the host (:class:`proxy.audit.poster.FhirAuditPoster`) and recording ``(records, last mac)``
checkpoints elsewhere is the defence against that. ``verify(..., state_path=...)`` also compares
the trail with the writer's state file, which catches a tail cut short behind the writer's back.

State file (JSON, mode 0600, replaced atomically after every fsynced write)::

    {"format": "fhircrypt-audit-state/1", "next_seq": n, "last_mac": "<mac of record n-1>",
     "size": <bytes of the trail covered>, "key": "<base64url K_n>"}

It holds the CURRENT key only - never ``K_0`` once a record has been written - so a stolen state
file threatens only records written after the theft. Old copies of the file may survive in free
disk blocks; put the state on an encrypted volume. Python cannot guarantee that no copy of a key
stays in memory (hmac copies it); the writer overwrites the buffers it owns.

One writer per trail: the file is locked with ``flock`` so that two proxy replicas cannot
interleave records (each replica needs its own trail and ``K_0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal, Protocol

import orjson

from proxy.crypto.encoding import b64d as b64u_decode
from proxy.crypto.encoding import b64e as b64u

KEY_BYTES = 32
RATCHET_LABEL = b"fhircrypt audit ratchet"
STATE_FORMAT = "fhircrypt-audit-state/1"
_RECORD_KEYS = frozenset({"seq", "prev", "event", "mac"})

log = logging.getLogger("fhircrypt.audit")


class AuditTrailError(Exception):
    """The trail cannot be written or opened. Messages name files and offsets, never record content."""


class TrailCorrupt(AuditTrailError):
    """The trail or its state file does not match what the writer wrote: refuse to continue."""


class TrailLocked(AuditTrailError):
    """Another process is writing this trail."""


class AuditUnavailable(Exception):
    """The audit backlog is full and the policy is fail-closed: the proxy must refuse to decrypt (503)."""


class AuditWriteError(AuditTrailError):
    """A write failed. ``written`` records of the batch reached the disk (in order); the rest did not."""

    def __init__(self, message: str, written: int = 0) -> None:
        super().__init__(message)
        self.written = written


# --- encoding -------------------------------------------------------------------------------------


def canonical(obj: object) -> bytes:
    """The bytes the MAC covers: orjson with sorted keys (at every depth), no whitespace."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def ratchet(key: bytes) -> bytes:
    """K_{i+1} from K_i: one-way, so a later key never yields an earlier one."""
    return hmac.new(key, RATCHET_LABEL, hashlib.sha256).digest()


def record_mac(key: bytes, seq: int, prev: str, event: dict) -> str:
    return b64u(hmac.new(key, canonical({"seq": seq, "prev": prev, "event": event}), hashlib.sha256).digest())


def encode_record(key: bytes, seq: int, prev: str, event: dict) -> tuple[bytes, str]:
    """One trail line (with its newline) and its MAC."""
    mac = record_mac(key, seq, prev, event)
    return canonical({"seq": seq, "prev": prev, "event": event, "mac": mac}) + b"\n", mac


def _wipe(buf: bytearray) -> None:
    for i in range(len(buf)):
        buf[i] = 0


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (a module function so that tests can inject disk faults)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_state_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".state")


# --- state file -----------------------------------------------------------------------------------


@dataclass
class _State:
    next_seq: int
    last_mac: str
    size: int
    key: bytearray

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "format": STATE_FORMAT,
                "next_seq": self.next_seq,
                "last_mac": self.last_mac,
                "size": self.size,
                "key": b64u(bytes(self.key)),
            }
        )


def _load_state(path: Path) -> _State:
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, orjson.JSONDecodeError) as exc:
        raise TrailCorrupt(f"audit state file {path} is unreadable") from exc
    try:
        if doc["format"] != STATE_FORMAT:
            raise ValueError("format")
        next_seq, last_mac, size = doc["next_seq"], doc["last_mac"], doc["size"]
        key = b64u_decode(doc["key"])
        if not (isinstance(next_seq, int) and next_seq >= 0 and isinstance(size, int) and size >= 0):
            raise ValueError("counters")
        if not isinstance(last_mac, str) or len(key) != KEY_BYTES or (next_seq == 0) != (last_mac == ""):
            raise ValueError("fields")
    except (KeyError, TypeError, ValueError) as exc:
        raise TrailCorrupt(f"audit state file {path} is malformed") from exc
    return _State(next_seq, last_mac, size, bytearray(key))


def _save_state(path: Path, state: _State) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        _write_all(fd, state.to_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path)


def read_state(state_path: str | os.PathLike[str]) -> dict:
    """The writer's state as plain values (next_seq, last_mac, size, key bytes) - for audits and tests."""
    st = _load_state(Path(state_path))
    return {"next_seq": st.next_seq, "last_mac": st.last_mac, "size": st.size, "key": bytes(st.key)}


# --- writer ---------------------------------------------------------------------------------------


class AuditTrail:
    """The single writer of one trail. Thread-safe; the async sink calls it from a worker thread.

    ``fsync="record"`` (default) makes every record durable before the next is written;
    ``"batch"`` writes a whole ``append_many`` batch with one write and one fsync (faster under
    load; a crash loses at most the unsynced batch, which was never acknowledged as written).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        state_path: str | os.PathLike[str] | None = None,
        *,
        fsync: Literal["record", "batch"] = "record",
    ) -> None:
        if fsync not in ("record", "batch"):
            raise ValueError("fsync must be 'record' or 'batch'")
        self.path = Path(path)
        self.state_path = Path(state_path) if state_path is not None else default_state_path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._key = bytearray()
        self._next_seq = 0
        self._last_mac = ""
        self._size = 0
        self._dirty = False  # a failed write may have left partial bytes past _size
        self._state_stale = False  # records are on disk but the state file lags (its write failed)

    # lifecycle

    def create(self, initial_key: bytes) -> AuditTrail:
        """Start a new, empty trail whose first record will be keyed with ``initial_key`` (K_0)."""
        if not isinstance(initial_key, bytes | bytearray) or len(initial_key) != KEY_BYTES:
            raise ValueError(f"the initial audit key must be {KEY_BYTES} bytes")
        if self.state_path.exists():
            raise FileExistsError(f"audit state file {self.state_path} already exists")
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                self._lock_file(fd)
                if os.fstat(fd).st_size != 0:
                    raise FileExistsError(f"audit trail {self.path} already holds records")
                _fsync_dir(self.path)
                state = _State(0, "", 0, bytearray(initial_key))
                _save_state(self.state_path, state)
            except BaseException:
                os.close(fd)
                raise
            self._adopt(fd, state)
        return self

    def open(self) -> AuditTrail:
        """Resume after a restart from the state file, reconciling what a crash may have left."""
        with self._lock:
            state = _load_state(self.state_path)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError as exc:
                raise TrailCorrupt(f"audit trail {self.path} is missing but its state file exists") from exc
            try:
                self._lock_file(fd)
                self._reconcile(fd, state)
            except BaseException:
                os.close(fd)
                _wipe(state.key)
                raise
            self._adopt(fd, state)
        return self

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            if self._state_stale:
                self._try_save_state()
            os.close(self._fd)  # closing releases the flock
            self._fd = None
            _wipe(self._key)

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def last_mac(self) -> str:
        return self._last_mac

    # writing

    def append(self, event: dict) -> None:
        self.append_many([event])

    def append_many(self, events: Sequence[dict]) -> None:
        """Append records in order. On failure raises :class:`AuditWriteError` whose ``written``
        says how many of ``events`` are on disk; the others can be retried as they are."""
        if not events:
            return
        with self._lock:
            if self._fd is None:
                raise AuditTrailError("the audit trail is not open")
            self._check_file()
            if self.fsync == "batch":
                self._write_batch(events)
                return
            for i, event in enumerate(events):
                try:
                    self._write_batch([event])
                except AuditWriteError as exc:
                    raise AuditWriteError(str(exc), written=i) from exc.__cause__

    def _write_batch(self, events: Sequence[dict]) -> None:
        """All of ``events`` in one write and one fsync, or none of them."""
        assert self._fd is not None
        key = bytearray(self._key)
        seq, prev = self._next_seq, self._last_mac
        lines: list[bytes] = []
        try:
            for event in events:
                line, prev = encode_record(bytes(key), seq, prev, event)
                lines.append(line)
                nxt = bytearray(ratchet(bytes(key)))
                _wipe(key)
                key = nxt
                seq += 1
        except TypeError as exc:  # not JSON-serialisable: a programming error, not a disk fault
            _wipe(key)
            raise AuditWriteError("an audit event is not JSON-serialisable") from exc
        data = b"".join(lines)
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as exc:
            _wipe(key)
            self._dirty = True
            self._truncate_back()
            raise AuditWriteError(
                f"writing the audit trail {self.path} failed: {errno.errorcode.get(exc.errno or 0, 'error')}"
            ) from exc
        old = self._key
        self._key, self._next_seq, self._last_mac = key, seq, prev
        self._size += len(data)
        _wipe(old)
        self._state_stale = True
        self._try_save_state()

    def _try_save_state(self) -> None:
        # The records are durable; a failed state write must not make the caller retry them (that
        # would duplicate records). open() reconciles a lagging state file from the trail itself.
        try:
            _save_state(self.state_path, _State(self._next_seq, self._last_mac, self._size, self._key))
        except OSError as exc:
            log.error("audit state file write failed", extra={"error": type(exc).__name__, "errno": exc.errno})
            return
        self._state_stale = False

    def _truncate_back(self) -> None:
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError:
            return  # still dirty: retried before the next write
        self._dirty = False

    def _check_file(self) -> None:
        """The file must be exactly what this writer wrote: anything else is tampering or a second writer."""
        assert self._fd is not None
        if self._dirty:
            self._truncate_back()
            if self._dirty:
                raise AuditWriteError(f"cannot roll back a failed write to the audit trail {self.path}")
        size = os.fstat(self._fd).st_size
        if size != self._size:
            raise TrailCorrupt(
                f"the audit trail {self.path} changed behind its writer (size {size}, expected {self._size})"
            )
        if self._state_stale:
            self._try_save_state()

    # opening

    @staticmethod
    def _lock_file(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise TrailLocked("another process is writing this audit trail") from exc

    def _adopt(self, fd: int, state: _State) -> None:
        self._fd = fd
        self._key = state.key
        self._next_seq, self._last_mac, self._size = state.next_seq, state.last_mac, state.size
        self._dirty = False

    def _reconcile(self, fd: int, state: _State) -> None:
        """Bring ``state`` up to the end of the trail, or refuse.

        A crash between fsyncing records and replacing the state file leaves valid records past
        ``state.size``: they verify under the state's key, so they are adopted. A crash in the
        middle of a write leaves a partial last line: it is moved to ``<trail>.torn-<offset>`` and
        cut off. Anything else (a trail shorter than the state, a last record that is not the one
        the state names, complete lines that do not verify) is tampering: raise TrailCorrupt.
        """
        size = os.fstat(fd).st_size
        if size < state.size:
            raise TrailCorrupt(f"the audit trail {self.path} is shorter than its writer's state: records were removed")
        if state.next_seq > 0:
            last = _read_line_ending_at(fd, state.size)
            rec = _parse_record(last) if last is not None else None
            if rec is None or rec["seq"] != state.next_seq - 1 or not hmac.compare_digest(rec["mac"], state.last_mac):
                raise TrailCorrupt(f"the last record of {self.path} is not the one its writer's state names")
        elif state.size != 0:
            raise TrailCorrupt(f"the audit state file {self.state_path} is inconsistent")
        if size == state.size:
            return
        tail = os.pread(fd, size - state.size, state.size)
        adopted = 0
        offset = 0
        while True:
            nl = tail.find(b"\n", offset)
            if nl < 0:
                break
            line = tail[offset : nl + 1]
            rec = _parse_record(line[:-1])
            if (
                rec is None
                or rec["seq"] != state.next_seq
                or rec["prev"] != state.last_mac
                or line != encode_record(bytes(state.key), state.next_seq, state.last_mac, rec["event"])[0]
            ):
                raise TrailCorrupt(
                    f"the audit trail {self.path} has records after offset {state.size + offset} that its writer did "
                    "not write"
                )
            nxt = bytearray(ratchet(bytes(state.key)))
            _wipe(state.key)
            state.key, state.next_seq, state.last_mac = nxt, state.next_seq + 1, rec["mac"]
            state.size += len(line)
            offset = nl + 1
            adopted += 1
        if offset < len(tail):
            torn = self.path.with_name(f"{self.path.name}.torn-{state.size}")
            torn_fd = os.open(torn, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(torn_fd, tail[offset:])
                os.fsync(torn_fd)
            finally:
                os.close(torn_fd)
            os.ftruncate(fd, state.size)
            os.fsync(fd)
            log.warning("audit trail ended in a torn record; moved aside", extra={"offset": state.size})
        if adopted:
            log.warning("audit state lagged the trail; records adopted", extra={"records": adopted})
        _save_state(self.state_path, state)


def _read_line_ending_at(fd: int, end: int, chunk: int = 65536) -> bytes | None:
    """The line (without its newline) whose newline is the byte at ``end - 1``."""
    if end <= 0 or os.pread(fd, 1, end - 1) != b"\n":
        return None
    pos = end - 1
    parts: list[bytes] = []
    while pos > 0:
        start = max(0, pos - chunk)
        block = os.pread(fd, pos - start, start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            parts.append(block[nl + 1 :])
            break
        parts.append(block)
        pos = start
    return b"".join(reversed(parts))


def _parse_record(line: bytes) -> dict | None:
    """A structurally valid record, or None. The MAC is not checked here."""
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(rec, dict) or set(rec) != _RECORD_KEYS:
        return None
    seq, prev, mac, event = rec["seq"], rec["prev"], rec["mac"], rec["event"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return None
    if not isinstance(prev, str) or not isinstance(mac, str) or not isinstance(event, dict):
        return None
    return rec


# --- verification ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """``records`` verified in order; when broken, ``first_bad`` is the position (the seq it should
    carry) of the first record that does not verify and ``line`` its 1-based line number."""

    ok: bool
    records: int
    first_bad: int | None
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.records} records"
        where = f"record {self.first_bad}" + (f" (line {self.line})" if self.line is not None else "")
        return f"BROKEN at {where}: {self.reason}"


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            terminated = raw.endswith(b"\n")
            yield number, raw[:-1] if terminated else raw, terminated


def verify(
    path: str | os.PathLike[str],
    initial_key: bytes,
    *,
    state_path: str | os.PathLike[str] | None = None,
) -> VerifyResult:
    """Recompute the chain from ``K_0`` and name the first record that does not verify.

    Detects edited records (MAC mismatch, non-canonical bytes), deleted, reordered, duplicated
    or inserted records (seq gap, ``prev`` mismatch), a truncated last record and appended
    garbage. With ``state_path``, also checks that the trail ends where the writer's state says
    (catches records cut from the end, and records appended by someone other than the writer
    who did not also rewrite the state file).
    """
    if len(initial_key) != KEY_BYTES:
        raise ValueError(f"the initial audit key must be {KEY_BYTES} bytes")
    key = bytearray(initial_key)
    prev = ""
    count = 0
    size = 0

    def broken(reason: str, line: int | None) -> VerifyResult:
        _wipe(key)
        return VerifyResult(False, count, count, reason, line)

    for number, line, terminated in _lines(Path(path)):
        if not terminated:
            return broken("truncated record: the file ends in the middle of a line", number)
        rec = _parse_record(line)
        if rec is None:
            return broken("not a trail record (unparseable or malformed JSON)", number)
        if rec["seq"] != count:
            if rec["seq"] > count:
                why = f"seq {rec['seq']} where {count} was expected: records deleted or out of order"
            else:
                why = f"seq {rec['seq']} where {count} was expected: records duplicated or out of order"
            return broken(why, number)
        if rec["prev"] != prev:
            return broken(
                "prev does not match the previous record's MAC: records removed, reordered or inserted", number
            )
        if not hmac.compare_digest(record_mac(bytes(key), count, prev, rec["event"]), rec["mac"]):
            return broken("MAC mismatch: the record was edited or forged without its key", number)
        if canonical(rec) != line:
            return broken("the record's bytes are not canonical: the line was edited", number)
        nxt = bytearray(ratchet(bytes(key)))
        _wipe(key)
        key = nxt
        prev = rec["mac"]
        count += 1
        size += len(line) + 1

    if state_path is not None:
        state = _load_state(Path(state_path))
        try:
            if state.next_seq < count:
                _wipe(key)
                return VerifyResult(
                    False,
                    state.next_seq,
                    state.next_seq,
                    f"the trail holds {count} records but its writer wrote {state.next_seq}: records appended by "
                    "someone else",
                    state.next_seq + 1,
                )
            if state.next_seq > count:
                return broken(
                    f"the trail ends after {count} records but its writer wrote {state.next_seq}: records removed from "
                    "the end",
                    None,
                )
            if state.last_mac != prev or state.size != size or not hmac.compare_digest(bytes(state.key), bytes(key)):
                return broken("the writer's state file does not match the end of the trail", None)
        finally:
            _wipe(state.key)
    _wipe(key)
    return VerifyResult(True, count, None, "")


def new_initial_key() -> bytes:
    return os.urandom(KEY_BYTES)


# --- async sink -----------------------------------------------------------------------------------


class BatchWriter(Protocol):
    """A destination for AuditEvents. ``write_batch`` writes all events in order or raises; an
    :class:`AuditWriteError` may say that the first ``written`` of them did get through."""

    async def write_batch(self, events: Sequence[dict]) -> None: ...


class _TrailWriter:
    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    async def write_batch(self, events: Sequence[dict]) -> None:
        # fsync blocks: keep it off the event loop.
        await asyncio.to_thread(self.trail.append_many, list(events))


class AsyncAuditSink:
    """Bounded, ordered, lossless-unless-told-otherwise delivery of AuditEvents to one destination.

    ``emit`` only queues (it never waits for a disk or a network); a background task writes the
    queue in order. A failing destination keeps its records queued and is retried with
    exponential backoff, so a disk that fills up and is then cleared loses nothing. The queue is
    bounded by ``max_backlog``; when it is full, ``mode="fail-closed"`` makes ``emit`` raise
    :class:`AuditUnavailable` (check ``available`` before decrypting and answer 503), while
    ``mode="continue"`` drops the record, counts it in ``dropped`` and logs once per episode -
    never silently.
    """

    def __init__(
        self,
        target: AuditTrail | BatchWriter,
        *,
        max_backlog: int = 10_000,
        mode: Literal["fail-closed", "continue"] = "fail-closed",
        batch_size: int = 64,
        retry_initial: float = 0.05,
        retry_max: float = 5.0,
        name: str = "audit",
    ) -> None:
        if mode not in ("fail-closed", "continue"):
            raise ValueError("mode must be 'fail-closed' or 'continue'")
        if max_backlog < 1 or batch_size < 1:
            raise ValueError("max_backlog and batch_size must be positive")
        self._writer: BatchWriter = _TrailWriter(target) if isinstance(target, AuditTrail) else target
        self.max_backlog = max_backlog
        self.mode = mode
        self.batch_size = batch_size
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.name = name
        self._queue: deque[dict] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._dropped = 0
        self._written = 0
        self._failing = False
        self._drop_logged = False

    # the proxy's side

    def emit(self, event: dict) -> None:
        """Queue ``event``. Raises TypeError at once for an event that cannot be serialised (it
        would otherwise block the queue forever) and :class:`AuditUnavailable` when fail-closed
        and full."""
        canonical(event)
        if self._closing:
            raise AuditUnavailable(f"the {self.name} sink is closed")
        if len(self._queue) >= self.max_backlog:
            if self.mode == "fail-closed":
                raise AuditUnavailable(f"the {self.name} backlog is full")
            self._dropped += 1
            if not self._drop_logged:
                log.error(
                    "audit backlog full: dropping records",
                    extra={"sink": self.name, "backlog": len(self._queue), "dropped": self._dropped},
                )
                self._drop_logged = True
            return
        self._queue.append(event)
        self._wake.set()

    @property
    def available(self) -> bool:
        """False when an ``emit`` now would be refused (fail-closed) or dropped (continue)."""
        return not self._closing and len(self._queue) < self.max_backlog

    @property
    def backlog(self) -> int:
        return len(self._queue)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def written(self) -> int:
        return self._written

    @property
    def failing(self) -> bool:
        """True while the destination is refusing writes (records are queued and retried)."""
        return self._failing

    # lifecycle

    async def start(self) -> AsyncAuditSink:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"fhircrypt-audit-{self.name}")
        return self

    async def __aenter__(self) -> AsyncAuditSink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float | None = 10.0) -> int:
        """Stop accepting records and write out the queue. Returns how many records could not be
        written within ``timeout`` (0 when everything was flushed); those are logged, not hidden."""
        self._closing = True
        self._wake.set()
        if self._queue and self._task is None:
            await self.start()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        left = len(self._queue)
        if left:
            log.error("audit sink closed with records unwritten", extra={"sink": self.name, "records": left})
        return left

    async def _run(self) -> None:
        delay = self.retry_initial
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(islice(self._queue, self.batch_size))
            error: BaseException | None = None
            try:
                await self._writer.write_batch(batch)
                done = len(batch)
            except AuditWriteError as exc:
                done, error = max(0, min(exc.written, len(batch))), exc
            except Exception as exc:
                done, error = 0, exc
            for _ in range(done):
                self._queue.popleft()
            self._written += done
            if self._drop_logged and len(self._queue) < self.max_backlog:
                self._drop_logged = False  # the next drop starts a new episode and is logged again
            if error is None:
                if self._failing:
                    log.warning("audit sink recovered", extra={"sink": self.name, "backlog": len(self._queue)})
                    self._failing = False
                delay = self.retry_initial
                continue
            if not self._failing:
                log.error(
                    "audit sink write failed; records kept and retried",
                    extra={
                        "sink": self.name,
                        "error": type(error).__name__,
                        # our own messages name files, offsets and HTTP statuses only
                        "detail": str(error) if isinstance(error, AuditTrailError) else "",
                        "backlog": len(self._queue),
                    },
                )
                self._failing = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)
