"""Blind indexes: keyed, deterministic tokens that let the server match equal values.

Index format v2 (written): ``token = base32(HMAC-SHA256(K2_field, text)[:16])``, lowercase and
unpadded (26 characters, 128 bits); v1 (still searched, never written):
``hex(HMAC-SHA256(K1_field, text))[:32]``. Lowercase because servers compare tokens
case-insensitively; base32 because it is 6 characters shorter than hex for the same 128
bits. The two versions derive unrelated keys (the version is in the HKDF info), so a v1
token never equals a v2 one. ``K_field`` is derived with HKDF
from the keyring's index root key and a label naming the resource type, the policy
field and the search parameter, so equal NIKs in two fields or two resource types give
unrelated tokens, and nobody without the index root can compute or brute-force them
(a NIK has far too little entropy for an unkeyed hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.crypto.encoding import b32_128

TOKEN_HEX_CHARS = 32  # 128 bits


TOKEN_V2_CHARS = 26  # 128 bits in unpadded base32


def index_key(root: bytes, label: str, version: int = 1) -> bytes:
    info = f"fhircrypt/v{version} blind-index\x1f{label}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(root)


class _Hmac:
    """HMAC-SHA256 (RFC 2104) under one fixed key, with the keyed inner and outer states computed once.

    A SATUSEHAT Patient needs 76 tokens, and ``hmac.digest`` costs about 4 µs per call
    here: most of it is OpenSSL setting up the HMAC context and hashing the padded key
    again. Copying two SHA-256 states that already absorbed ``key ^ ipad`` and
    ``key ^ opad`` gives the same bytes for well under half of that
    (``tests/test_core_fast_paths.py`` checks it against ``hmac.digest``).
    """

    __slots__ = ("inner", "outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # RFC 2104: keys longer than the block are hashed first
            key = hashlib.sha256(key).digest()
        block = key.ljust(64, b"\0")
        self.inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self.outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))


_TOKEN_BYTES = TOKEN_HEX_CHARS // 2


class BlindIndexer:
    """Computes tokens; keys are derived once per (version, label) and cached with their HMAC states."""

    def __init__(self, root: bytes) -> None:
        self._root = root
        self._macs: dict[tuple[int, str], _Hmac] = {}

    def __repr__(self) -> str:
        return f"BlindIndexer(labels={len(self._macs)})"

    def digests(self, version: int, label: str, texts: Iterable[str]) -> Iterator[bytes]:
        """The first 128 bits of HMAC-SHA256 of each text. The HMAC is inlined
        (``HMAC = H(key ^ opad || H(key ^ ipad || text))``) to spare calls per token: a written
        Patient needs dozens of tokens per label."""
        mac = self._macs.get((version, label))
        if mac is None:
            mac = self._macs[version, label] = _Hmac(index_key(self._root, label, version))
        inner_state, outer_state = mac.inner, mac.outer
        for text in texts:
            inner = inner_state.copy()
            inner.update(text.encode())
            outer = outer_state.copy()
            outer.update(inner.digest())
            yield outer.digest()[:_TOKEN_BYTES]

    def token(self, label: str, normalised: str) -> str:
        return self.tokens(label, (normalised,))[0]

    def tokens(self, label: str, normalised: Iterable[str]) -> list[str]:
        """v1 tokens (lowercase hex): what searches still send for data written before index format v2."""
        return [d.hex() for d in self.digests(1, label, normalised)]

    def tokens_v2(self, label: str, normalised: Iterable[str]) -> list[str]:
        """v2 tokens (lowercase unpadded base32, 26 characters): what writes store."""
        return b32_128(list(self.digests(2, label, normalised)))
