"""Pure cryptographic primitives: the per-record envelope, blind indexes, encodings, URL signing.

Pure means no I/O: no files, no network, no environment (randomness comes from ``secrets``).
Everything here takes its keys as arguments, so it runs the same in the proxy, the CLI and
the tests, and a test (``tests/test_crypto_purity.py``) holds every module to it. Where keys
come from - the keyring file, KEK providers, the key cache, patient keys - is
:mod:`proxy.keymgmt`, which depends on this package and never the other way round.
"""
