"""The envelope test vectors (tests/vectors/envelope-v1.json): their fixed inputs and how fhircrypt
computes their outputs.

Production code cannot choose a nonce (:meth:`RecordCipher.seal` draws a fresh random one),
so the fixed nonces the vectors need come from :class:`FixedNonceCipher`, which exists only
here, in the tests. ``python -m tests.envelope_vectors`` prints the vector file with the outputs fhircrypt
computes now (to regenerate it after a deliberate format change, and to review the diff).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from proxy.crypto.encoding import b64e
from proxy.crypto.envelope import RecordCipher, associated_data


class FixedNonceCipher(RecordCipher):
    """A record cipher whose element nonces are given, in order: for published vectors only."""

    __slots__ = ("_given",)

    def fixed_nonces(self, nonces: Iterable[bytes]) -> None:
        self._given = list(nonces)

    def _nonce(self) -> bytes:
        return self._given.pop(0)  # IndexError when the vectors run out: never a random fallback


VECTORS = Path(__file__).parent / "vectors" / "envelope-v1.json"


def vector_inputs() -> dict:
    """The fixed inputs: every value that is random in production is a constant here."""
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


def compute_vectors(inputs: dict) -> dict:
    """The published outputs, computed by fhircrypt's own envelope code from ``inputs``."""
    master, data_key = bytes.fromhex(inputs["master_key"]), bytes.fromhex(inputs["data_key"])
    wrapped = aes_key_wrap(master, data_key)
    nonces = [bytes.fromhex(e["nonce"]) for e in inputs["elements"]]
    cipher = FixedNonceCipher(inputs["resource_type"], inputs["key_id"], inputs["record_id"], data_key, wrapped)
    cipher.fixed_nonces(nonces)
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
    published = json.loads(VECTORS.read_text())  # keeps its description
    published.update(inputs=vector_inputs(), outputs=compute_vectors(vector_inputs()))
    print(json.dumps(published, indent=2, ensure_ascii=False))
