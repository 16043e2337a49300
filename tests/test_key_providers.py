"""Each key provider against a real key store: a SoftHSM2 token, moto_server, a stand-in Vault."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest

from proxy.keymgmt.keyring import Keyring, load_keyring, save_keyring, wrap_context
from proxy.keymgmt.providers import ProviderError, build_provider
from proxy.keymgmt.providers.base import associated_data
from proxy.keymgmt.providers.local import generate_kek
from tests.conftest import ROOT
from tests.keystores import PIN, TOKEN, VAULT_TOKEN, init_softhsm

KEY = bytes(range(32))
CONTEXT = wrap_context("ring-1", "k1")


def roundtrip(provider) -> None:
    wrapped = provider.wrap(KEY, CONTEXT)
    assert KEY not in wrapped
    assert provider.unwrap(wrapped, CONTEXT) == KEY
    with pytest.raises(ProviderError) as err:
        provider.unwrap(wrapped, wrap_context("ring-1", "k2"))  # a key moved to another slot
    assert err.value.code == "unwrap-failed"


def assert_no_secret(*texts: str, secrets: tuple[str, ...]) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text


# ---------------------------------------------------------------- factory and secrets


def test_factory_refuses_unknown_types_settings_and_missing_secrets(tmp_path):
    with pytest.raises(ProviderError, match="unknown key provider 'hsm'"):
        build_provider({"type": "hsm"}, {})
    with pytest.raises(ProviderError, match="has no setting pin"):
        build_provider({"type": "pkcs11", "pin": "1234"}, {})  # secrets are not configuration
    with pytest.raises(ProviderError, match="needs --pkcs11-token-label"):
        build_provider({"type": "pkcs11", "module": "/x.so", "key_label": "k"}, {})
    with pytest.raises(ProviderError, match="FHIRCRYPT_VAULT_TOKEN_FILE"):
        build_provider({"type": "vault", "address": "http://127.0.0.1:1", "key": "k"}, {})
    missing = tmp_path / "absent"
    with pytest.raises(ValueError, match="cannot read FHIRCRYPT_VAULT_TOKEN_FILE: No such file"):
        build_provider(
            {"type": "vault", "address": "http://x", "key": "k"}, {"FHIRCRYPT_VAULT_TOKEN_FILE": str(missing)}
        )


def test_local_provider_is_the_default_and_keeps_reading_keyrings_without_an_id(tmp_path):
    provider = build_provider({}, {"FHIRCRYPT_KEK": generate_kek()})
    assert provider.describe()["type"] == "local"
    provider.check()
    assert provider.unwrap(provider.wrap(KEY, CONTEXT), CONTEXT) == KEY
    # a keyring written before keyrings had an id (format unchanged) still loads, and gets one on its next write
    ring = Keyring.generate()
    doc = ring.to_document(provider)
    del doc["id"]
    from proxy.keymgmt.keyring import _mac

    doc["mac"] = base64.urlsafe_b64encode(_mac(ring._integrity, doc)).rstrip(b"=").decode()
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    old = load_keyring(path, provider)
    assert old.same_keys(ring)
    save_keyring(path, old, provider)
    assert json.loads(path.read_text())["id"] == old.keyring_id


# ---------------------------------------------------------------- pkcs11 (SoftHSM2)


def test_pkcs11_wraps_on_the_token_and_binds_the_context(softhsm):
    provider = build_provider(softhsm.config("kek-a"), {"FHIRCRYPT_PKCS11_PIN_FILE": str(softhsm.pin_file)})
    provider.check()
    roundtrip(provider)
    assert provider.describe() == {"type": "pkcs11", "token_label": TOKEN, "key_label": "kek-a"}
    assert PIN not in repr(provider) and PIN not in str(provider.describe())
    other = build_provider(softhsm.config("kek-b"), {"FHIRCRYPT_PKCS11_PIN": PIN})
    with pytest.raises(ProviderError) as err:
        other.unwrap(provider.wrap(KEY, CONTEXT), CONTEXT)
    assert err.value.code == "unwrap-failed" and "kek-b" in str(err.value)


def test_pkcs11_wrong_pin_and_missing_key_fail_clearly_without_secrets(softhsm):
    wrong = build_provider(softhsm.config(), {"FHIRCRYPT_PKCS11_PIN": "0000-wrong-pin"})
    with pytest.raises(ProviderError) as err:
        wrong.wrap(KEY, CONTEXT)
    assert err.value.code == "denied" and "wrong PIN" in str(err.value)
    assert_no_secret(str(err.value), secrets=("0000-wrong-pin", PIN))
    missing = build_provider(softhsm.config("no-such-label"), {"FHIRCRYPT_PKCS11_PIN": PIN})
    with pytest.raises(ProviderError) as err:
        missing.check()
    assert err.value.code == "not-found" and "no AES key labelled 'no-such-label'" in str(err.value)
    absent = build_provider(softhsm.config() | {"token_label": "not-plugged-in"}, {"FHIRCRYPT_PKCS11_PIN": PIN})
    with pytest.raises(ProviderError) as err:
        absent.check()
    assert err.value.code == "not-found" and "not present" in str(err.value)
    with pytest.raises(ProviderError, match="FHIRCRYPT_PKCS11_PIN"):
        build_provider(softhsm.config(), {})
    with pytest.raises(ProviderError, match=r"cannot load the PKCS#11 module /nonexistent/libhsm\.so") as err:
        build_provider(softhsm.config() | {"module": "/nonexistent/libhsm.so"}, {"FHIRCRYPT_PKCS11_PIN": PIN})
    assert err.value.code == "misconfigured"


REMOVAL = """
import json, shutil, sys
from proxy.keymgmt.providers import ProviderError, build_provider
config, tokens = json.loads(sys.argv[1]), sys.argv[2]
provider = build_provider(config, {"FHIRCRYPT_PKCS11_PIN": sys.argv[3]})
wrapped = provider.wrap(bytes(32), {"k": "v"})
shutil.rmtree(tokens)  # the token is pulled out while the process has it open
try:
    provider.unwrap(wrapped, {"k": "v"})
    print("still unwrapped")
