"""Missing prerequisites of real-part tests: a skip on a developer's machine, a failure in CI.

With ``CI=true`` no e2e, integration or real-API test may skip (tests/conftest.py also turns any skip
there into a failure), so a green CI run means the real parts really ran.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> NoReturn:
    """Stop the test because ``what`` is not there: skip locally, fail in CI."""
    if in_ci():
        pytest.fail(f"CI=true and a prerequisite is missing: {what}", pytrace=False)
    pytest.skip(what)
