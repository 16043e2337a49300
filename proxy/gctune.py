"""Garbage-collector settings for a long-running proxy worker.

Why: after start-up a worker holds ~70,000 long-lived objects (the compiled policy,
fhir.resources' models, aiohttp, cryptography), and every full collection scans all of
them. A 100-Patient searchset parses into ~20,000 containers, so with Python's default
generation-0 threshold (700) one response triggers dozens of young collections and,
every so often, a full one: the p99 spikes of docs/benchmarks.md.

``tune`` therefore moves everything alive at the end of start-up into the permanent
generation (``gc.freeze``: never scanned again; those objects live as long as the process
anyway) and raises the generation-0 threshold, so a request's short-lived containers are
mostly freed by reference counting before a collection ever looks at them. Reference
cycles are still collected, only in larger batches; memory stays bounded (the soak,
``python -m bench.soak``, reports RSS at start, after warm-up and at the end).
"""

from __future__ import annotations

import gc

DEFAULT_THRESHOLD = 50_000


def tune(threshold: int = DEFAULT_THRESHOLD) -> None:
    """Freeze start-up objects and set the generation-0 threshold; ``threshold <= 0`` keeps Python's defaults."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)
