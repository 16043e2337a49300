"""The unwrapped keyring, cached, re-verified in the background, with bounds on lifetime and uses.

The request path only ever calls :meth:`KeyCache.current` - a memory read - and never a key
provider. A shell (the aiohttp app) calls :meth:`KeyCache.refresh` every
``refresh_interval`` seconds off the event loop; a refresh re-reads the keyring file,
asks the provider to unwrap it again and swaps the result in. That single mechanism gives:

- **Revocation with a bound.** The keys are served for at most ``max_age`` seconds after
  the provider last vouched for them. If the KEK is disabled, its policy revoked or the
  HSM PIN changed, every replica stops encrypting and decrypting within ``max_age``;
  until then a provider outage (KMS unreachable, Vault sealed, HSM restarting) does not
  interrupt the service. ``max_age`` trades availability during an outage against the
  time a revoked KEK keeps working.
- **Rotation without a restart.** ``fhircrypt keys rotate`` on the shared keyring file
  reaches every replica within ``refresh_interval``.
- **A bound on uses.** Each master key may wrap at most ``max_wraps`` per-record data keys
  in this process (counted across refreshes); beyond that writes are refused until the
  keyring is rotated. AES key wrap itself has no birthday limit, so this is a
  cryptoperiod bound in the sense of NIST SP 800-57 (limit the data exposed under one
  key), a backstop set high enough never to stop a correctly rotated deployment.
- **Readiness.** :meth:`provider_health` says whether the keys are usable and whether the
  last verification succeeded, for a ``/readyz`` endpoint.

A refresh that would replace the keys rather than reload them (another index root, or
different material under a key id already held) is refused: that is another keyring, and
swapping it in would break every search and every record written so far.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from proxy.keymgmt.keyring import Keyring, load_keyring
from proxy.keymgmt.providers.base import KeyProvider, KeyringError, ProviderError


class KeysUnavailable(KeyringError):
    """The cached keys outlived ``max_age`` without the provider vouching for them again."""


@dataclass(frozen=True)
class CacheBounds:
    refresh_interval: float = 300.0  # seconds between background re-verifications
    max_age: float = 86_400.0  # seconds the keys are served after the last successful verification
    max_wraps: int = 2**32  # data keys one master key may wrap in this process

    def __post_init__(self) -> None:
        if self.refresh_interval <= 0 or self.max_age < self.refresh_interval or self.max_wraps < 1:
            raise ValueError("key cache bounds: need refresh interval > 0, max age >= refresh interval, max wraps >= 1")


@dataclass(frozen=True)
class ProviderHealth:
    """What a readiness probe needs; no key material, no secrets, no provider error text."""

    ok: bool  # keys usable and the last verification succeeded
    serving: bool  # keys usable (within max_age, uses left), even if the provider is down now
    provider: str  # provider type
    last_success: float | None  # wall-clock time of the last successful verification
    error: str | None  # ProviderError code of the last failed verification, or a cache code
    detail: str | None  # its message: names labels, ids and paths, never secrets (for logs)
    keys_age: float  # seconds since the last successful verification
    max_age: float
    primary: str
    primary_wraps: int
    max_wraps: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class KeyCache:
    """Holds the keyring; constructing it loads the keys (no keys, no start)."""

    def __init__(
        self,
        path: str | Path | None,
        provider: KeyProvider | None,
        bounds: CacheBounds | None = None,
        *,
        keyring: Keyring | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.path, self.provider, self.bounds = path, provider, bounds or CacheBounds()
        self._clock, self._wallclock = clock, wallclock
        self._lock = threading.Lock()  # one refresh at a time
        if keyring is None:
            if path is None or provider is None:
                raise KeyringError("no keys: a key cache needs a keyring file and a key provider")
            keyring = load_keyring(path, provider)
        keyring.bound_wraps(self.bounds.max_wraps)
        self._keyring = keyring
        self._verified_at = clock()
        self._last_success: float | None = wallclock()
        self._error: str | None = None
        self._detail: str | None = None

    @classmethod
    def of(cls, keyring: Keyring) -> KeyCache:
        """A cache around keys already in memory, never refreshed (tests, the demo, offline tools)."""
        return cls(None, None, keyring=keyring)

    @property
    def refreshable(self) -> bool:
        return self.provider is not None and self.path is not None

    def current(self) -> Keyring:
        """The keys for this request. Never calls a provider."""
        if self.refreshable and self._clock() - self._verified_at > self.bounds.max_age:
            raise KeysUnavailable(
                f"the keys were last verified by the key provider more than {self.bounds.max_age:.0f} s ago; "
                "requests are refused until the provider is reachable again"
            )
        return self._keyring

    def refresh(self) -> bool:
        """Re-read and re-unwrap the keyring (blocking: run it off the event loop). False on failure.

        On failure the cached keys stay in service until ``max_age``; the error code is
        kept for :meth:`provider_health`.
        """
        if not self.refreshable:
            return True
        assert self.path is not None and self.provider is not None
        with self._lock:
            try:
                fresh = load_keyring(self.path, self.provider)
                if not fresh.same_keys(self._keyring):
                    raise KeyringError("the keyring file now holds other keys than the ones in service; not loaded")
            except KeyringError as exc:
                self._error = exc.code if isinstance(exc, ProviderError) else "keyring-unreadable"
                self._detail = str(exc)
                return False
            except Exception as exc:  # an SDK surprise must not end the refreshes; its text may echo input
                self._error, self._detail = "unavailable", f"unexpected {type(exc).__name__} from the key provider"
                return False
            fresh.bound_wraps(self.bounds.max_wraps, self._keyring.wrap_counts)
            self._keyring = fresh
            self._verified_at, self._last_success = self._clock(), self._wallclock()
            self._error = self._detail = None
            return True

    def provider_health(self) -> ProviderHealth:
        keyring, age = self._keyring, self._clock() - self._verified_at
        wraps = keyring.wrap_counts.get(keyring.primary_id, 0)
        fresh = not self.refreshable or age <= self.bounds.max_age
        exhausted = wraps >= self.bounds.max_wraps
        error = self._error or ("keys-expired" if not fresh else "key-uses-exhausted" if exhausted else None)
        return ProviderHealth(
            ok=error is None,
            serving=fresh and not exhausted,
            provider=self.provider.type if self.provider else "memory",
            last_success=self._last_success,
            error=error,
            detail=self._detail if self._error else None,
            keys_age=round(age, 3),
            max_age=self.bounds.max_age,
            primary=keyring.primary_id,
            primary_wraps=wraps,
            max_wraps=self.bounds.max_wraps,
        )
