"""What every request handler shares: settings, policy, keys, the upstream client, verifiers, audit sinks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

from proxy.audit.trail import AsyncAuditSink
from proxy.auth.certificates import CertificateIdentities
from proxy.auth.tokens import Introspector, JwtVerifier
from proxy.crypto.envelope import KeyLookup
from proxy.keymgmt.keycache import KeyCache
from proxy.keymgmt.keyring import Keyring
from proxy.policy.compiler import CompiledPolicy
from proxy.settings import Settings
from proxy.upstream.client import UpstreamClient
from proxy.web.patientkeys import PatientKeyService


@dataclass
class Runtime:
    settings: Settings
    policy: CompiledPolicy
    keys: KeyCache
    upstream: URL
    public_base: str
    client: UpstreamClient | None = None  # every upstream request goes through it (proxy.upstream.client)
    verifier: JwtVerifier | None = None  # None: --auth none (development mode)
    introspector: Introspector | None = None  # opaque tokens (RFC 7662), when configured
    audit: list[AsyncAuditSink] = dataclasses.field(default_factory=list)  # the trail and/or a FHIR server
    blocked_subjects: set[str] = dataclasses.field(default_factory=set)  # canary tripped (this replica)
    identities: CertificateIdentities | None = None  # client certificate subjects mapped to callers
    patient_keys: PatientKeyService | None = None  # per-patient keys (crypto-shredding), when configured

    def snapshot(self) -> Runtime:
        """A per-request view: a SIGHUP reload swaps the policy on the shared runtime, and a request
        that started under the old policy finishes under it (never half old, half new)."""
        return dataclasses.replace(self)

    @property
    def read_keys(self) -> KeyLookup:
        """Where envelopes' key ids are looked up: the keyring, plus cached patient keys."""
        return self.patient_keys.read_keys if self.patient_keys else self.keyring

    async def prefetch_patient_keys(self, body: dict) -> None:
        if self.patient_keys is not None:
            await self.patient_keys.prefetch(body)

    @property
    def keyring(self) -> Keyring:
        """The cached keys (a memory read; raises KeysUnavailable past the cache's max age)."""
        return self.keys.current()

    @property
    def upstream_base(self) -> str:
        return str(self.upstream).rstrip("/")


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")
