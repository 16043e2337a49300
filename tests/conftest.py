"""Shared fixtures: the real upstream FHIR server, keyrings, policies and the proxy under test."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import orjson
import pytest
from aiohttp.test_utils import TestServer

from proxy.keymgmt.keyring import Keyring
from proxy.policy.compiler import CompiledPolicy, compile_file, compile_text
from proxy.settings import Settings
from proxy.web.app import create_app
from tests.hapi_server import HapiServer
from tests.keystores import kms, softhsm, vault  # noqa: F401 (fixtures: SoftHSM2, moto_server, stand-in Vault)
from tests.upstream_server import UpstreamServer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PUBLIC_BASE = "http://proxy.test/fhir/R4"

# The shipped policies' deployment variables, as the fixtures spell them (tests/fixtures/*/README.md).
# Set in the environment so that `fhircrypt serve` and `policy check` run by tests see them too.
DEPLOYMENT = {
    "FHIRCRYPT_ORGANIZATION_ID": "REPLACE-WITH-ORGANIZATION-ID",
    "FHIRCRYPT_BPJS_SYSTEM": "https://fhir.example-hospital.id/id/bpjs",
    "FHIRCRYPT_MRN_SYSTEM": "https://fhir.example-hospital.org/sid/mrn",
    "FHIRCRYPT_MEDICAID_SYSTEM": "https://fhir.example-hospital.org/sid/medicaid",
}
for _name, _value in DEPLOYMENT.items():
    os.environ.setdefault(_name, _value)

TEST_POLICY = """
fhircrypt-policy: 1
name: unit-test
groups: {identity: {}, demographics: {}, clinical: {}}
reference_display: {group: demographics}
resources:
  Patient:
    elements:
      - {path: identifier.where(system='https://fhir.kemkes.go.id/id/nik').value, group: identity, id: nik}
      - {path: name, group: demographics}
      - {path: address.line, group: demographics}
      - {path: address.city, group: demographics}
      - {path: birthDate, group: demographics}
      - {path: telecom, group: demographics}
      - {path: extension('https://fhir.kemkes.go.id/r4/StructureDefinition/birthPlace'), group: demographics}
  Observation:
    elements:
      - {path: value, group: clinical}
      - {path: component.value, group: clinical}
      - {path: note.text, group: clinical}
  Communication:
    elements:
      - {path: payload.content.ofType(string), group: clinical}
"""


def pytest_addoption(parser):
    parser.addoption(
        "--upstream",
        choices=("medplum", "hapi"),
        default="medplum",
        help="medplum (default): the suite against the Medplum test server; hapi: only the tests marked 'hapi', "
        "against HAPI FHIR's JPA server (tests/hapi/, built and started by the suite)",
    )


HAPI_STATS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if HAPI_STATS:
        terminalreporter.write_line(
            "HAPI test upstream: started in {startup:.1f} s, {rss_mib:.0f} MiB resident at the end".format(**HAPI_STATS)
        )


def unit_policy(text: str = TEST_POLICY) -> CompiledPolicy:
    return compile_text(text, "unit-test.yaml")


def sealed_groups(stored: dict) -> dict[str, dict]:
    """The group ciphertext extensions of a stored format-v2 record, by group (root or, for Binary, meta)."""
    exts = [*stored.get("extension", ()), *stored.get("meta", {}).get("extension", ())]
    url = "https://fhircrypt.dev/fhir/StructureDefinition/sealed"
    return {e["valueString"].split(".")[1]: e for e in exts if e.get("url") == url}


def spoil(ext: dict) -> None:
    """Change the last characters of a ciphertext extension's value (it then fails its GCM tag)."""
    value = ext["valueString"]
    ext["valueString"] = value[:-4] + ("AAAA" if value[-4:] != "AAAA" else "BBBB")


@pytest.fixture(scope="session")
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture(scope="session")
def satusehat() -> CompiledPolicy:
    return compile_file(ROOT / "policies" / "satusehat.yaml", DEPLOYMENT)


@pytest.fixture(scope="session")
def upstream():
    server = UpstreamServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def clean_upstream(upstream):
    upstream.reset()
    return upstream


@pytest.fixture(scope="session")
def hapi():
    """HAPI FHIR's JPA server (tests/hapi/): built if needed, started once per session; failures name the step."""
    server = HapiServer()
    server.start()
    HAPI_STATS["startup"] = server.startup_seconds or 0.0
    yield server
    HAPI_STATS["rss_mib"] = server.rss_bytes() / 2**20
    server.stop()


@pytest.fixture
def clean_hapi(hapi):
    hapi.reset()
    return hapi


