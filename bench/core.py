"""Micro-benchmark of the pure core (no network): the SATUSEHAT Patient, per core.

Measured in one process and one thread, interleaved, several rounds, median reported;
rates are per core because they divide by this thread's CPU time (``time.thread_time``),
not wall time, so other processes on the shared cores do not distort them.

Cases (µs per Patient and Patients/s per core):

``orjson``          ``orjson.loads`` + ``orjson.dumps`` of the plaintext Patient: the baseline
``orjson_at_rest``  the same for the encrypted (at-rest) form, which is what a read parses
``decrypt``         ``decrypt_resource`` alone on an already parsed at-rest Patient
``decrypt_path``    ``jsonnum.loads``(at-rest) + ``decrypt_resource`` + ``jsonnum.dumps``: a read, per resource
``crypto_floor``    only the calls the stored form makes necessary, with no policy and no walk: parse it, unwrap
                    the data key, the record MAC, open each group ciphertext and parse its values, serialise:
                    the floor of a read of this format in Python with these libraries
``encrypt``         ``index_identifiers`` + ``encrypt_resource`` alone (validation off)
``encrypt_path``    ``jsonnum.loads``(plaintext) + index + encrypt + ``jsonnum.dumps``: what a write costs
``crypto_floor_write`` likewise for a write: parse, every blind-index HMAC and its base32, a new data key
                    wrapped, each group sealed, the record MAC and envelope, serialise (no walk, no
                    normalising, no JSON of the group plaintexts)
``validate``        ``validate_resource`` (fhir.resources) of the plaintext: what create adds under ``validate: full``
``validate_structure`` ``check_structure`` of the plaintext: what create adds under ``validate: structure``
                    (the default)
``sentinel``        the PHI sentinel on a write: the names of the plaintext, then every clear string
                    of the encrypted Patient (``x_encrypt_path``: its share of a write's core cost)

``profile`` (cProfile) lists the top functions by own time of the decrypt and encrypt paths.
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import pstats
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from proxy.crypto.blindindex import BlindIndexer
from proxy.crypto.encoding import b32_128
from proxy.crypto.envelope import RecordCipher
from proxy.keymgmt.keyring import Keyring
from proxy.policy.compiler import CompiledPolicy, compile_file
from proxy.transform import jsonnum, sentinel
from proxy.transform import markers as mk
from proxy.transform.indexes import index_identifiers
from proxy.transform.records import ALL_GROUPS, ReadReport, decrypt_resource, encrypt_resource
from proxy.transform.structure import check_structure
from proxy.transform.validation import validate_resource

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "satusehat.yaml"
PATIENT = ROOT / "tests" / "fixtures" / "satusehat" / "patient.json"
# The shipped policy's deployment variables, spelled as the fixtures spell them.
DEPLOYMENT = {
    "FHIRCRYPT_ORGANIZATION_ID": "REPLACE-WITH-ORGANIZATION-ID",
    "FHIRCRYPT_BPJS_SYSTEM": "https://fhir.example-hospital.id/id/bpjs",
}


def patient_bytes(variant: int = 0) -> bytes:
    """The SATUSEHAT fixture Patient as compact JSON (valid ids; ``variant`` changes its numbers)."""
    text = PATIENT.read_text().replace("ORGANIZATION_ID", "org-1")
    if variant:
        text = text.replace("3175042903870007", f"{3175042903870007 + variant:016d}")
        text = text.replace("RM-2019-0481937", f"RM-2019-{481937 + variant:07d}")
    return orjson.dumps(orjson.loads(text))


def encrypt_for_storage(resource: dict, policy: CompiledPolicy, keyring: Keyring) -> int:
    """What the proxy does to a Patient on write, validation aside (see transform.bodies.encrypt_for_write);
    returns the number of index identifiers it added."""
    rp = policy.resources[resource["resourceType"]]
    ids = index_identifiers(resource, rp, keyring.indexer)
    encrypt_resource(resource, rp, keyring)
    if ids:
        resource["identifier"] = [*resource.get("identifier", ()), *ids]
    return len(ids)


class _Fixture:
    def __init__(self) -> None:
        self.policy = compile_file(POLICY, DEPLOYMENT)
        self.rp = self.policy.resources["Patient"]
        self.keyring = Keyring.generate()
        self.plain = patient_bytes()
        at_rest = orjson.loads(self.plain)
        self.index_identifiers = encrypt_for_storage(at_rest, self.policy, self.keyring)
        self.at_rest = orjson.dumps(at_rest)
        check = orjson.loads(self.at_rest)
        report = ReadReport()
        decrypt_resource(check, self.rp, self.keyring, ALL_GROUPS, self.policy.unenveloped, report)
        if report.failures or check != orjson.loads(self.plain):
            raise RuntimeError(f"the at-rest Patient does not decrypt to the original: {report.failures}")
        self.encrypted_elements = report.decrypted

    def record_parts(self) -> tuple[str, list[str], list[tuple[str, str]]]:
        """The stored Patient's envelope, its group ciphertexts and the items its record MAC covers, as a
        read computes them (seen during one read)."""
        stored = orjson.loads(self.at_rest)
        holder = stored["meta"] if self.rp.envelope_in_meta else stored
        exts = holder["extension"]
        envelope = next(e["valueString"] for e in exts if e["url"] == mk.ENVELOPE_URL)
        sealed = [e["valueString"] for e in exts if e["url"] == mk.GROUP_URL]
        with _spying(RecordCipher, "verify") as verified:
            decrypt_resource(stored, self.rp, self.keyring, ALL_GROUPS, self.policy.unenveloped, ReadReport())
        return envelope, sealed, verified[0][0]

    def write_parts(self) -> tuple[list[tuple[int, str, list[str]]], list[tuple[str, bytes]], list[tuple[str, str]]]:
        """What one write of the Patient computes its cryptography over (seen during one write): the texts
        of each blind-index label, each group's plaintext and the items of the record MAC."""
        with (
            _spying(BlindIndexer, "digests") as indexed,
            _spying(RecordCipher, "seal_group") as sealed,
            _spying(RecordCipher, "mac") as maced,
        ):
            encrypt_for_storage(orjson.loads(self.plain), self.policy, self.keyring)
        return [(v, label, list(texts)) for v, label, texts in indexed], sealed, maced[0][0]


