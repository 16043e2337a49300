"""The keyring: versioned data master keys and the blind-index root, wrapped by a KEK.

File format (JSON, written atomically with mode 0600)::

    {"format": "fhircrypt-keyring/1",
     "id": "<b64url, 16 random bytes>",
     "provider": {"type": "local", "kek_id": "..."},
     "primary": "k2",
     "keys": [{"id": "k1", "created": "...", "wrapped": "<b64url>"}, ...],
     "index_root": {"wrapped": "<b64url>"},
     "integrity": {"wrapped": "<b64url>"},
     "mac": "<b64url HMAC-SHA256 over the canonical JSON of everything else>"}

Wrapped keys cannot be forged without the KEK (AES key wrap is authenticated); the
MAC, under a wrapped integrity key, also protects the key ids and the primary pointer.
Only the primary key encrypts; older keys decrypt what was written under them.

Each key is wrapped with the context ``{"fhircrypt-keyring": id, "fhircrypt-key": slot}``
(slot: the key id, ``index-root`` or ``integrity``), which the HSM, KMS and Vault
providers bind to the ciphertext. ``id`` was added without a format change: older
keyrings have none and get one on their next write (old readers ignore it; the MAC
covers it); the ``local`` provider ignores the context, so such keyrings still load.

Every change of a keyring file (create, rotate, retire, rewrap, restore) happens under an
exclusive lock across processes (``flock`` on ``<keyring>.lock`` beside it) and re-reads the
file under the lock: two rotations at once then add two distinct keys instead of one
silently overwriting the other (a key a running proxy may already have written records under).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.crypto.blindindex import BlindIndexer
from proxy.crypto.encoding import b64d, b64e
from proxy.crypto.urlsign import UrlSigner
from proxy.keymgmt.providers.base import KeyProvider, KeyringError, ProviderError, describe_text

FORMAT = "fhircrypt-keyring/1"
KEY_ID = re.compile(r"^k[1-9][0-9]{0,5}$")
LOCK_TIMEOUT = 30.0  # seconds a keyring change waits for another one (a change takes well under a second)
T = TypeVar("T")
KeyringDocument = dict[str, Any]  # the keyring file's JSON object (shape in the module docstring)


class KeyUsageExhausted(KeyringError):
    """The primary key wrapped as many data keys as its bound allows: rotate the keyring."""


def wrap_context(keyring_id: str, slot: str) -> dict[str, str]:
    return {"fhircrypt-keyring": keyring_id, "fhircrypt-key": slot}


class Keyring:
    """Unwrapped keys in memory. ``repr`` and ``str`` never show key material."""

    def __init__(
        self,
        primary: str,
        keys: dict[str, bytes],
        index_root: bytes,
        integrity: bytes,
        created: dict[str, str],
        keyring_id: str | None = None,
    ) -> None:
        if primary not in keys:
            raise KeyringError("the primary key is not in the keyring")
        self.primary_id = primary
        self.keyring_id = keyring_id or b64e(os.urandom(16))
        self._keys = keys
        self._index_root = index_root
        self._integrity = integrity
        self._created = created
        self._indexer: BlindIndexer | None = None
        self._link_signer: UrlSigner | None = None
        self._wraps: dict[str, int] = {}  # data keys wrapped per master key (shared across reloads)
        self._max_wraps: int | None = None

    def __repr__(self) -> str:
        return f"Keyring(primary={self.primary_id}, keys={sorted(self._keys)})"

    def bound_wraps(self, max_wraps: int | None, counts: dict[str, int] | None = None) -> None:
        """Refuse more than ``max_wraps`` data keys per master key; ``counts`` carries the tally across reloads."""
        self._max_wraps = max_wraps
        if counts is not None:
            self._wraps = counts

    @property
    def wrap_counts(self) -> dict[str, int]:
        return self._wraps

    def same_keys(self, other: Keyring) -> bool:
        """Same index root and the same material under every key id both hold (a reload, not a swap)."""
        shared = set(self._keys) & set(other._keys)
        return hmac.compare_digest(self._index_root, other._index_root) and all(
            hmac.compare_digest(self._keys[k], other._keys[k]) for k in shared
        )

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys, key=lambda k: int(k[1:]))

    def primary(self) -> tuple[str, bytes]:
        """The key that wraps a new data key; every call counts as one wrap against the bound."""
        kid = self.primary_id
        used = self._wraps.get(kid, 0)
        if self._max_wraps is not None and used >= self._max_wraps:
            raise KeyUsageExhausted(
                f"master key {kid} has wrapped {used} data keys, its bound: run fhircrypt keys rotate"
            )
        self._wraps[kid] = used + 1
        return kid, self._keys[kid]

    def master_key(self, kid: str) -> bytes | None:
        return self._keys.get(kid)

    @property
    def indexer(self) -> BlindIndexer:
        """Blind-index tokens under this keyring's index root (derived keys cached)."""
        if self._indexer is None:
            self._indexer = BlindIndexer(self._index_root)
        return self._indexer

    @property
    def link_signer(self) -> UrlSigner:
        """Signs the proxy's links to upstream URLs (Bulk export); its key is derived here, never stored."""
        if self._link_signer is None:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fhircrypt/v1 link-signing")
            self._link_signer = UrlSigner(hkdf.derive(self._integrity))
        return self._link_signer

    @classmethod
    def generate(cls) -> Keyring:
        now = _now()
        return cls("k1", {"k1": os.urandom(32)}, os.urandom(32), os.urandom(32), {"k1": now})

    def rotate(self) -> str:
        """Add a new primary key; old keys stay for decryption."""
        kid = f"k{int(self.key_ids[-1][1:]) + 1}"
        self._keys[kid] = os.urandom(32)
        self._created[kid] = _now()
        self.primary_id = kid
        return kid

    def retire(self, kid: str) -> None:
        """Forget a non-primary key. Anything still under it becomes unreadable, so the caller proves
        first that nothing stored uses it (``fhircrypt keys retire`` scans the upstream)."""
        if kid == self.primary_id:
            raise KeyringError("the primary key cannot be retired; rotate first")
        if kid not in self._keys:
            raise KeyringError(f"key {kid} is not in the keyring")
        del self._keys[kid]
        self._created.pop(kid, None)

    def to_document(self, provider: KeyProvider) -> KeyringDocument:
        def wrap(slot: str, key: bytes) -> str:
            return b64e(provider.wrap(key, wrap_context(self.keyring_id, slot)))

        doc = {
            "format": FORMAT,
            "id": self.keyring_id,
            "provider": provider.describe(),
            "primary": self.primary_id,
            "keys": [
                {"id": k, "created": self._created.get(k, ""), "wrapped": wrap(k, self._keys[k])} for k in self.key_ids
            ],
            "index_root": {"wrapped": wrap("index-root", self._index_root)},
            "integrity": {"wrapped": wrap("integrity", self._integrity)},
        }
        doc["mac"] = b64e(_mac(self._integrity, doc))
        return doc

    @classmethod
    def from_document(cls, doc: KeyringDocument, provider: KeyProvider) -> Keyring:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise KeyringError(f"not a {FORMAT} keyring")
        described = doc.get("provider")
        recorded: dict[str, str] = described if isinstance(described, dict) else {}
        configured = provider.describe()
        if recorded.get("type", "local") != configured["type"]:
            raise KeyringError(
                f"the keyring is wrapped by the '{recorded.get('type')}' key provider, "
                f"but '{configured['type']}' is configured"
            )
        try:
            return cls._unwrap_document(doc, provider)
        except ProviderError as exc:
            if exc.code == "unwrap-failed" and recorded != configured:
                raise ProviderError(
                    exc.code,
                    f"{exc}: the keyring is wrapped by the {describe_text(recorded)}, "
                    f"but the {describe_text(configured)} is configured",
                ) from None
            raise

    @classmethod
    def _unwrap_document(cls, doc: KeyringDocument, provider: KeyProvider) -> Keyring:
        try:
            keyring_id = doc.get("id")
            if keyring_id is not None and not isinstance(keyring_id, str):
                raise KeyringError("keyring file is malformed")

            def unwrap(slot: str, wrapped: str) -> bytes:
                return provider.unwrap(b64d(wrapped), wrap_context(keyring_id, slot) if keyring_id else None)

            integrity = unwrap("integrity", doc["integrity"]["wrapped"])
            expected = _mac(integrity, {k: v for k, v in doc.items() if k != "mac"})
            if not hmac.compare_digest(expected, b64d(doc["mac"])):
                raise KeyringError("keyring integrity check failed: the file was modified")
            keys, created = {}, {}
            for entry in doc["keys"]:
                kid = entry["id"]
                if not KEY_ID.match(kid) or kid in keys:
                    raise KeyringError("keyring has an invalid or duplicate key id")
                keys[kid] = unwrap(kid, entry["wrapped"])
                created[kid] = str(entry.get("created", ""))
            index_root = unwrap("index-root", doc["index_root"]["wrapped"])
            return cls(doc["primary"], keys, index_root, integrity, created, keyring_id)
        except (KeyError, TypeError, ValueError):
            raise KeyringError("keyring file is malformed") from None


