"""fhircrypt: an encrypting reverse proxy for FHIR R4.

The package is split into a pure core (``policy``, ``crypto``, ``transform``) that
works on plain dicts and knows nothing about HTTP, and thin shells around it
(``web`` for the aiohttp proxy, ``cli`` for the command line).
"""

__version__ = "0.1.0"
