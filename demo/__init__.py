"""The demo (``./dev demo``, or ``python -m demo`` from a source checkout).

A development tool, not part of the installed package: it runs the test FHIR server
(Medplum's router, ``tests/upstream``) and the SATUSEHAT sample resources
(``tests/fixtures/satusehat``) that only a source checkout has.
"""