@contextlib.contextmanager
def _spying(cls: type, name: str) -> Iterator[list[tuple]]:
    """The arguments (``self`` left out; iterables as lists) of every call of ``cls.name`` inside the block."""
    original, calls = getattr(cls, name), []

    def spy(this: object, *args: object) -> object:
        args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
        calls.append(args)
        return original(this, *args)

    setattr(cls, name, spy)
    try:
        yield calls
    finally:
        setattr(cls, name, original)


def _cases(fx: _Fixture) -> dict[str, tuple[Callable[[int], list], Callable[[list], None]]]:
    """name -> (make the batch's inputs outside the timed region, process them)."""
    loads, dumps = orjson.loads, orjson.dumps
    body_loads, body_dumps = jsonnum.loads, jsonnum.dumps  # what the proxy parses and writes bodies with
    rp, ring, policy, unenv = fx.rp, fx.keyring, fx.policy, fx.policy.unenveloped
    plain, at_rest = fx.plain, fx.at_rest

    def parse_serialise(items: list) -> None:
        for raw in items:
            dumps(loads(raw))

    def decrypt(items: list) -> None:
        for r in items:
            decrypt_resource(r, rp, ring, ALL_GROUPS, unenv, ReadReport())

    def decrypt_path(items: list) -> None:
        for raw in items:
            r = body_loads(raw)
            decrypt_resource(r, rp, ring, ALL_GROUPS, unenv, ReadReport())
            body_dumps(r)

    def encrypt(items: list) -> None:
        for r in items:
            encrypt_for_storage(r, policy, ring)

    def encrypt_path(items: list) -> None:
        for raw in items:
            r = body_loads(raw)
            encrypt_for_storage(r, policy, ring)
            body_dumps(r)

    def validate(items: list) -> None:
        for r in items:
            validate_resource(r)

    def validate_structure(items: list) -> None:
        for r in items:
            check_structure(r)

    envelope, sealed, mac_items = fx.record_parts()
    indexed, group_plaintexts, write_mac_items = fx.write_parts()

    def crypto_floor(items: list) -> None:
        for raw in items:
            record = loads(raw)
            cipher, mac = RecordCipher.open_envelope(ring, "Patient", envelope)
            cipher.verify(mac_items, mac)
            for ct in sealed:
                loads(cipher.open_group(ct)[1])
            dumps(record)

    def crypto_floor_write(items: list) -> None:
        indexer = ring.indexer
        for raw in items:
            record = loads(raw)
            for version, label, texts in indexed:
                b32_128(list(indexer.digests(version, label, texts)))
            cipher = RecordCipher.new(ring, "Patient", None, rp.at_rest_format)
            for group, pt in group_plaintexts:
                cipher.seal_group(group, pt)
            cipher.envelope(cipher.mac(write_mac_items))
            dumps(record)

    cfg = policy.sentinel
    parsed_plain = loads(plain)
    parsed_at_rest = loads(at_rest)
    names = sentinel.names_of(cfg, [parsed_plain])

    def sentinel_write(items: list) -> None:
        for r in items:
            sentinel.names_of(cfg, [parsed_plain])
            sentinel.check_resource(cfg, r, "Patient", names - sentinel.names_of(cfg, [r]))

    return {
        "orjson": (lambda n: [plain] * n, parse_serialise),
        "orjson_at_rest": (lambda n: [at_rest] * n, parse_serialise),
        "decrypt": (lambda n: [loads(at_rest) for _ in range(n)], decrypt),
        "decrypt_path": (lambda n: [at_rest] * n, decrypt_path),
        "crypto_floor": (lambda n: [at_rest] * n, crypto_floor),
        "encrypt": (lambda n: [loads(plain) for _ in range(n)], encrypt),
        "encrypt_path": (lambda n: [plain] * n, encrypt_path),
        "crypto_floor_write": (lambda n: [plain] * n, crypto_floor_write),
        "validate": (lambda n: [parsed_plain] * n, validate),
        "validate_structure": (lambda n: [parsed_plain] * n, validate_structure),
        "sentinel": (lambda n: [parsed_at_rest] * n, sentinel_write),
    }


