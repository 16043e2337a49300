"""The fhircrypt benchmark: what the proxy costs, measured beside the upstream alone.

``python -m bench`` starts the test upstream (Medplum's FHIR router, a node process),
a bare aiohttp passthrough and two fhircrypt proxies (an empty policy and
``policies/satusehat.yaml``) as separate processes, and alternates the same workloads
across the four targets in one run. See ``docs/benchmarks.md`` for the method and the
latest results.

Modules: ``targets`` (the passthrough and the proxy launcher), ``load`` (load
generation: wrk, and an open-loop paced client in Python), ``core`` (the network-free
micro-benchmark of the pure core), ``report`` (medians, ratios, JSON, chart).
"""
