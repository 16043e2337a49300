"""Example counts for the adversarial suite: bounded in CI, longer on request.

``FHIRCRYPT_ADVERSARIAL=long`` multiplies every count by 20 (a night run);
``FHIRCRYPT_ADVERSARIAL=ci`` (the default) keeps the whole suite within a few minutes on two cores.
Hypothesis' own database is kept in ``.hypothesis/`` so a found failure is replayed first.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("FHIRCRYPT_ADVERSARIAL", "ci")
SCALE = 20 if PROFILE == "long" else 1


def examples(n: int):
    """Hypothesis settings for a property run ``n`` times per profile unit, without deadlines."""
    return settings(
        max_examples=n * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
