"""Unpadded base64url, the text encoding of every binary value fhircrypt stores; lowercase base32 for
blind-index tokens (index format v2)."""

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


_B32_CHARS = bytes.maketrans(bytes(range(32)), b"abcdefghijklmnopqrstuvwxyz234567")
# Spreading a 160-bit value (32 groups of 5 bits) to one group per byte, in five halvings:
# (mask of the low groups of every unit, repeated over a 256-bit slot; shift of the high groups)
_B32_STEPS = tuple(
    (((1 << low) - 1).to_bytes(unit // 8, "big") * (256 // unit), shift)
    for unit, low, shift in ((256, 80, 48), (128, 40, 24), (64, 20, 12), (32, 10, 6), (16, 5, 3))
)
_B32_PAD_HEAD, _B32_PAD_TAIL = bytes(12), bytes(4)


def b32_128(digests: list[bytes]) -> list[str]:
    """Lowercase unpadded RFC 4648 base32 of each 16-byte value: 26 characters each.

    The standard library's ``base64.b32encode`` loops in Python per 5 bytes and costs 4 µs
    per token; a written Patient needs dozens of tokens. Here all values are converted in
    one batch with a handful of big-integer operations (each 128-bit value, followed by 32
    zero bits, is spread to one 5-bit group per byte, then the bytes are translated to the
    alphabet), well under 1 µs per token. ``tests/test_blindindex.py`` checks it against
    ``base64.b32encode``.
    """
    n = len(digests)
    if not n:
        return []
    x = int.from_bytes(b"".join(_B32_PAD_HEAD + d + _B32_PAD_TAIL for d in digests), "big")
    for unit, shift in _B32_STEPS:
        low = x & int.from_bytes(unit * n, "big")
        x = low | ((x ^ low) << shift)
    text = x.to_bytes(32 * n, "big").translate(_B32_CHARS).decode("ascii")
    return [text[i : i + 26] for i in range(0, 32 * n, 32)]
