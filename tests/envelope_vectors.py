"""The envelope test vectors (tests/vectors/envelope-v1.json, envelope-v2.json): their fixed inputs
and how fhircrypt computes their outputs.

Production code cannot choose a nonce (:meth:`RecordCipher.seal` draws a fresh random one),
so the fixed nonces the vectors need come from :class:`FixedNonceCipher`, which exists only
here, in the tests. ``python -m tests.envelope_vectors v1`` (or ``v2``) prints that vector file with the outputs
fhircrypt computes now (to regenerate it after a deliberate format change, and to review the diff).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from proxy.crypto.encoding import b64e
from proxy.crypto.envelope import RecordCipher, associated_data, group_associated_data


class FixedNonceCipher(RecordCipher):
    """A record cipher whose element nonces are given, in order: for published vectors only."""

    __slots__ = ("_given",)

    def fixed_nonces(self, nonces: Iterable[bytes]) -> None:
        self._given = list(nonces)

    def _nonce(self) -> bytes:
        return self._given.pop(0)  # IndexError when the vectors run out: never a random fallback


VECTORS = Path(__file__).parent / "vectors" / "envelope-v1.json"
VECTORS_V2 = Path(__file__).parent / "vectors" / "envelope-v2.json"


def vector_inputs() -> dict:
    """The fixed inputs of format v1: every value that is random in production is a constant here."""
    return {
        "kek": bytes(range(100, 132)).hex(),
        "master_key": bytes(range(32)).hex(),
        "key_id": "k1",
        "data_key": bytes(range(64, 128)).hex(),
        "record_id": b64e(b"\xaa" * 12),
        "resource_type": "Patient",
        "elements": [
            {
                "field_id": "nik",
                "path": "identifier[0].value",
                "nonce": (b"\x01" * 12).hex(),
                "plaintext": '["3201010101900001",null]',
            },
            {
                "field_id": "name",
                "path": "name[0]",
                "nonce": (b"\x02" * 12).hex(),
                "plaintext": '{"family":"Santoso","given":["Budi"]}',
            },
        ],
    }


def vector_inputs_v2() -> dict:
    """Format v2: the same record sealed per group. A group's plaintext lists its elements' plaintexts in
    the sorted order of their locations; ``placeholders`` are the locations holding only the mask marker,
    with the group and field id the record MAC binds to each."""
    inputs = {k: v for k, v in vector_inputs().items() if k != "elements"}
    inputs["groups"] = [
        {
            "group": "identity",
            "nonce": (b"\x03" * 12).hex(),
            "plaintext": '[["3201010101900001",null]]',
        },
        {
            "group": "demographics",
            "nonce": (b"\x04" * 12).hex(),
            "plaintext": '[{"family":"Santoso","given":["Budi"]}]',
        },
    ]
    inputs["placeholders"] = [
        {"path": "identifier[0].value", "group": "identity", "field_id": "nik"},
        {"path": "name[0]", "group": "demographics", "field_id": "name"},
    ]
    return inputs


def _cipher(inputs: dict, nonces: list[bytes], version: str) -> tuple[FixedNonceCipher, bytes, bytes]:
    master, data_key = bytes.fromhex(inputs["master_key"]), bytes.fromhex(inputs["data_key"])
    wrapped = aes_key_wrap(master, data_key)
    cipher = FixedNonceCipher(
        inputs["resource_type"], inputs["key_id"], inputs["record_id"], data_key, wrapped, version
    )
    cipher.fixed_nonces(nonces)
    return cipher, master, wrapped


def compute_vectors_v2(inputs: dict) -> dict:
    """The published outputs of format v2."""
    cipher, master, wrapped = _cipher(inputs, [bytes.fromhex(g["nonce"]) for g in inputs["groups"]], "v2")
    cts = [cipher.seal_group(g["group"], g["plaintext"].encode()) for g in inputs["groups"]]
    items = [(p["path"], f"{p['group']}\x1f{p['field_id']}") for p in inputs["placeholders"]]
    items += [("@" + g["group"], ct) for g, ct in zip(inputs["groups"], cts, strict=True)]
    mac = cipher.mac(sorted(items))
    return {
        "kek_wrapped_master_key": b64e(aes_key_wrap(bytes.fromhex(inputs["kek"]), master)),
        "wrapped_data_key": b64e(wrapped),
        "associated_data": [
            group_associated_data(inputs["resource_type"], inputs["record_id"], g["group"]).decode()
            for g in inputs["groups"]
        ],
        "group_ciphertexts": cts,
        "record_mac": b64e(mac),
        "envelope": cipher.envelope(mac),
    }


def compute_vectors(inputs: dict) -> dict:
    """The published outputs of format v1, computed by fhircrypt's own envelope code from ``inputs``."""
    cipher, master, wrapped = _cipher(inputs, [bytes.fromhex(e["nonce"]) for e in inputs["elements"]], "v1")
    cts = [cipher.seal(e["field_id"], e["path"], e["plaintext"].encode()) for e in inputs["elements"]]
    mac = cipher.mac([(e["path"], ct) for e, ct in zip(inputs["elements"], cts, strict=True)])
    return {
        "kek_wrapped_master_key": b64e(aes_key_wrap(bytes.fromhex(inputs["kek"]), master)),
        "wrapped_data_key": b64e(wrapped),
        "associated_data": [
            associated_data(inputs["resource_type"], inputs["record_id"], e["field_id"], e["path"]).decode()
            for e in inputs["elements"]
        ],
        "ciphertexts": cts,
        "record_mac": b64e(mac),
        "envelope": cipher.envelope(mac),
    }


if __name__ == "__main__":
    import sys

    v2 = sys.argv[1:] == ["v2"]
    path, inputs = (VECTORS_V2, vector_inputs_v2()) if v2 else (VECTORS, vector_inputs())
    published = json.loads(path.read_text()) if path.exists() else {"description": ""}  # keeps its description
    published.update(inputs=inputs, outputs=(compute_vectors_v2 if v2 else compute_vectors)(inputs))
    print(json.dumps(published, indent=2, ensure_ascii=False))
