"""Session-wide test policy: with CI=true, a test that needs real parts fails instead of skipping."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.prereq import in_ci

REAL_PARTS = ("tests/e2e/", "tests/integration/", "tests/realapi/")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if in_ci() and report.skipped and any(part in item.nodeid for part in REAL_PARTS):
        report.outcome = "failed"
        report.longrepr = f"CI=true: {item.nodeid} needs real parts and must not skip ({report.longrepr})"
    return report
