"""The key cache: no provider on the request path, bounds on lifetime and uses, reloads, health.

Time is an injected clock that the tests move forward, so nothing depends on how fast
this machine runs.
"""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest

from proxy.keymgmt.keycache import CacheBounds, KeyCache, KeysUnavailable
from proxy.keymgmt.keyring import Keyring, KeyUsageExhausted, load_keyring, save_keyring
from proxy.keymgmt.providers import ProviderError, build_provider
from proxy.keymgmt.providers.base import KeyringError
from proxy.keymgmt.providers.local import generate_kek
from proxy.transform import markers as mk
from tests.conftest import FHIR_JSON, assert_no_plaintext
from tests.keystores import VAULT_TOKEN
from tests.test_proxy import POLICY, _new
from tests.test_records import NEEDLES, PATIENT


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def local(tmp_path):
    provider = build_provider({}, {"FHIRCRYPT_KEK": generate_kek()})
    path = tmp_path / "keyring.json"
    save_keyring(path, Keyring.generate(), provider)
    return path, provider


@pytest.fixture
def vault_ring(vault, tmp_path):
    provider = build_provider(vault.config(), {"FHIRCRYPT_VAULT_TOKEN": VAULT_TOKEN})
    vault.key("transit", "fhircrypt")
    path = tmp_path / "keyring.json"
    save_keyring(path, Keyring.generate(), provider)
    return path, provider


def rotate_file(path, provider) -> str:
    """What `fhircrypt keys rotate` does to the shared keyring file."""
    ring = load_keyring(path, provider)
    kid = ring.rotate()
    save_keyring(path, ring, provider)
    return kid


def test_no_keys_no_start(tmp_path, vault_ring, vault):
    provider = build_provider({}, {"FHIRCRYPT_KEK": generate_kek()})
    with pytest.raises(KeyringError, match="cannot read keyring"):
        KeyCache(tmp_path / "absent.json", provider)
    path, sealed = vault_ring
    vault.fail_with = 503
    with pytest.raises(ProviderError) as err:
        KeyCache(path, sealed)
    assert err.value.code == "sealed"


def test_provider_outage_serves_from_cache_until_max_age(vault_ring, vault):
    path, provider = vault_ring
    clock, wall = Clock(), Clock()
    cache = KeyCache(path, provider, CacheBounds(refresh_interval=60, max_age=600), clock=clock, wallclock=wall)
    healthy = cache.provider_health()
    assert (healthy.ok, healthy.serving, healthy.provider, healthy.error) == (True, True, "vault", None)
    keys = cache.current()

    vault.fail_with = 503
    clock.now += 60
    assert cache.refresh() is False
    down = cache.provider_health()
    assert (down.ok, down.serving, down.error, down.last_success) == (False, True, "sealed", healthy.last_success)
    assert "sealed" in down.detail and VAULT_TOKEN not in json.dumps(down.as_dict())
    assert cache.current() is keys  # still serving, from memory

    clock.now += 541  # 601 s since the last verification
    with pytest.raises(KeysUnavailable, match="more than 600 s ago"):
        cache.current()
    expired = cache.provider_health()
    assert (expired.ok, expired.serving, expired.error) == (False, False, "sealed")

    vault.fail_with = None
    wall.now += 601
    assert cache.refresh() is True
    back = cache.provider_health()
    assert (back.ok, back.serving, back.error, back.last_success) == (True, True, None, wall.now)
    assert cache.current().same_keys(keys)


def test_refresh_picks_up_a_rotation_and_keeps_counting_uses(local):
    path, provider = local
    cache = KeyCache(path, provider, CacheBounds(max_wraps=3))
    for _ in range(2):
        cache.current().primary()
    assert rotate_file(path, provider) == "k2"
    assert cache.current().primary_id == "k1"  # until the next refresh
    assert cache.refresh()
    ring = cache.current()
    assert ring.primary_id == "k2" and ring.key_ids == ["k1", "k2"]
    ring.primary()
    assert ring.wrap_counts == {"k1": 2, "k2": 1}
    assert cache.provider_health().primary_wraps == 1


def test_a_master_key_is_refused_after_max_wraps_until_rotation(local):
    path, provider = local
    cache = KeyCache(path, provider, CacheBounds(max_wraps=3))
    for _ in range(3):
        cache.current().primary()
    with pytest.raises(KeyUsageExhausted, match="k1 has wrapped 3 data keys"):
        cache.current().primary()
    health = cache.provider_health()
    assert (health.ok, health.serving, health.error, health.primary_wraps) == (False, False, "key-uses-exhausted", 3)
    assert cache.current().master_key("k1")  # reading what k1 wrote goes on
    rotate_file(path, provider)
    assert cache.refresh()
    assert cache.current().primary()[0] == "k2" and cache.provider_health().ok


