"""The operator recovers by itself when the API server restarts under it.

TrainingJobs run on the KWOK nodes with a queue (maxConcurrentTrainingJobs 2), so that after the restart the
operator has work only it can do: see the Jobs complete through its watches, admit the waiting jobs, create
their children. The dev cluster's kube-apiserver is stopped (SIGTERM, SIGKILL after 5 s) and started again with
the same command line while jobs are in progress (etcd keeps running). The operator process is not touched.

Asserted, counted from the moment the new API server answers /readyz (all within 30 s):
- the operator (the same pid, never restarted) writes again (the API server's audit log);
- a TrainingJob created just after the restart gets its status from it (its TrainingJob watch is back);
- every Job that completes after the restart is acted on: the TrainingJob's `Trained` condition (worker Job) or
  `Failed` condition (validator Job) turns within 30 s of the Job's completionTime (its Job watch is back; both
  times have 1 s resolution). When the first in-progress job moves depends on the kube-controller-manager, which
  has to reconnect too: that figure is reported, not asserted.
Then every job reaches its final phase (Failed/ValidatorError, the KWOK path: see test_trainingjob_crashes.py)
well before the operator's 5-minute re-list, with no object created twice and no Job deleted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from tests.e2e.conftest import Cluster
from tests.reliability.harness import (
    FINAL,
    AuditLog,
    OperatorProcess,
    Poller,
    TrainingJobInvariants,
    api_client,
    apply_ready_cluster,
    audit_time,
    creations,
    deletions,
    first_operator_write_after,
    is_operator,
    layout_of,
    log,
    phase_counts,
    restart_apiserver,
    status_write_of,
    training_job,
    wait_for,
)

pytestmark = pytest.mark.reliability

JOBS = 16
LIMIT = 2
RECOVERY_S = 30  # the bound asserted on each recovery figure
FINISH_TIMEOUT_S = 150  # well under the operator's 5-minute re-list
JOB_CONTROLLER = "system:serviceaccount:kube-system:job-controller"


def _stamp(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def reaction_times(tjs: dict[str, Any], jobs: dict[str, Any], since: float) -> dict[str, float]:
    """Job name -> seconds from its completionTime to the condition the operator turned on its TrainingJob for it,
    for the Jobs that completed at or after ``since``."""
    out = {}
    for name, tj in tjs.items():
        conditions = {c["type"]: c for c in tj["status"].get("conditions") or []}
        for suffix, condition in (("a1", "Trained"), ("validate", "Failed")):
            job = jobs.get(f"{name}-{suffix}") or {}
            done = _stamp((job.get("status") or {}).get("completionTime"))
            turned = _stamp((conditions.get(condition) or {}).get("lastTransitionTime"))
            if done is not None and turned is not None and done >= int(since):
                out[f"{name}-{suffix}"] = turned - done
    return out


def test_operator_recovers_from_apiserver_restart_within_30s(flownexus_crds: Cluster, rel_namespace: str) -> None:
    cluster, ns = flownexus_crds, rel_namespace
    audit = AuditLog(layout_of(cluster))
    mark = audit.mark()
    client = api_client(cluster)
    invariants = TrainingJobInvariants(limit=LIMIT)
    poller = Poller(client, ns, ("TrainingJob", "Job"), interval=0.2, checks=[invariants])
    operator = OperatorProcess(cluster.kubeconfig, ns)
    names = [f"tj-{i:02d}" for i in range(JOBS)]
    operator.start()
    try:
        operator.wait_healthy()
        pid = operator.pid
        apply_ready_cluster(cluster, ns, LIMIT)
        with poller:
            cluster.apply(*(training_job(n, "rel") for n in names), namespace=ns)

            def finished() -> int:
                snap = poller.latest
                if snap is None:
                    return 0
                return sum((tj.get("status") or {}).get("phase") in FINAL for tj in snap.objects["TrainingJob"])

            wait_for("3 jobs final", lambda: finished() >= 3, 60)
            last_before = poller.latest
            assert last_before is not None
            in_flight = {
                tj["metadata"]["name"]
                for tj in last_before.objects["TrainingJob"]
                if (tj.get("status") or {}).get("phase") not in FINAL
            }
            log(f"namespace {ns}: restarting kube-apiserver with jobs at {phase_counts(last_before)}")
            restart = restart_apiserver(cluster)
            down = restart.ready - restart.stop_began
            log(
                f"kube-apiserver pid {restart.old_pid} -> {restart.new_pid}: down {down:.1f}s "
                f"(stopping took {restart.stopped - restart.stop_began:.1f}s)"
            )
            cluster.apply(training_job("probe", "rel"), namespace=ns)

            # From the audit log, after /readyz: the operator's first write; its first status of the probe; its
            # first status write on a job that was in progress; the Job controller's first write (for context).
            figures: dict[str, float] = {}
            wanted: dict[str, Callable[[dict[str, Any]], bool]] = {
                "first write": lambda e: True,
                "probe status": status_write_of({"probe"}),
                "in-flight job moved": status_write_of(in_flight),
            }

            def recovered() -> bool:
                events = audit.events(mark, ns)
                for what, where in wanted.items():
                    write = first_operator_write_after(events, restart.ready, where)
                    if write is not None:
                        figures[what] = audit_time(write) - restart.ready
                return len(figures) == len(wanted)

            try:
                wait_for("the operator's writes after the restart", recovered, FINISH_TIMEOUT_S, interval=0.5)
            except pytest.fail.Exception:
                pytest.fail(f"after the restart only {figures}; operator log {operator.log_path}:\n{operator.tail()}")
            try:
                wait_for(f"all {JOBS + 1} TrainingJobs final", lambda: finished() == JOBS + 1, FINISH_TIMEOUT_S, 0.5)
            except pytest.fail.Exception:
                stuck = [
                    f"{tj['metadata']['name']}: {tj.get('status')}"
                    for tj in client.list("TrainingJob", ns)
                    if (tj.get("status") or {}).get("phase") not in FINAL
                ]
                pytest.fail("stuck:\n" + "\n".join(stuck) + f"\noperator log {operator.log_path}:\n{operator.tail()}")
            all_final_s = time.time() - restart.ready
            time.sleep(2)
            poller.poll_once()

        assert operator.alive() and operator.pid == pid and operator.starts == 1, "the operator was restarted"
        assert operator.healthy()
        events = audit.events(mark, ns)
        job_controller = [
            e for e in events if (e.get("user") or {}).get("username") == JOB_CONTROLLER and e.get("verb") != "watch"
        ]
        kcm_s = min((audit_time(e) for e in job_controller if audit_time(e) >= restart.ready), default=-1.0)
        kcm_s = kcm_s - restart.ready if kcm_s >= 0 else float("nan")
        tjs = {tj["metadata"]["name"]: tj for tj in client.list("TrainingJob", ns)}
        jobs = {j["metadata"]["name"]: j for j in client.list("Job", ns)}
        reactions = reaction_times(tjs, jobs, restart.ready)
        worst = max(reactions.items(), key=lambda kv: kv[1], default=("none", 0.0))
        log(
            "after /readyz: " + ", ".join(f"{what} {s:.1f}s" for what, s in figures.items())
            + f"; the Job controller's first write {kcm_s:.1f}s; {len(reactions)} Jobs completed after it, the "
            f"operator acted on each within {worst[1]:.0f}s of its completionTime (worst {worst[0]})"
        )  # fmt: skip
        assert figures["first write"] <= RECOVERY_S, figures
        assert figures["probe status"] <= RECOVERY_S, figures
        assert reactions, "no Job completed after the restart: nothing showed that the Job watch is back"
        assert worst[1] <= RECOVERY_S, f"the operator acted on {worst[0]} {worst[1]:.0f}s after it completed"

        for name, tj in tjs.items():
            st = tj["status"]
            assert (st["phase"], st["reason"], st["attempt"]) == ("Failed", "ValidatorError", 1), (name, st)
        assert set(jobs) == {f"{n}-{suffix}" for n in tjs for suffix in ("a1", "validate")}
        operator_events = [e for e in events if is_operator(e)]
        created = creations(operator_events)
        assert not {k: n for k, n in created.items() if n > 1}, created
        attempted = {name for (resource, name) in creations(operator_events, cut_off=True) if resource == "jobs"}
        assert attempted == set(jobs), sorted(attempted ^ set(jobs))
        assert not deletions(events, "jobs")
        assert not {k: u for k, u in poller.uids.items() if len(u) > 1}
        assert not invariants.violations, "\n".join(invariants.violations[:20])
        failed_passes = operator.log_lines("pass failed")
        log(
            f"[figure] API server restart with {len(in_flight)} of {JOBS} jobs in progress, down {down:.1f}s; after "
            f"/readyz the same operator wrote again in {figures['first write']:.1f}s, gave a new job its status in "
            f"{figures['probe status']:.1f}s, acted on every Job completion within {worst[1]:.0f}s; first in-flight "
            f"job moved {figures['in-flight job moved']:.1f}s (Job controller back {kcm_s:.1f}s); all {JOBS + 1} "
            f"final {all_final_s:.1f}s after /readyz; {len(failed_passes)} failed passes while it was down"
        )
    finally:
        operator.stop()
