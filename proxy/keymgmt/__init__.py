"""Key management, with I/O: the keyring file and its KEK providers, the reloading key cache,
and per-patient keys for crypto-shredding.

The primitives these keys feed are :mod:`proxy.crypto` (pure, no I/O); the databases that
hold sealed patient keys are :mod:`proxy.keystore`.
"""