except ProviderError as exc:
    print(exc.code, "|", exc)
"""


def test_pkcs11_token_removed_while_in_use_fails_clearly(softhsm, tmp_path):
    # its own token store and process: SoftHSM cannot take a token back once it has vanished
    env = init_softhsm(tmp_path)
    script = "import sys; from tests.keystores import generate_hsm_key; generate_hsm_key(sys.argv[1], 'kek-a')"
    child_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script, softhsm.module], env=child_env, check=True, cwd=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", REMOVAL, json.dumps(softhsm.config()), str(tmp_path / "tokens"), PIN],
        env=child_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    code, message = out.stdout.strip().split(" | ")
    assert code == "unreachable" and f"token '{TOKEN}' is unavailable" in message
    assert_no_secret(out.stdout, out.stderr, secrets=(PIN,))


# ---------------------------------------------------------------- aws-kms (moto_server)


def test_aws_kms_encrypts_with_a_binding_encryption_context(kms):
    key_id = kms.new_key()
    provider = build_provider(kms.config(key_id), kms.env)
    provider.check()
    roundtrip(provider)
    assert provider.describe() == {"type": "aws-kms", "key_id": key_id}
    stranger = build_provider(kms.config(kms.new_key()), kms.env)
    with pytest.raises(ProviderError) as err:
        stranger.unwrap(provider.wrap(KEY, CONTEXT), CONTEXT)
    assert err.value.code in ("unwrap-failed", "denied")
    assert_no_secret(str(err.value), secrets=(kms.env["AWS_SECRET_ACCESS_KEY"],))


def test_aws_kms_disabled_or_missing_key_fails_clearly(kms):
    key_id = kms.new_key()
    provider = build_provider(kms.config(key_id), kms.env)
    kms.client().disable_key(KeyId=key_id)
    with pytest.raises(ProviderError) as err:
        provider.check()
    assert err.value.code == "disabled" and f"key {key_id} is Disabled" in str(err.value)
    gone = build_provider(kms.config("alias/no-such-key"), kms.env)
    with pytest.raises(ProviderError) as err:
        gone.check()
    assert err.value.code == "not-found"
    unreachable = build_provider(kms.config(key_id) | {"endpoint": "http://127.0.0.1:9"}, kms.env)
    with pytest.raises(ProviderError) as err:
        unreachable.check()
    assert err.value.code == "unreachable"


# ---------------------------------------------------------------- vault (stand-in Transit server)


def _vault_headers(exchange) -> dict[str, str]:
    return {k: v for k, v in exchange.headers.items() if k.lower().startswith("x-vault") or k == "Content-Type"}


def test_vault_transit_exchanges_are_exactly_these(vault):
    vault.namespace = "hospital/records"
    env = {"FHIRCRYPT_VAULT_TOKEN": VAULT_TOKEN}
    provider = build_provider(vault.config(key="fhircrypt-kek", mount="kms/transit"), env)
    vault.key("kms/transit", "fhircrypt-kek")
    provider.check()
    wrapped = provider.wrap(KEY, CONTEXT)
    assert wrapped.startswith(b"vault:v1:")
    assert provider.unwrap(wrapped, CONTEXT) == KEY
    aad = base64.b64encode(associated_data(CONTEXT)).decode()
    headers = {"X-Vault-Token": VAULT_TOKEN, "X-Vault-Request": "true", "X-Vault-Namespace": "hospital/records"}
    check, encrypt, decrypt = vault.exchanges
    assert (check.method, check.path, check.body) == ("GET", "/v1/kms/transit/keys/fhircrypt-kek", None)
    assert _vault_headers(check) == headers
    assert (encrypt.method, encrypt.path) == ("POST", "/v1/kms/transit/encrypt/fhircrypt-kek")
    assert encrypt.body == {"plaintext": base64.b64encode(KEY).decode(), "associated_data": aad}
    assert _vault_headers(encrypt) == headers | {"Content-Type": "application/json"}
    assert (decrypt.method, decrypt.path) == ("POST", "/v1/kms/transit/decrypt/fhircrypt-kek")
    assert decrypt.body == {"ciphertext": wrapped.decode(), "associated_data": aad}
    assert _vault_headers(decrypt) == headers | {"Content-Type": "application/json"}
    with pytest.raises(ProviderError) as err:
        provider.unwrap(wrapped, wrap_context("ring-1", "k2"))
    assert err.value.code == "unwrap-failed"


@pytest.mark.parametrize(
    ("status", "code", "words"),
    [(403, "denied", "permission denied"), (500, "unavailable", "Vault error"), (503, "sealed", "sealed")],
)
def test_vault_error_answers_map_to_clear_codes(vault, tmp_path, status, code, words):
    token_file = tmp_path / "token"
    token_file.write_text(VAULT_TOKEN + "\n")
    provider = build_provider(vault.config(), {"FHIRCRYPT_VAULT_TOKEN_FILE": str(token_file)})
    wrapped = provider.wrap(KEY, CONTEXT)
    vault.fail_with = status
    with pytest.raises(ProviderError) as err:
        provider.unwrap(wrapped, CONTEXT)
    assert err.value.code == code and words in str(err.value)
    assert_no_secret(str(err.value), repr(provider), secrets=(VAULT_TOKEN,))
    assert vault.exchanges[-1].headers["X-Vault-Token"] == VAULT_TOKEN


def test_vault_wrong_token_and_missing_key(vault):
    wrong = build_provider(vault.config(), {"FHIRCRYPT_VAULT_TOKEN": "hvs.wrong"})
    with pytest.raises(ProviderError) as err:
        wrong.wrap(KEY, CONTEXT)
    assert err.value.code == "denied"
    provider = build_provider(vault.config(key="never-created"), {"FHIRCRYPT_VAULT_TOKEN": VAULT_TOKEN})
    with pytest.raises(ProviderError) as err:
        provider.check()
    assert err.value.code == "not-found"
    down = build_provider(vault.config() | {"address": "http://127.0.0.1:9"}, {"FHIRCRYPT_VAULT_TOKEN": VAULT_TOKEN})
    with pytest.raises(ProviderError) as err:
        down.check()
    assert err.value.code == "unreachable"


# ---------------------------------------------------------------- a keyring under every provider


@pytest.fixture
def every_provider(softhsm, kms, vault):
    vault.key("transit", "fhircrypt")
    return {
        "local": build_provider({}, {"FHIRCRYPT_KEK": generate_kek()}),
        "pkcs11": build_provider(softhsm.config(), {"FHIRCRYPT_PKCS11_PIN": PIN}),
        "aws-kms": build_provider(kms.config(kms.new_key()), kms.env),
        "vault": build_provider(vault.config(), {"FHIRCRYPT_VAULT_TOKEN": VAULT_TOKEN}),
    }


def test_keyring_saves_rotates_and_loads_under_every_provider(every_provider, tmp_path):
    for name, provider in every_provider.items():
        path = tmp_path / f"{name}.json"
        ring = Keyring.generate()
        save_keyring(path, ring, provider)
        ring.rotate()
        save_keyring(path, ring, provider)
        loaded = load_keyring(path, provider)
        assert loaded.key_ids == ["k1", "k2"] and loaded.primary_id == "k2" and loaded.same_keys(ring), name
        assert json.loads(path.read_text())["provider"] == provider.describe()
        others = [p for n, p in every_provider.items() if n != name]
        with pytest.raises(Exception, match=f"wrapped by the '{name}' key provider"):
            load_keyring(path, others[0])


def test_swapping_wrapped_keys_between_slots_is_refused_by_the_aead_providers(every_provider, tmp_path):
    for name in ("pkcs11", "aws-kms", "vault"):
        provider = every_provider[name]
        path = tmp_path / f"{name}.json"
        save_keyring(path, Keyring.generate(), provider)
        doc = json.loads(path.read_text())
        doc["index_root"]["wrapped"], doc["integrity"]["wrapped"] = (
            doc["integrity"]["wrapped"],
            doc["index_root"]["wrapped"],
        )
        path.write_text(json.dumps(doc))
        with pytest.raises(ProviderError) as err:
            load_keyring(path, provider)
        assert err.value.code in ("unwrap-failed", "denied"), name


def test_no_provider_sdk_in_the_plain_install_path():
    """Building the local provider must not import the HSM, AWS or Vault SDKs (they are optional extras)."""
    code = (
        "import sys; from proxy.keymgmt.providers import build_provider;"
        "from proxy.keymgmt.providers.local import generate_kek;"
        "build_provider({}, {'FHIRCRYPT_KEK': generate_kek()});"
        "print(sorted(m for m in ('pkcs11', 'boto3', 'hvac') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
