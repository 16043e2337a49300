"""Unpadded base64url, the text encoding of every binary value fhircrypt stores."""

from __future__ import annotations

import base64
import binascii

_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


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