def test_refresh_never_swaps_in_another_keyring(local):
    path, provider = local
    cache = KeyCache(path, provider)
    before = cache.current()
    save_keyring(path, Keyring.generate(), provider)  # another keyring under the same KEK
    assert cache.refresh() is False
    health = cache.provider_health()
    assert health.error == "keyring-unreadable" and "other keys" in health.detail
    assert cache.current() is before
    path.write_text(path.read_text().replace('"primary": "k1"', '"primary": "k9"'))
    assert cache.refresh() is False and "integrity check failed" in cache.provider_health().detail


def test_a_disabled_kms_key_is_noticed_on_refresh(kms, tmp_path):
    key_id = kms.new_key()
    provider = build_provider(kms.config(key_id), kms.env)
    path = tmp_path / "keyring.json"
    save_keyring(path, Keyring.generate(), provider)
    cache = KeyCache(path, provider)
    kms.client().disable_key(KeyId=key_id)
    assert cache.refresh() is False
    health = cache.provider_health()
    assert (health.ok, health.serving, health.error, health.provider) == (False, True, "disabled", "aws-kms")


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="max age >= refresh interval"):
        CacheBounds(refresh_interval=600, max_age=60)


# ---------------------------------------------------------------- through the proxy


def _envelope_key(resource: dict) -> str:
    envelope = next(e["valueString"] for e in resource["extension"] if e["url"] == mk.ENVELOPE_URL)
    return envelope.split(".")[1]


async def test_rotation_while_serving_reaches_the_proxy_on_refresh(proxy_for, clean_upstream, local):
    path, provider = local
    cache = KeyCache(path, provider)
    client = await proxy_for(clean_upstream.base_url, POLICY, ring=cache)
    first = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    rotate_file(path, provider)
    assert await asyncio.get_running_loop().run_in_executor(None, cache.refresh)
    second = await (await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)).json()
    assert sorted(_envelope_key(r) for r in clean_upstream.dump()) == ["k1", "k2"]
    for created in (first, second):
        read = await (await client.get(f"/fhir/R4/Patient/{created['id']}")).json()
        assert read["birthDate"] == PATIENT["birthDate"] and read["name"] == PATIENT["name"]


async def test_requests_never_call_the_provider_and_fail_closed_after_max_age(
    proxy_for, clean_upstream, vault_ring, vault
):
    path, provider = vault_ring
    clock = Clock()
    cache = KeyCache(path, provider, CacheBounds(refresh_interval=60, max_age=600), clock=clock)
    client = await proxy_for(clean_upstream.base_url, POLICY, ring=cache)
    calls = len(vault.exchanges)
    vault.fail_with = 503  # Vault sealed: the proxy goes on from its cache
    created = await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)
    assert created.status == 201
    pid = (await created.json())["id"]
    read = await client.get(f"/fhir/R4/Patient/{pid}")
    assert read.status == 200 and (await read.json())["name"] == PATIENT["name"]
    assert len(vault.exchanges) == calls  # not one provider call on the request path

    clock.now += 601
    refused = await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)
    body = await refused.json()
    assert refused.status == 503 and body["resourceType"] == "OperationOutcome"
    assert "last verified by the key provider" in body["issue"][0]["diagnostics"]
    unread = await client.get(f"/fhir/R4/Patient/{pid}")
    assert unread.status == 503
    assert len(clean_upstream.dump()) == 1  # nothing forwarded once the keys expired
    assert_no_plaintext(clean_upstream.dump(), NEEDLES)


async def test_the_app_refreshes_in_the_background(proxy_for, clean_upstream, vault_ring, vault):
    path, provider = vault_ring
    cache = KeyCache(path, provider, CacheBounds(refresh_interval=0.05, max_age=3600))
    client = await proxy_for(clean_upstream.base_url, POLICY, ring=cache)
    rotate_file(path, provider)
    start = len(vault.exchanges)
    for _ in range(400):  # wait for the event (a refresh that saw k2), not for a duration
        if cache.current().primary_id == "k2":
            break
        await asyncio.sleep(0.05)
    assert cache.current().primary_id == "k2" and len(vault.exchanges) > start
    created = await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)
    assert created.status == 201 and _envelope_key(clean_upstream.dump()[0]) == "k2"