def _mac(key: bytes, doc: KeyringDocument) -> bytes:
    body = json.dumps({k: v for k, v in doc.items() if k != "mac"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, b"fhircrypt keyring/1\x1f" + body.encode(), hashlib.sha256).digest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_keyring(path: str | Path, provider: KeyProvider) -> Keyring:
    """Read, check the provider (clear errors such as a wrong PIN first), unwrap and verify."""
    provider.check()
    return Keyring.from_document(_read_document(path), provider)


def _read_document(path: str | Path) -> KeyringDocument:
    try:
        doc: KeyringDocument = json.loads(Path(path).read_text())  # checked by Keyring.from_document
        return doc
    except OSError as exc:
        raise KeyringError(f"cannot read keyring {path}: {exc.strerror}") from None
    except json.JSONDecodeError:
        raise KeyringError(f"keyring {path} is not JSON") from None


def save_keyring(path: str | Path, keyring: Keyring, provider: KeyProvider) -> None:
    """Write a keyring nobody else changes (tests, the demo); commands use the locked functions below."""
    _write_atomic(Path(path), keyring.to_document(provider))


@contextlib.contextmanager
def keyring_lock(path: str | Path, timeout: float = LOCK_TIMEOUT, new: bool = False) -> Iterator[None]:
    """Hold the exclusive writer lock of the keyring at ``path`` (``<path>.lock``), waiting at most
    ``timeout`` seconds. The lock is released when the process ends, however it ends. ``new``: the
    file may be created, so a missing folder is made (a typo in a path to change makes none)."""
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    if new:
        make_folder(path.parent)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise KeyringError(f"keyring {path}: the folder {path.parent} does not exist") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise KeyringError(
                        f"keyring {path} is being changed by another process ({lock} still held after "
                        f"{timeout:g} s); nothing was changed, try again"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def refuse_existing(path: str | Path) -> None:
    if Path(path).exists():
        raise KeyringError(f"{path} exists; refusing to overwrite a keyring (key loss is data loss)")


def create_keyring(path: str | Path, provider: KeyProvider) -> Keyring:
    """A new keyring at ``path``; never replaces one (key loss is data loss), even one created meanwhile."""
    with keyring_lock(path, new=True):
        refuse_existing(path)
        keyring = Keyring.generate()
        save_keyring(path, keyring, provider)
    return keyring


def update_keyring(
    path: str | Path, provider: KeyProvider, change: Callable[[Keyring], T], timeout: float = LOCK_TIMEOUT
) -> tuple[Keyring, T]:
    """Apply ``change`` to the keyring as it is on disk now, under the lock, and write it back.

    Whatever the caller loaded earlier may be stale (another process rotated meanwhile): the
    change is always made to what is read under the lock, so no other writer's key is lost.
    """
    with keyring_lock(path, timeout):
        keyring = load_keyring(path, provider)
        result = change(keyring)
        save_keyring(path, keyring, provider)
    return keyring, result


def make_folder(folder: Path) -> None:
    """Create a missing folder (and its parents). A file in its place is reported as what it is
    ('Not a directory'), not as mkdir's misleading 'File exists'."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    folder.mkdir(parents=True, exist_ok=True)


def _write_atomic(path: Path, doc: KeyringDocument) -> None:
    """Write atomically (temp file + rename) with mode 0600, so a crash never leaves half a keyring."""
    make_folder(path.parent)
    data = json.dumps(doc, indent=2).encode() + b"\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".keyring-", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise


def _naming(exc: OSError, path: Path) -> OSError:
    """The same error about the file being written: not the random temporary name, nor none (a full
    disk fails a write, which names no file)."""
    return type(exc)(exc.errno, exc.strerror, str(path))


def rewrap_keyring(
    path: str | Path, source: KeyProvider, target: KeyProvider, out: str | Path | None = None
) -> Keyring:
    """Wrap the same keys under another KEK or provider; resources are untouched (their keys do not change).

    The new file is written only after it has been read back through ``target`` and found to
    hold exactly the same keys, and then atomically (to ``out``, default in place).
    """
    with keyring_lock(out or path, new=out is not None):
        keyring = load_keyring(path, source)
        doc = keyring.to_document(target)
        if not keyring.same_keys(Keyring.from_document(doc, target)):
            raise KeyringError("the rewrapped keyring does not read back with the same keys; nothing was written")
        _write_atomic(Path(out or path), doc)
    return keyring


def backup_keyring(path: str | Path, provider: KeyProvider, out: str | Path) -> Keyring:
    """Copy the wrapped keyring to ``out`` after proving it opens (a backup that cannot be restored is none).

    The copy holds wrapped keys only, like the keyring itself: it is useless without the KEK,
    which is backed up separately. An existing file is never overwritten.
    """
    provider.check()
    doc = _read_document(path)  # read once: the copy is the keyring that was verified
    keyring = Keyring.from_document(doc, provider)
    with keyring_lock(out, new=True):
        if Path(out).exists():
            raise KeyringError(f"{out} exists; refusing to overwrite a backup")
        _write_atomic(Path(out), doc)
    if not keyring.same_keys(load_keyring(out, provider)):
        raise KeyringError("the backup does not read back with the same keys")
    return keyring


def restore_keyring(backup: str | Path, provider: KeyProvider, path: str | Path) -> Keyring:
    """Put a verified backup in place. Refuses when the keyring in place holds a key the backup lacks
    (restoring a backup older than the last rotation would lose every resource written since)."""
    provider.check()
    doc = _read_document(backup)  # read once: what is put in place is the backup that was verified
    restored = Keyring.from_document(doc, provider)
    with keyring_lock(path, new=True):  # the keyring in place is judged as it is now, not before a concurrent rotation
        if Path(path).exists():
            try:
                current = load_keyring(path, provider)
            except KeyringError:
                current = None  # damaged or unreadable: the backup is what replaces it
            if current is not None:
                lost = sorted(set(current.key_ids) - set(restored.key_ids), key=lambda k: int(k[1:]))
                if lost:
                    raise KeyringError(
                        f"the backup lacks key(s) {', '.join(lost)} that the keyring in place holds; "
                        "restoring it would make what they encrypted unreadable"
                    )
        _write_atomic(Path(path), doc)
    return restored
