"""TrainingJobs survive an operator that is SIGKILLed again and again.

30 one-worker TrainingJobs on the KWOK fake nodes of the dev cluster (KWOK runs every Job pod and completes it
at once, as in bench/trainingjob_scale.py), created in waves, some while the operator is dead; the operator is
SIGKILLed at 10 random moments (seeded: FLOWNEXUS_RELIABILITY_SEED reproduces a run) and started again each
time. On KWOK the validator's pod completes without writing a verdict, so the life cycle of every job ends in
`Failed`, reason `ValidatorError` ("the validator finished without writing a verdict"), after Created ->
(Running) -> Validating: that is the final phase asserted, and reaching it needs every step of the operator.

Asserted: every job reaches that final phase within a deadline shorter than the operator's 5-minute re-list (a
job may not rely on it), after one attempt; the Jobs left are exactly one worker Job (`<tj>-a1`) and one validator
Job (`<tj>-validate`) per TrainingJob, each controlled by it; in the API server's audit log no object was created
twice (201), no Job was deleted, and no Job was applied again once it existed (which would be a duplicate had it
been deleted meanwhile); no Job was ever seen with a second uid; every snapshot polled during the run had at most
`maxConcurrentTrainingJobs` admitted unfinished jobs, phases only moving forward and final phases never changing.
A kill can cut off the answer to a create that the API server stored (504 "context canceled" in the audit
log): such a Job counts as created once, by the uids seen.
"""

from __future__ import annotations

import time
from collections import Counter

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
    code,
    creations,
    deletions,
    is_operator,
    layout_of,
    log,
    phase_counts,
    seeded_rng,
    training_job,
    wait_for,
)

pytestmark = pytest.mark.reliability

JOBS = 30
KILLS = 10
FIRST_WAVE = 12  # created before the first kill; the rest come in pairs while the operator is dead
PER_KILL = (JOBS - FIRST_WAVE) // (KILLS - 1)
LIMIT = 4  # maxConcurrentTrainingJobs: a queue, so admission runs across the crashes too
ALIVE_S = (0.3, 4.0)  # each operator lives this long (uniform) before its SIGKILL; startup takes about 1 s
DEAD_S = (0.0, 1.0)  # and stays dead this long
# Every job final within this after the last restart: well under the operator's 5-minute re-list, so a job
# that only a re-list would have unstuck fails the test.
FINISH_TIMEOUT_S = 150
NO_VERDICT = "the validator finished without writing a verdict"


