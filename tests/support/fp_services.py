"""The one rule for tests that need a real external service (PostgreSQL, S3).

A developer without the service installed still runs the rest of the suite:
such a test is *skipped*, with a reason that says what to install. CI sets
``FLEETPUSH_REQUIRE_SERVICES=1`` (.ci/run), and there the same situation is a
*failure*: a CI run must never go green by silently skipping the PostgreSQL
and S3 tests (issue 15).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ENV = "FLEETPUSH_REQUIRE_SERVICES"


def services_required() -> bool:
    """True when a missing service must fail the test, not skip it (CI)."""
    return os.environ.get(REQUIRE_ENV, "") == "1"


def service_unavailable(service: str, why: str) -> NoReturn:
    """Skip the test (developer machine) or fail it (``FLEETPUSH_REQUIRE_SERVICES=1``).

    Raises pytest's Skipped or Failed outcome; never returns.
    """
    if services_required():
        pytest.fail(f"{service}: {why} ({REQUIRE_ENV}=1, so this fails)", pytrace=False)
    pytest.skip(f"{service}: {why} (set {REQUIRE_ENV}=1 to make this a failure)")
