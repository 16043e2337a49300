"""TLS on both sides of the proxy: a modern server configuration, mutual TLS, and reloading certificates.

Only TLS 1.2 and 1.3 are offered; TLS 1.2 is limited to forward-secret AEAD suites (ECDHE with
AES-GCM or ChaCha20-Poly1305): ``proxy.tlsprofile``.

Reloading: the listening socket keeps one SSLContext for its whole life, and every handshake is
switched (through the SNI callback, which OpenSSL calls for each ClientHello, with or without a
server name) to ``current``. SIGHUP builds a complete new context first; only when the
certificate, key and CA files load together does ``current`` change, so a half-written
certificate never replaces a working one, and connections already open are not touched.
"""

from __future__ import annotations

import logging
import ssl

from proxy.settings import Settings
from proxy.tlsprofile import harden
from proxy.upstream.client import upstream_tls

log = logging.getLogger("fhircrypt")
_CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _server_context(settings: Settings) -> ssl.SSLContext:
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    assert settings.tls_cert is not None  # only called when a certificate is configured
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    ctx.verify_mode = _CLIENT_AUTH[settings.tls_client_auth]
    if settings.tls_client_ca:
        ctx.load_verify_locations(cafile=settings.tls_client_ca)
    return ctx


class ServerTLS:
    """The listener's TLS, whose certificate, key and client CA can be replaced while serving."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.current = _server_context(settings)
        self.listener = _server_context(settings)
        self.listener.sni_callback = self._select

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, listener: ssl.SSLContext) -> None:
        ssl_object.context = self.current

    def build(self) -> ssl.SSLContext:
        """A context from the files as they are now; raises when they do not load together.
        The caller assigns it to ``current`` once everything else of a reload has loaded too."""
        return _server_context(self.settings)


def server_tls(settings: Settings) -> ServerTLS | None:
    if not settings.tls_cert:
        return None
    return ServerTLS(settings)


def upstream_context(settings: Settings) -> ssl.SSLContext | None:
    """Towards an https upstream: verified against ``upstream_ca`` (or the system CAs), hostname checked,
    with the proxy's client certificate when the upstream asks for one."""
    return upstream_tls(
        settings.upstream, settings.upstream_ca, settings.upstream_client_cert, settings.upstream_client_key
    )


def check_files(settings: Settings) -> str | None:
    """A startup problem with the TLS options, in words, or None."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        return "tls_cert and tls_key go together"
    if bool(settings.upstream_client_cert) != bool(settings.upstream_client_key):
        return "upstream_client_cert and upstream_client_key go together"
    if settings.tls_client_auth != "none" and not settings.tls_client_ca:
        return f"tls_client_auth {settings.tls_client_auth} needs tls_client_ca (the CA client certificates chain to)"
    if settings.tls_client_auth != "none" and not settings.tls_cert:
        return "client certificates (tls_client_auth) need TLS (tls_cert and tls_key)"
    if settings.client_identities and settings.tls_client_auth == "none":
        return "client_identities needs tls_client_auth optional or required"
    return None