def _measure(make: Callable[[int], list], run: Callable[[list], None], min_time: float) -> dict:
    batch, ops, cpu, wall = 50, 0, 0.0, 0.0
    run(make(5))  # warm caches (compiled paths, derived keys, pydantic models)
    while cpu < min_time:
        items = make(batch)
        # the batch's pre-made inputs must not make the garbage collector's passes longer
        gc.collect()
        gc.freeze()
        c0, w0 = time.thread_time(), time.perf_counter()
        run(items)
        cpu += time.thread_time() - c0
        wall += time.perf_counter() - w0
        gc.unfreeze()
        ops += batch
        batch = min(batch * 2, 400)
    return {"ops": ops, "cpu_us_per_op": cpu / ops * 1e6, "wall_us_per_op": wall / ops * 1e6}


def _profile(run: Callable[[list], None], items: list, top: int = 10) -> dict:
    prof = cProfile.Profile()  # wall clock: cheap to read, and this loop never waits
    prof.enable()
    run(items)
    prof.disable()
    stats = pstats.Stats(prof)
    return {**summarise_profile(stats, len(items), top), "areas": profile_areas(stats, len(items))}


IDLE = "poll' of 'select.epoll"  # the event loop waiting for sockets: idle, not work


def _busy(stats: pstats.Stats) -> dict:
    return {k: v for k, v in stats.stats.items() if IDLE not in k[2]}  # type: ignore[attr-defined]


def summarise_profile(stats: pstats.Stats, per: int, top: int = 10, sort: str = "tottime") -> dict:
    """Top functions by own time: {total_us_per_op, functions: [{function, calls, own_us, cum_us, own_share}]}.

    Time spent idle in ``epoll.poll`` is left out of the total and reported as ``idle_us_per_op``."""
    idle = sum(v[2] for k, v in stats.stats.items() if IDLE in k[2])  # type: ignore[attr-defined]
    raw = _busy(stats)
    total = sum(v[2] for v in raw.values())
    rows = sorted(raw.items(), key=lambda kv: kv[1][2 if sort == "tottime" else 3], reverse=True)[:top]
    out = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in rows:
        try:
            where = str(Path(file).resolve().relative_to(ROOT))
        except ValueError:
            where = Path(file).name if file != "~" else ""
        label = f"{where}:{line}({name})" if where else name
        out.append(
            {
                "function": label,
                "calls_per_op": nc / per,
                "own_us_per_op": tt / per * 1e6,
                "cum_us_per_op": ct / per * 1e6,
                "own_share": tt / total if total else 0.0,
            }
        )
    return {"ops": per, "total_us_per_op": total / per * 1e6, "idle_us_per_op": idle / per * 1e6, "functions": out}


