"""Blind indexes: keyed, deterministic tokens that let the server match equal values.

``token = hex(HMAC-SHA256(K_field, normalised value))[:32]`` (128 bits, lowercase hex
because servers compare tokens case-insensitively). ``K_field`` is derived with HKDF
from the keyring's index root key and a label naming the resource type, the policy
field and the search parameter, so equal NIKs in two fields or two resource types give
unrelated tokens, and nobody without the index root can compute or brute-force them
(a NIK has far too little entropy for an unkeyed hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TOKEN_HEX_CHARS = 32  # 128 bits


def index_key(root: bytes, label: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"fhircrypt/v1 blind-index\x1f" + label.encode()
    ).derive(root)


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
    """Computes tokens; keys are derived once per label and cached with their HMAC states."""

    def __init__(self, root: bytes) -> None:
        self._root = root
        self._macs: dict[str, _Hmac] = {}

    def __repr__(self) -> str:
        return f"BlindIndexer(labels={len(self._macs)})"

    def _mac(self, label: str) -> _Hmac:
        mac = self._macs.get(label)
        if mac is None:
            mac = self._macs[label] = _Hmac(index_key(self._root, label))
        return mac

    def token(self, label: str, normalised: str) -> str:
        return self.tokens(label, (normalised,))[0]

    def tokens(self, label: str, normalised: Iterable[str]) -> list[str]:
        """The token of each text. One call per label: a written Patient needs dozens of
        tokens per label (every prefix of every name part), and the HMAC is inlined
        (``HMAC = H(key ^ opad || H(key ^ ipad || text))``) to spare calls per token."""
        mac = self._mac(label)
        inner_state, outer_state = mac.inner, mac.outer
        out = []
        for text in normalised:
            inner = inner_state.copy()
            inner.update(text.encode())
            outer = outer_state.copy()
            outer.update(inner.digest())
            out.append(outer.digest()[:_TOKEN_BYTES].hex())
        return out
