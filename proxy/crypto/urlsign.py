"""Signed links: upstream URLs handed to clients as proxy URLs that only the proxy can mint.

Bulk export status and file URLs are chosen by the upstream (or its object store). The
proxy gives the client an opaque link instead, ``base64url(JSON [url, expiry]) "." MAC``,
and fetches the upstream URL only when the MAC verifies: the proxy never becomes an open
relay to arbitrary URLs, and any replica with the same keyring accepts the link
(stateless). The MAC key is derived from the keyring, never used for anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import orjson

from proxy.crypto.encoding import b64d, b64e

DEFAULT_TTL = 24 * 3600.0  # Bulk Data servers keep files at least a day; links expire with them


class UrlSigner:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "UrlSigner()"

    def sign(self, url: str, ttl: float = DEFAULT_TTL, now: float | None = None) -> str:
        body = b64e(orjson.dumps([url, int((now or time.time()) + ttl)]))
        return f"{body}.{self._mac(body)}"

    def open(self, token: str, now: float | None = None) -> str | None:
        """The signed URL, or None when the link was not made by this keyring or has expired."""
        body, _, mac = token.partition(".")
        if not hmac.compare_digest(self._mac(body), mac):
            return None
        try:
            url, expiry = orjson.loads(b64d(body))
        except (ValueError, TypeError, orjson.JSONDecodeError):
            return None
        if type(url) is not str or type(expiry) is not int or expiry < (now or time.time()):
            return None
        return url

    def _mac(self, body: str) -> str:
        return b64e(hmac.digest(self._key, b"fhircrypt/v1 link\x1f" + body.encode(), hashlib.sha256))
