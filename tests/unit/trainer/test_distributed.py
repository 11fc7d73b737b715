"""Intra-op threads follow the pod's CPU limit, not the node's core count."""

from __future__ import annotations

import pytest

from flownexus_trainer.distributed import cpu_limit, thread_count


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),  # no limit
        ("200000 100000\n", 2.0),
        ("150000 100000", 1.5),
        ("50000 100000", 0.5),
        ("", None),
        (None, None),
        ("garbage", None),
        ("x 100000", None),
        ("0 100000", None),
    ],
)
def test_cpu_limit_reads_cgroup_v2_cpu_max(text: str | None, cpus: float | None) -> None:
    assert cpu_limit(text) == cpus


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "cpu_count", "local_world", "omp", "threads"),
    [
        ("200000 100000", 64, 64, 1, None, 2),  # a 2-CPU pod on a 64-core node: 2, not 64
        ("200000 100000", 64, 64, 2, None, 1),  # shared by 2 processes of the pod
        ("400000 100000", 64, 64, 3, None, 1),  # 4 // 3
        ("150000 100000", 64, 64, 1, None, 1),  # rounded down: a 2nd thread would be throttled
        ("50000 100000", 64, 64, 1, None, 1),  # at least one
        ("max 100000", 8, 64, 2, None, 4),  # no limit: the CPUs this process may run on
        (None, None, 16, 4, None, 4),  # no cgroup file, no affinity: the core count
        (None, None, None, 1, None, 1),
        ("800000 100000", 4, 64, 1, None, 4),  # a limit above the allowed CPUs: the CPUs
        ("200000 100000", 64, 64, 1, "7", None),  # OMP_NUM_THREADS wins: leave torch's setting alone
    ],
)
def test_thread_count_follows_the_pod_cpu_limit_shared_by_local_processes(
    cpu_max: str | None, affinity: int | None, cpu_count: int | None, local_world: int, omp: str | None,
    threads: int | None,
) -> None:  # fmt: skip
    assert thread_count(cpu_max, affinity, cpu_count, local_world, omp) == threads
