"""Blind indexes: keyed, deterministic tokens that let the server match equal values.

``token = hex(HMAC-SHA256(K_field, normalised value))[:32]`` (128 bits, lowercase hex
because servers compare tokens case-insensitively). ``K_field`` is derived with HKDF
from the keyring's index root key and a label naming the resource type, the policy
field and the search parameter, so equal NIKs in two fields or two resource types give
unrelated tokens, and nobody without the index root can compute or brute-force them
(a NIK has far too little entropy for an unkeyed hash).
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TOKEN_HEX_CHARS = 32  # 128 bits


def index_key(root: bytes, label: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"fhircrypt/v1 blind-index\x1f" + label.encode()
    ).derive(root)


class BlindIndexer:
    """Computes tokens; keys are derived once per label and cached."""

    def __init__(self, root: bytes) -> None:
        self._root = root
        self._keys: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"BlindIndexer(labels={len(self._keys)})"

    def token(self, label: str, normalised: str) -> str:
        key = self._keys.get(label)
        if key is None:
            key = self._keys[label] = index_key(self._root, label)
        return hmac.digest(key, normalised.encode(), "sha256")[: TOKEN_HEX_CHARS // 2].hex()  # one-shot: faster
