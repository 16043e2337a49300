"""Unpadded base64url, the text encoding of every binary value fhircrypt stores."""

from __future__ import annotations

import base64
import binascii

_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64e(data: bytes) -> str:
    # binascii directly: what base64.urlsafe_b64encode does, without its two Python-level calls
    # (every element ciphertext is encoded once per write)
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Strict decoding: raises ValueError on anything that is not canonical base64url."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError("not base64url") from exc
    if b64e(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


def b64d_fast(text: str) -> bytes:
    """Lenient decoding for authenticated data (AEAD ciphertexts): integrity comes from the tag."""
    try:
        return binascii.a2b_base64(text.encode("ascii").translate(_FROM_URLSAFE) + b"==")
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not base64url") from exc
