"""Per-patient keys in the aiohttp shell: fetch what a response needs, choose keys for writes.

The pure core decrypts synchronously from a cache (:class:`proxy.keymgmt.patientkeys.ReadKeys`);
this module fills the cache from the key store before a body is decrypted, and finds or
creates the keys a write needs before it is encrypted. Store calls run in a worker thread
(the drivers block). A store that cannot be reached is a 503, never a guess: nothing is
written under a master key that the policy meant to be a patient key.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import TypeVar

from proxy.keymgmt.keyring import Keyring
from proxy.keymgmt.patientkeys import (
    PatientKeyCache,
    PatientKeyError,
    ReadKeys,
    new_handle,
    open_patient_key,
    patient_tag,
    seal_patient_key,
)
from proxy.keystore.base import PatientKeyStore, PatientShredded, StoredKey, StoreError
from proxy.outcome import FhirError
from proxy.transform.bodies import WrapFor
from proxy.transform.keyselect import PENDING, envelope_handles, key_subject, write_subjects

log = logging.getLogger("fhircrypt")
T = TypeVar("T")


_PATIENT_KEY_MARKS = (b'"v2.p_', b'"v1.p_')  # serialised envelopes that name a patient key


def names_patient_key(raw: bytes) -> bool:
    """Whether a serialised body holds an envelope naming a patient key: only then is the store asked."""
    return _PATIENT_KEY_MARKS[0] in raw or _PATIENT_KEY_MARKS[1] in raw


class PatientKeyService:
    def __init__(self, store: PatientKeyStore, keyring: Callable[[], Keyring], cache: PatientKeyCache) -> None:
        self.store, self.cache = store, cache
        self._keyring = keyring  # the current keyring: it changes when a rotated keyring is reloaded
        self._pending: OrderedDict[str, None] = OrderedDict()  # keys this replica created before the id was known

    @property
    def keyring(self) -> Keyring:
        return self._keyring()

    @property
    def read_keys(self) -> ReadKeys:
        return ReadKeys(self.keyring, self.cache)

    def __repr__(self) -> str:
        return f"PatientKeyService({self.store!r}, {self.cache!r})"

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except StoreError:
            log.error("patient key store unavailable", extra={"event": "key-store-unavailable"})
            raise FhirError(
                503, "transient", "the patient key store is unavailable", headers={"Retry-After": "5"}
            ) from None

    def _open(self, key: StoredKey) -> bytes | None:
        """The unsealed key, or None (logged) for a row that does not open: records under it then
        read as integrity failures, and writes to its patient are refused."""
        try:
            return open_patient_key(self.keyring, key.handle, key.tag, key.kid, key.sealed)
        except PatientKeyError as exc:
            log.error("patient key does not open", extra={"event": "patient-key-damaged", "error": str(exc)})
            return None

    # ------------------------------------------------------------------ reading

    async def prefetch(self, body: dict) -> None:
        """Load every patient key the body's envelopes name (and learn which were shredded).

        A key created for a Patient before the server assigned its id is bound here, the
        first time a response shows that Patient with its id (normally the create's own
        response)."""
        carriers = envelope_handles(body)
        for handle in [h for h in carriers if h in self._pending]:  # this replica's creates: key in the cache
            key = self.cache.get(handle)
            if key is not None:
                await self._bind(handle, key, carriers[handle])
        missing = self.cache.missing(set(carriers))
        if not missing:
            return
        found, shredded = await self._call(self.store.lookup, missing)
        for handle in shredded:
            self.cache.mark_shredded(handle)
        for stored in found:
            key = self._open(stored)
            if key is None:
                continue
            self.cache.put(stored.handle, key, stored.tag)
            if stored.tag is None:
                await self._bind(stored.handle, key, carriers[stored.handle])

    async def _bind(self, handle: str, key: bytes, carriers: list[dict]) -> None:
        """Bind a pending key to the one Patient id its carriers show. Best effort: a store
        failure is logged and retried on a later read, it never fails the response (the
        create it answers has already happened)."""
        ids = {
            i
            for r in carriers
            if r.get("resourceType") == "Patient"
            and isinstance(i := r.get("id"), str)
            and key_subject({"resourceType": "Patient", "id": i})
        }
        if len(ids) != 1:
            return
        tag = patient_tag(self.keyring, ids.pop())
        kid, sealed = seal_patient_key(self.keyring, handle, tag, key)
        try:
            bound = await asyncio.to_thread(self.store.bind, handle, tag, kid, sealed)
        except StoreError:
            log.warning("patient key not bound yet", extra={"event": "patient-key-unbound"})
            return
        self._pending.pop(handle, None)
        if bound:
            self.cache.put(handle, key, tag)
            log.info("patient key bound", extra={"event": "patient-key-bound"})

    # ------------------------------------------------------------------ writing

    async def wraps_for_write(self, resource: dict, covered: Collection[str]) -> WrapFor:
        """The key choice for a plaintext body about to be encrypted: finds or creates the key of
        each patient a ``covered`` resource in it belongs to. Refuses (409) data for a patient
        that was shredded."""
        keys: dict[str, tuple[str, bytes]] = {}
        for subject in write_subjects(resource, covered):
            keys[subject] = await self._key_for(subject, resource.get("resourceType"))

        def wrap_for(res: dict) -> tuple[str, bytes] | None:
            subject = key_subject(res)
            return keys.get(subject) if subject is not None else None

        return wrap_for

    async def _key_for(self, subject: str, where: object) -> tuple[str, bytes]:
        tag = None if subject == PENDING else patient_tag(self.keyring, subject)
        if tag is not None:
            handle = self.cache.handle_for(tag)
            key = self.cache.get(handle) if handle else None
            if handle and key:
                return handle, key
        try:
            stored = await self._call(self.store.key_for_patient, tag) if tag is not None else None
            if stored is not None:
                key = self._open(stored)
                if key is None:
                    raise FhirError(503, "transient", "the patient key store holds a key that does not open")
            else:
                key, handle = os.urandom(32), new_handle()
                kid, sealed = seal_patient_key(self.keyring, handle, tag, key)
                stored = StoredKey(handle, tag, kid, sealed)
                await self._call(self.store.add_key, stored)
        except PatientShredded:
            raise FhirError(
                409,
                "conflict",
                f"this {where} belongs to a patient whose data was crypto-shredded: new data for that patient "
                "is refused",
            ) from None
        self.cache.put(stored.handle, key, tag)
        if tag is None:  # bound when the create's response shows the id
            self._pending[stored.handle] = None
            while len(self._pending) > self.cache.max_entries:
                self._pending.popitem(last=False)
        return stored.handle, key
