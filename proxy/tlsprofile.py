"""The one TLS profile of every connection the proxy makes or accepts: TLS 1.2 or later, forward-secret AEAD.

TLS 1.2 is limited to ECDHE with AES-GCM or ChaCha20-Poly1305, as in Mozilla's "intermediate"
profile minus the DHE suites. Shared by the listener (``proxy.web.tls``) and the upstream client
(``proxy.upstream.client``), so both sides change together.
"""

from __future__ import annotations

import ssl

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1"


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx
