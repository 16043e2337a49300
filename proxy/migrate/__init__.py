"""Offline migration of stored resources: encrypt plaintext, re-encrypt under new keys or policies, retire keys.

``assess`` is pure (resource in, decision out, reusing the proxy's write path); ``walker``,
``upstream`` and ``run`` are the aiohttp shell that pages through the FHIR server.
"""