@pytest.fixture(params=["medplum", pytest.param("hapi", marks=pytest.mark.hapi)])
def clean_server(request):
    """An empty upstream of either kind, for a behaviour both servers must show through the proxy: the
    Medplum half runs in the default suite, the HAPI half (marked ``hapi``) with ``--upstream hapi``.
    Both offer ``base_url``, ``reset()`` and ``dump()``; only Medplum's test server logs requests."""
    server = request.getfixturevalue("upstream" if request.param == "medplum" else "hapi")
    server.reset()
    return server


@pytest.fixture
async def either_client(proxy_for, clean_server, satusehat):
    """The proxy with the SATUSEHAT policy in front of ``clean_server`` (HAPI answers slower)."""
    return await proxy_for(clean_server.base_url, satusehat, upstream_timeout=120.0)


def make_settings(upstream_base: str, **overrides) -> Settings:
    values = dict(
        upstream=upstream_base, policy="", keyring="", public_base_url=PUBLIC_BASE, auth="none", upstream_timeout=10.0
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def proxy_for(aiohttp_client, keyring):
    """Factory: a test client for the proxy in front of ``upstream_base`` with ``policy``."""

    async def factory(upstream_base: str, policy: CompiledPolicy, ring: Keyring | None = None, **overrides):
        app = create_app(make_settings(upstream_base, **overrides), policy, ring or keyring)
        server = TestServer(app)
        await server.start_server(access_log=None)  # as `fhircrypt serve` runs it: URLs carry search values
        return await aiohttp_client(server)

    return factory


def load_fixture(name: str, ids: dict[str, str] | None = None) -> dict:
    text = (FIXTURES / name).read_text()
    for placeholder, value in (ids or {}).items():
        text = text.replace(placeholder, value)
    return json.loads(text)


def leaked(needles: Iterable[str], text: str) -> list[str]:
    """The needles that occur in ``text``. A short one (a given name like "Sri") also turns up inside
    random base64 or base32 ciphertext now and then, so below 8 characters it counts only standing as
    a value of its own (between quotes, '=', '&', '|', '>', spaces), not inside a run of such characters;
    8 characters and more occur in a megabyte of random ciphertext about once in 3·10^8 runs."""
    return [
        n
        for n in needles
        if (n in text if len(n) >= 8 else re.search(rf"(?<![A-Za-z0-9+/_-]){re.escape(n)}(?![A-Za-z0-9+/_-])", text))
    ]


def assert_no_plaintext(stored: Iterable[dict], needles: Iterable[str]) -> None:
    """The at-rest invariant: no needle occurs anywhere in anything the upstream stores."""
    found = leaked(needles, orjson.dumps(list(stored)).decode())
    assert not found, f"plaintext found at rest: {found}"


FHIR_JSON = {"Content-Type": "application/fhir+json"}


# ---------------------------------------------------------------- markers (registered in pyproject.toml)
# The pure core (crypto, policy, transform) is tested without servers, processes or sockets: `./dev test -m unit`
# runs those tests in seconds. A test of these files that asks for a server fixture is integration all the same.
UNIT_FILES = frozenset(
    {
        "test_blindindex.py",
        "test_bundlestream.py",
        "test_compartment.py",
        "test_core_fast_paths.py",
        "test_crypto.py",
        "test_decimals.py",
        "test_policy.py",
        "test_records.py",
        "test_reencrypt_manifest.py",
        "test_searchparams.py",
        "test_structure_validation.py",
        "test_validation_messages.py",
    }
)
SERVER_FIXTURES = frozenset(
    {"upstream", "clean_upstream", "proxy_for", "aiohttp_client", "aiohttp_server", "softhsm", "kms", "vault"}
)
SLOW_FILES = frozenset({"test_bench_smoke.py", "test_adv_soak.py"})  # whole benchmark or soak runs
SLOW_CORE_FILES = frozenset({"test_adv_properties_core.py"})  # the core, but minutes of generated resources


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The HAPI half runs only when asked for (``--upstream hapi``), and then alone: a fast default loop.
    Every test is ``unit`` or ``integration``, but for the slow core properties; long runs are also ``slow``."""
    want_hapi = config.getoption("upstream") == "hapi"
    keep, drop = [], []
    for item in items:
        (keep if (item.get_closest_marker("hapi") is not None) == want_hapi else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    for item in items:
        name = item.path.name
        if name in SLOW_CORE_FILES:
            item.add_marker(pytest.mark.slow)
            continue
        servers = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.unit if name in UNIT_FILES and not servers else pytest.mark.integration)
        if name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