def test_trainingjobs_survive_operator_sigkills(flownexus_crds: Cluster, rel_namespace: str) -> None:
    cluster, ns = flownexus_crds, rel_namespace
    seed, rng = seeded_rng(ns)
    audit = AuditLog(layout_of(cluster))
    mark = audit.mark()
    client = api_client(cluster)
    invariants = TrainingJobInvariants(limit=LIMIT)
    poller = Poller(client, ns, ("TrainingJob", "Job"), checks=[invariants])
    operator = OperatorProcess(cluster.kubeconfig, ns)
    names = [f"tj-{i:02d}" for i in range(JOBS)]
    started = time.monotonic()
    operator.start()
    try:
        operator.wait_healthy()
        apply_ready_cluster(cluster, ns, LIMIT)
        with poller:
            cluster.apply(*(training_job(n, "rel") for n in names[:FIRST_WAVE]), namespace=ns)
            created = FIRST_WAVE
            kills: list[str] = []
            for k in range(1, KILLS + 1):
                alive = rng.uniform(*ALIVE_S)
                time.sleep(max(0.0, operator.started_at + alive - time.monotonic()))
                operator.sigkill()
                snap = poller.poll_once()
                kills.append(f"kill {k} at {alive:.1f}s after start: {phase_counts(snap)}")
                log(kills[-1])
                if k < KILLS:
                    batch = names[created : created + PER_KILL]
                    cluster.apply(*(training_job(n, "rel") for n in batch), namespace=ns)
                    created += len(batch)
                time.sleep(rng.uniform(*DEAD_S))
                operator.start()
            assert created == JOBS
            last_restart = time.monotonic()

            def all_final() -> bool:
                snap = poller.latest
                return (
                    snap is not None
                    and poller.snapshots > 0
                    and sum((tj.get("status") or {}).get("phase") in FINAL for tj in snap.objects["TrainingJob"])
                    == JOBS
                )

            try:
                wait_for(f"all {JOBS} TrainingJobs final", all_final, FINISH_TIMEOUT_S, interval=0.5)
            except pytest.fail.Exception:
                stuck = [
                    f"{tj['metadata']['name']}: {tj.get('status')}"
                    for tj in client.list("TrainingJob", ns)
                    if (tj.get("status") or {}).get("phase") not in FINAL
                ]
                pytest.fail(
                    f"seed {seed}: {len(stuck)} TrainingJobs stuck:\n" + "\n".join(stuck)
                    + f"\nJobs: {[j['metadata']['name'] for j in client.list('Job', ns)]}"
                    + f"\noperator log {operator.log_path}:\n{operator.tail()}"
                )  # fmt: skip
            after_last = time.monotonic() - last_restart
            time.sleep(2)  # let a duplicate that is on its way land before the audit log is read
            poller.poll_once()
        wall = time.monotonic() - started
        assert operator.alive(), f"the last operator exited; log {operator.log_path}"

        # Every job ended the way the KWOK path ends, after one attempt.
        tjs = {tj["metadata"]["name"]: tj for tj in client.list("TrainingJob", ns)}
        assert sorted(tjs) == names
        for name, tj in tjs.items():
            st = tj["status"]
            conditions = {c["type"]: c["status"] for c in st["conditions"]}
            assert (st["phase"], st["reason"], st["attempt"]) == ("Failed", "ValidatorError", 1), (name, st)
            assert NO_VERDICT in st["message"], (name, st)
            assert conditions.get("Created") == "True" and conditions.get("Trained") == "True", (name, conditions)

        # The Jobs left: one worker Job of attempt 1 and one validator per TrainingJob, each controlled by it.
        jobs = {j["metadata"]["name"]: j for j in client.list("Job", ns)}
        assert sorted(jobs) == sorted([f"{n}-a1" for n in names] + [f"{n}-validate" for n in names])
        for job_name, job in jobs.items():
            owner = next(r for r in job["metadata"]["ownerReferences"] if r.get("controller"))
            tj_name = job_name.rsplit("-", 1)[0]
            assert (owner["kind"], owner["name"], owner["uid"]) == (
                "TrainingJob",
                tj_name,
                tjs[tj_name]["metadata"]["uid"],
            ), job_name

        # Never a second one: every uid the poller saw, and every creation the API server answered.
        seen_twice = {key: uids for key, uids in poller.uids.items() if len(uids) > 1}
        assert not seen_twice, f"seed {seed}: objects seen with more than one uid: {seen_twice}"
        events = audit.events(mark, ns)
        operator_events = [e for e in events if is_operator(e)]
        created_by_operator = creations(operator_events)
        twice = {key: n for key, n in created_by_operator.items() if n > 1}
        assert not twice, f"seed {seed}: created more than once: {twice}"
        # Each Job left was created by the operator (answered 201, or stored although a kill cut the answer off).
        attempted = {name for (resource, name) in creations(operator_events, cut_off=True) if resource == "jobs"}
        assert attempted == set(jobs), sorted(attempted ^ set(jobs))
        assert not deletions(events, "jobs"), f"seed {seed}: Jobs deleted: {deletions(events, 'jobs')}"
        # Jobs are applied only when the cache has none: an apply that found one (200) means a restarted operator
        # did not see a Job it had created, which would be a duplicate had that Job been deleted meanwhile.
        reapplied = [
            e["objectRef"]["name"]
            for e in events
            if is_operator(e) and e["verb"] == "patch" and e["objectRef"]["resource"] == "jobs" and code(e) == 200
        ]
        assert not reapplied, f"seed {seed}: Jobs applied again although they existed: {reapplied}"
        assert not invariants.violations, f"seed {seed}: " + "\n".join(invariants.violations[:20])

        writes = Counter(e["verb"] for e in events if is_operator(e) and e.get("verb") != "watch")
        # Requests the API server saw the operator drop mid-flight (504, "context canceled"): kills inside a pass.
        cut_off = Counter(
            f"{e['verb']} {e['objectRef']['resource']}" for e in events if is_operator(e) and code(e) == 504
        )
        failed_passes = operator.log_lines("pass failed")
        log(
            f"[figure] {JOBS} TrainingJobs, {KILLS} SIGKILLs (seed {seed}), {operator.starts} operator starts: "
            f"all final {after_last:.1f}s after the last restart, {wall:.0f}s wall; at most "
            f"{invariants.max_active} admitted at once (limit {LIMIT}); operator requests {dict(writes)}; "
            f"{sum(cut_off.values())} requests cut off by the kills {dict(cut_off)}; "
            f"{len(failed_passes)} failed passes in its log; {poller.snapshots} snapshots checked"
        )
        for line in failed_passes[:10]:
            log(f"  operator log: {line}")
    finally:
        operator.stop()
