"""Fixtures of the reliability suite: the e2e suite's `cluster` and `flownexus_crds` (the dev cluster, reused when
it runs), a `rel-<random>` namespace per test, and the policy that under CI=true nothing here may skip.

Each test runs its own operator process (harness.OperatorProcess) watching only its own namespace, so it can
SIGKILL it; the e2e suite's shared operator watches only `e2e-*`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.e2e.conftest import Cluster, cluster, flownexus_crds
from tests.prereq import in_ci
from tests.reliability.harness import namespaced

__all__ = ["cluster", "flownexus_crds"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # tests/conftest.py does this for e2e, integration and realapi; this conftest's hooks see only this folder.
    report = yield
    if in_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"CI=true: {item.nodeid} needs the dev cluster and must not skip ({report.longrepr})"
    return report


@pytest.fixture
def rel_namespace(flownexus_crds: Cluster) -> Iterator[str]:
    yield from namespaced(flownexus_crds)
