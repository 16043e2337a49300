"""The CI soak: 40 seconds of mixed traffic through a real proxy process (tests/soak.py has the 10-minute run)."""

from __future__ import annotations

import os

import pytest

from tests.soak import check, run_soak


@pytest.mark.soak
def test_a_mixed_workload_does_not_grow_the_proxys_memory_or_file_descriptors(upstream):
    upstream.reset()
    seconds = float(os.environ.get("FHIRCRYPT_SOAK_SECONDS", "40"))
    result = run_soak(upstream.base_url, seconds)
    print("\nsoak:", result.summary())
    assert len(result.samples) >= 5
    assert result.requests > 100
    assert not check(result), result.summary()