# (area, substrings of "file:function") in order: the first match names a profile entry's area
_AREAS = (
    ("validation (fhir.resources, pydantic)", ("fhir/resources", "fhir_core", "pydantic")),
    ("blind indexes", ("proxy/crypto/blindindex", "proxy/transform/indexes")),
    ("fhircrypt crypto (envelope, AES-GCM calls, base64)", ("proxy/crypto", "AESGCM", "binascii", "hmac", "_hashlib")),
    ("fhircrypt element walk (transform/records, markers)", ("proxy/transform/records", "proxy/transform/markers")),
    ("fhircrypt other transform (bodies, guard, search, audit refs)", ("proxy/transform", "proxy/web/auditing")),
    ("fhircrypt web shell (app, headers, writes)", ("proxy/web",)),
    ("fhircrypt auth and audit (decision, tokens, records)", ("proxy/auth", "proxy/audit")),
    ("logging (JSON request log)", ("logging/", "proxy/logs")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("orjson, msgspec (JSON)", ("orjson", "msgspec")),
    ("aiohttp, yarl, multidict (HTTP)", ("aiohttp", "yarl", "multidict", "propcache")),
    ("asyncio event loop", ("asyncio",)),
    ("sockets, epoll", ("socket", "epoll", "select")),
)


def _area(file: str, name: str) -> str | None:
    key = f"{file}:{name}"
    return next((a for a, needles in _AREAS if any(n in key for n in needles)), None)


def profile_areas(stats: pstats.Stats, per: int) -> list[dict]:
    """Own time grouped by area (validation, crypto, element walk, orjson, aiohttp, ...), per operation.

    A built-in function that names no area (``dict.get``, ``getattr``) is charged to the
    areas of its callers, in proportion to the time each caller spent in it."""
    raw = _busy(stats)
    total = sum(v[2] for v in raw.values()) or 1.0
    other = "other Python and builtins"
    sums: dict[str, float] = {}
    for (file, _line, name), (_cc, _nc, tt, _ct, callers) in raw.items():
        area = _area(file, name)
        if area is None and file == "~" and callers:
            for (cfile, _cline, cname), caller_stats in callers.items():
                charged = _area(cfile, cname) or other
                sums[charged] = sums.get(charged, 0.0) + caller_stats[2]
            continue
        sums[area or other] = sums.get(area or other, 0.0) + tt
    return [
        {"area": a, "own_us_per_op": t / per * 1e6, "own_share": t / total}
        for a, t in sorted(sums.items(), key=lambda kv: kv[1], reverse=True)
    ]


def run_core(rounds: int = 3, min_time: float = 0.5, profile_ops: int = 2000) -> dict:
    """Interleaved rounds of every case; medians; the decrypt and encrypt path profiles."""
    fx = _Fixture()
    cases = _cases(fx)
    per_round: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (make, run) in cases.items():
            gc.collect()
            per_round[name].append(_measure(make, run, min_time))
    results = {}
    for name, runs in per_round.items():
        cpu = statistics.median(r["cpu_us_per_op"] for r in runs)
        results[name] = {
            "cpu_us_per_op": cpu,
            "wall_us_per_op": statistics.median(r["wall_us_per_op"] for r in runs),
            "per_core_per_s": 1e6 / cpu,
            "rounds_cpu_us_per_op": [r["cpu_us_per_op"] for r in runs],
        }
    base = results["orjson"]["cpu_us_per_op"]
    for r in results.values():
        r["x_orjson"] = r["cpu_us_per_op"] / base
    results["sentinel"]["x_encrypt_path"] = (
        results["sentinel"]["cpu_us_per_op"] / results["encrypt_path"]["cpu_us_per_op"]
    )
    make_d, run_d = cases["decrypt_path"]
    make_e, run_e = cases["encrypt_path"]
    return {
        "resource": "tests/fixtures/satusehat/patient.json (compact JSON)",
        "policy": "policies/satusehat.yaml",
        "bytes_plaintext": len(fx.plain),
        "bytes_at_rest": len(fx.at_rest),
        "index_identifiers": fx.index_identifiers,
        "encrypted_elements": fx.encrypted_elements,
        "rounds": rounds,
        "cases": results,
        "profile": {
            "tool": "cProfile (deterministic; inflates the cost of Python calls relative to C calls)",
            "decrypt_path": _profile(run_d, make_d(profile_ops)),
            "encrypt_path": _profile(run_e, make_e(max(1, profile_ops // 2))),
        },
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run_core(rounds=1, min_time=0.3, profile_ops=500), indent=2))
