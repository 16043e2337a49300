"""The keyring: versioned data master keys and the blind-index root, wrapped by a KEK.

File format (JSON, written atomically with mode 0600)::

    {"format": "fhircrypt-keyring/1",
     "provider": {"type": "local", "kek_id": "..."},
     "primary": "k2",
     "keys": [{"id": "k1", "created": "...", "wrapped": "<b64url>"}, ...],
     "index_root": {"wrapped": "<b64url>"},
     "integrity": {"wrapped": "<b64url>"},
     "mac": "<b64url HMAC-SHA256 over the canonical JSON of everything else>"}

Wrapped keys cannot be forged without the KEK (AES key wrap is authenticated); the
MAC, under a wrapped integrity key, also protects the key ids and the primary pointer.
Only the primary key encrypts; older keys decrypt what was written under them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from proxy.crypto.blindindex import BlindIndexer
from proxy.crypto.encoding import b64d, b64e
from proxy.crypto.kek import KeyProvider, KeyringError

FORMAT = "fhircrypt-keyring/1"
KEY_ID = re.compile(r"^k[1-9][0-9]{0,5}$")


class Keyring:
    """Unwrapped keys in memory. ``repr`` and ``str`` never show key material."""

    def __init__(
        self, primary: str, keys: dict[str, bytes], index_root: bytes, integrity: bytes, created: dict[str, str]
    ) -> None:
        if primary not in keys:
            raise KeyringError("the primary key is not in the keyring")
        self.primary_id = primary
        self._keys = keys
        self._index_root = index_root
        self._integrity = integrity
        self._created = created
        self._indexer: BlindIndexer | None = None

    def __repr__(self) -> str:
        return f"Keyring(primary={self.primary_id}, keys={sorted(self._keys)})"

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys, key=lambda k: int(k[1:]))

    def primary(self) -> tuple[str, bytes]:
        return self.primary_id, self._keys[self.primary_id]

    def master_key(self, kid: str) -> bytes | None:
        return self._keys.get(kid)

    @property
    def indexer(self) -> BlindIndexer:
        """Blind-index tokens under this keyring's index root (derived keys cached)."""
        if self._indexer is None:
            self._indexer = BlindIndexer(self._index_root)
        return self._indexer

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

    def to_document(self, provider: KeyProvider) -> dict:
        doc = {
            "format": FORMAT,
            "provider": provider.describe(),
            "primary": self.primary_id,
            "keys": [
                {"id": k, "created": self._created.get(k, ""), "wrapped": b64e(provider.wrap(self._keys[k]))}
                for k in self.key_ids
            ],
            "index_root": {"wrapped": b64e(provider.wrap(self._index_root))},
            "integrity": {"wrapped": b64e(provider.wrap(self._integrity))},
        }
        doc["mac"] = b64e(_mac(self._integrity, doc))
        return doc

    @classmethod
    def from_document(cls, doc: dict, provider: KeyProvider) -> Keyring:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise KeyringError(f"not a {FORMAT} keyring")
        try:
            integrity = provider.unwrap(b64d(doc["integrity"]["wrapped"]))
            expected = _mac(integrity, {k: v for k, v in doc.items() if k != "mac"})
            if not hmac.compare_digest(expected, b64d(doc["mac"])):
                raise KeyringError("keyring integrity check failed: the file was modified")
            keys, created = {}, {}
            for entry in doc["keys"]:
                kid = entry["id"]
                if not KEY_ID.match(kid) or kid in keys:
                    raise KeyringError("keyring has an invalid or duplicate key id")
                keys[kid] = provider.unwrap(b64d(entry["wrapped"]))
                created[kid] = str(entry.get("created", ""))
            index_root = provider.unwrap(b64d(doc["index_root"]["wrapped"]))
            return cls(doc["primary"], keys, index_root, integrity, created)
        except (KeyError, TypeError, ValueError):
            raise KeyringError("keyring file is malformed") from None


def _mac(key: bytes, doc: dict) -> bytes:
    body = json.dumps({k: v for k, v in doc.items() if k != "mac"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, b"fhircrypt keyring/1\x1f" + body.encode(), hashlib.sha256).digest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_keyring(path: str | Path, provider: KeyProvider) -> Keyring:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise KeyringError(f"cannot read keyring {path}: {exc.strerror}") from None
    except json.JSONDecodeError:
        raise KeyringError(f"keyring {path} is not JSON") from None
    return Keyring.from_document(doc, provider)


def save_keyring(path: str | Path, keyring: Keyring, provider: KeyProvider) -> None:
    """Write atomically (temp file + rename) with mode 0600, so a crash never leaves half a keyring."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(keyring.to_document(provider), indent=2).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=".keyring-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
