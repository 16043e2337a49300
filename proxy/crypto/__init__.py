"""Cryptography: the keyring of data master keys and the per-record envelope."""
