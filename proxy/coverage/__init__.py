"""``fhircrypt coverage``: a read-only scan of what a FHIR server stores encrypted, masked or in the clear.

``scan`` is pure (resource in, counts out, no aiohttp), ``detectors`` says which clear values look
like PHI, ``report`` renders the table, JSON and HTML, and ``command`` is the shell that pages
through the server with the machinery of ``fhircrypt reencrypt``.
"""
