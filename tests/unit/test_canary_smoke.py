"""spec.rollout.smokeTraffic: the API rules, the smoke Job and canary Service builders, which step's Job the
decision asks for, the reconciler's create/delete actions, and the embedded client run on this host against a
local HTTP server (what the Job's pod runs, with the same environment)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from flownexus.api.modeldeployment import MAX_NAME_LENGTH, ModelDeploymentSpec, ModelDeploymentStatus
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.modeldeployment import pod as pod_scripts
from flownexus.modeldeployment.children import (
    MD_LABEL,
    SMOKE_LABEL,
    SMOKE_SLACK_S,
    SMOKE_TTL_S,
    TRACK_LABEL,
    ServingContext,
    build_canary_service,
    build_network_policy,
    build_smoke_job,
    serving_template,
    smoke_duration_s,
    smoke_job_name,
)
from flownexus.modeldeployment.decide import DeploymentView, Measurement, Observed, Plan, Source, decide, now_str
from flownexus.modeldeployment.reconciler import actions, smoke_actions
from flownexus.prometheus import NoData
from flownexus.runtime.controller import Action, Apply, Delete, Emit, InvalidSpec, parse_spec
from tests.factories import model_deployment, neural_cluster

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
BODY = '{"inputs": [[0, 1, 2, 3]]}'
SMOKE = {"requestsPerSecond": 5, "request": BODY}
V1 = Source(version="1.0.0", archive="default/digits/digits.mar", training_job="digits")
V2 = Source(version="2.0.0", archive="default/digits-v2/digits.mar", training_job="digits-v2")
READY = DeploymentView(replicas=2, ready=2, version="1.0.0", rolled_out=True)
CANARY_READY = DeploymentView(replicas=1, ready=1, version="2.0.0", rolled_out=True)
GOOD = Measurement(error_rate=0.0, latency_p99_ms=10.0)
BAD = Measurement(error_rate=0.5, latency_p99_ms=10.0)
EMPTY = Measurement(error_rate=NoData("no series"), latency_p99_ms=NoData("no series"))


def manifest(version: str = "2.0.0", smoke: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    obj = model_deployment(
        **{
            "spec.model": {"trainingJobRef": {"name": "digits-v2"}, "version": version},
            "spec.rollout.interval": "1m",
            "spec.rollout.steps": [10, 50],
            **({"spec.rollout.smokeTraffic": smoke} if smoke is not None else {}),
            **overrides,
        }
    )
    obj["metadata"].update(uid="uid-1", generation=1)
    return obj


def ctx_of(obj: dict[str, Any]) -> ServingContext:
    return ServingContext(
        owner=obj,
        spec=ModelDeploymentSpec.model_validate(obj["spec"]),
        cluster=NeuralClusterSpec.model_validate(neural_cluster()["spec"]),
        artifact_claim="demo-artifacts",
    )


def ctx(smoke: dict[str, Any] | None = SMOKE, **overrides: Any) -> ServingContext:
    return ctx_of(manifest(smoke=smoke, **overrides))


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def env(job: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod_spec(job)["containers"][0]["env"]}


# ---- the API ----------------------------------------------------------------------------------------


def test_smoke_traffic_defaults_to_2_requests_per_second_expecting_200() -> None:
    smoke = ctx({"request": BODY}).spec.rollout.smoke_traffic
    assert smoke is not None and (smoke.requests_per_second, smoke.expect_status) == (2, 200)
    assert ctx(None).spec.rollout.smoke_traffic is None


@pytest.mark.parametrize(
    ("smoke", "field", "words"),
    [
        ({"request": "{not json"}, "spec.rollout.smokeTraffic", "request: must be a JSON document"),
        ({"request": "[1, 2"}, "spec.rollout.smokeTraffic", "request: must be a JSON document"),
        ({"request": ""}, "spec.rollout.smokeTraffic.request", "at least 1 character"),
        ({"request": "[" + "0," * 9000 + "0]"}, "spec.rollout.smokeTraffic.request", "at most 16384 characters"),
        (
            {"request": BODY, "requestsPerSecond": 0},
            "spec.rollout.smokeTraffic.requestsPerSecond",
            "greater than or equal to 1",
        ),
        (
            {"request": BODY, "requestsPerSecond": 51},
            "spec.rollout.smokeTraffic.requestsPerSecond",
            "less than or equal to 50",
        ),
        (
            {"request": BODY, "expectStatus": 99},
            "spec.rollout.smokeTraffic.expectStatus",
            "greater than or equal to 100",
        ),
        ({"requestsPerSecond": 3}, "spec.rollout.smokeTraffic.request", "required"),
    ],
)
def test_the_operator_refuses_a_smoke_request_that_is_not_json_or_out_of_range(
    smoke: dict[str, Any], field: str, words: str
) -> None:
    """The API server checks lengths and ranges (the CRD), not JSON (Kubernetes' CEL cannot parse it): the
    operator's validation does, and its message names the field."""
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(ModelDeploymentSpec, manifest(smoke=smoke))
    line = next(line for line in caught.value.lines if line.startswith(field))
    assert words in line, caught.value.lines


@pytest.mark.parametrize("body", ['{"inputs": [[1, 2]]}', "[1, 2, 3]", '"text"', "42", "null"])
def test_any_json_document_is_a_valid_smoke_request(body: str) -> None:
    assert parse_spec(ModelDeploymentSpec, manifest(smoke={"request": body})).rollout.smoke_traffic.request == body


# ---- the builders -----------------------------------------------------------------------------------


def test_smoke_job_is_pod_security_restricted_and_holds_no_api_token() -> None:
    job = build_smoke_job(ctx(), "2.0.0@abcdef1", 0, 300)
    spec = pod_spec(job)
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = spec["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert not any("hostPath" in v for v in spec.get("volumes", []))
    assert "hostNetwork" not in spec and "hostPID" not in spec
    assert container["image"] == NeuralClusterSpec.model_validate(neural_cluster()["spec"]).images.server
    assert container["command"][:2] == ["python", "-c"] and container["command"][2] == pod_scripts.source("smoke")


def test_smoke_pods_carry_no_label_a_service_pdb_or_policy_of_the_deployment_selects() -> None:
    """The Service, PDB and NetworkPolicy select ``flownexus.io/modeldeployment``: the smoke pods must not carry it
    (they would join the endpoints, count in the budget, and lose their egress)."""
    job = build_smoke_job(ctx(), "2.0.0", 1, 300)
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert MD_LABEL not in labels and TRACK_LABEL not in labels
    assert labels[SMOKE_LABEL] == "digits"
    # The Job object itself is an ordinary child: owned, labelled, found in the cache.
    assert job["metadata"]["labels"][MD_LABEL] == "digits"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert job["metadata"]["annotations"]["flownexus.io/revision"] == "2.0.0"


@pytest.mark.parametrize(
    ("smoke", "step", "duration", "rps", "expect"),
    [
        ({"request": BODY}, 0, 120, "2", "200"),
        ({"request": BODY, "requestsPerSecond": 50, "expectStatus": 201}, 1, 600, "50", "201"),
        ({"request": "[1]", "requestsPerSecond": 1}, 9, 45, "1", "200"),
    ],
)
def test_smoke_job_sends_the_configured_body_rate_and_status_to_the_canary_service_for_the_step(
    smoke: dict[str, Any], step: int, duration: int, rps: str, expect: str
) -> None:
    job = build_smoke_job(ctx(smoke), "2.0.0", step, duration)
    assert job["metadata"]["name"] == f"digits-smoke-s{step}"
    assert job["spec"]["activeDeadlineSeconds"] == duration + SMOKE_SLACK_S
    assert job["spec"]["ttlSecondsAfterFinished"] == SMOKE_TTL_S and job["spec"]["backoffLimit"] == 0
    e = env(job)
    assert e["FLOWNEXUS_SMOKE_URL"] == "http://digits-canary.default.svc:8080/predictions/digits"
    assert (e["FLOWNEXUS_SMOKE_RPS"], e["FLOWNEXUS_SMOKE_DURATION_S"]) == (rps, str(duration))
    assert e["FLOWNEXUS_SMOKE_EXPECT_STATUS"] == expect and e["FLOWNEXUS_SMOKE_BODY"] == smoke["request"]


@pytest.mark.parametrize("secret", [None, "digits-token"])
def test_smoke_job_sends_the_inference_token_only_when_the_api_needs_one(secret: str | None) -> None:
    overrides: dict[str, Any] = {"spec.serving.inferenceTokenSecret": secret}
    job = build_smoke_job(ctx(SMOKE, **overrides), "2.0.0", 0, 60)
    spec, e = pod_spec(job), env(job)
    if secret is None:
        assert "volumes" not in spec and "FLOWNEXUS_TOKEN_FILE" not in e
        return
    assert spec["volumes"] == [
        {"name": "inference-token", "secret": {"secretName": secret, "items": [{"key": "key", "path": "key"}]}}
    ]
    mount = spec["containers"][0]["volumeMounts"][0]
    assert mount["readOnly"] is True and e["FLOWNEXUS_TOKEN_FILE"] == f"{mount['mountPath']}/key"


def test_smoke_job_names_fit_a_label_value_for_the_longest_deployment_name_and_step() -> None:
    name = "d" * MAX_NAME_LENGTH
    many: dict[str, Any] = {"spec.rollout.steps": list(range(1, 101))}
    obj = manifest(smoke=SMOKE, **many)
    obj["metadata"]["name"] = name
    job = build_smoke_job(ctx_of(obj), "2.0.0", 99, 60)
    assert job["metadata"]["name"] == smoke_job_name(name, 99) and len(smoke_job_name(name, 99)) <= 63


def test_canary_service_selects_only_the_canary_pods_on_the_inference_port() -> None:
    svc = build_canary_service(ctx())
    assert svc["metadata"]["name"] == "digits-canary"
    assert svc["spec"]["selector"] == {MD_LABEL: "digits", TRACK_LABEL: "canary"}
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "inference", "protocol": "TCP"}]


PEER = {"namespaceSelector": {"matchLabels": {"team": "web"}}}


@pytest.mark.parametrize(
    ("allowed", "smoke", "peers"),
    [
        (None, SMOKE, [{"podSelector": {}}]),  # the whole namespace admits the smoke pods already
        ([PEER], None, [PEER]),
        ([PEER], SMOKE, [PEER, {"podSelector": {"matchLabels": {SMOKE_LABEL: "digits"}}}]),
    ],
)
def test_network_policy_admits_the_smoke_pods_when_allowed_from_restricts_the_inference_port(
    allowed: list[dict[str, Any]] | None, smoke: dict[str, Any] | None, peers: list[dict[str, Any]]
) -> None:
    policy = build_network_policy(ctx(smoke, **{"spec.serving.allowedFrom": allowed}))
    assert policy["spec"]["ingress"][0]["from"] == peers


@pytest.mark.parametrize(
    ("rollout", "seconds"),
    [
        ({}, 5 * 60 + 60 * 4),  # noDataTimeout 5m + (3 failed checks + the passing one) x 1m
        ({"interval": "30s", "noDataTimeout": "1m", "failedChecksBeforeRollback": 1}, 60 + 30 * 2),
        ({"interval": "1h"}, 300 + 3600 * 4),
    ],
)
def test_smoke_duration_covers_the_longest_a_step_can_last_unpaused(rollout: dict[str, Any], seconds: int) -> None:
    spec = ctx(**{f"spec.rollout.{k}": v for k, v in rollout.items()}).spec
    assert smoke_duration_s(spec) == seconds


# ---- the decision: which step's Job -----------------------------------------------------------------


def spec_of(smoke: dict[str, Any] | None = SMOKE, **overrides: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(manifest(smoke=smoke, **overrides)["spec"])


def available() -> ModelDeploymentStatus:
    return ModelDeploymentStatus.model_validate(
        {"phase": "Available", "stable": {"version": "1.0.0", "trainingJob": "digits", "archive": V1.archive}}
    )


def run(smoke: dict[str, Any] | None, script: list[tuple[str, Any]]) -> list[tuple[str | None, int | None]]:
    """Drive decide() through ``script`` (one pass per entry) and return (phase, smoke_step) after each."""
    st, now = available(), T0
    out: list[tuple[str | None, int | None]] = []
    for what, arg in script:
        spec = spec_of(smoke, **({"spec.rollout.paused": True} if what == "pause" else {}))
        if what == "abort":
            spec = spec_of(smoke, **{"spec.rollout.action": {"name": "abort", "id": "a1"}})
        now += timedelta(minutes=1, seconds=1)
        measurement = arg if isinstance(arg, Measurement) else None
        stable = READY if st.stable is None or st.stable.version == "1.0.0" else replace_version(READY, "2.0.0")
        canary = None if what == "start" else CANARY_READY
        obs = Observed(now=now, source=V2, stable=stable, canary=canary, measurement=measurement)
        plan: Plan = decide(spec, st, obs, 1)
        st = plan.status
        out.append((st.phase, plan.smoke_step))
    return out


def replace_version(view: DeploymentView, version: str) -> DeploymentView:
    return DeploymentView(view.replicas, view.ready, version, view.rolled_out)


@pytest.mark.parametrize(
    ("smoke", "script", "expected"),
    [
        (  # one Job per step; promotion ends them
            SMOKE,
            [("start", None), ("analyse", GOOD), ("analyse", GOOD), ("promoted", None)],
            [("Canary", 0), ("Canary", 1), ("Promoting", None), ("Available", None)],
        ),
        (  # failed checks and NoData keep the step (and its Job); the rollback ends it
            SMOKE,
            [("start", None), ("analyse", EMPTY), ("analyse", BAD), ("analyse", BAD), ("analyse", BAD)],
            [("Canary", 0), ("Canary", 0), ("Canary", 0), ("Canary", 0), ("RolledBack", None)],
        ),
        (  # a pause holds the step without traffic; resuming brings its Job back
            SMOKE,
            [("start", None), ("pause", None), ("resume", None), ("analyse", GOOD)],
            [("Canary", 0), ("Canary", None), ("Canary", 0), ("Canary", 1)],
        ),
        (  # an abort ends it
            SMOKE,
            [("start", None), ("abort", None)],
            [("Canary", 0), ("RolledBack", None)],
        ),
        (  # without spec.rollout.smokeTraffic: never a Job
            None,
            [("start", None), ("analyse", GOOD), ("analyse", GOOD)],
            [("Canary", None), ("Canary", None), ("Promoting", None)],
        ),
    ],
)
def test_the_decision_asks_for_the_current_steps_smoke_job_only_while_the_canary_is_analysed(
    smoke: dict[str, Any] | None, script: list[tuple[str, Any]], expected: list[tuple[str, int | None]]
) -> None:
    assert run(smoke, script) == expected


# ---- the reconciler: create once per step, delete the rest ------------------------------------------


def canary_status(step: int, phase: str = "Canary", revision: str = "2.0.0@abc1234") -> ModelDeploymentStatus:
    return ModelDeploymentStatus.model_validate(
        {
            "phase": phase,
            "stable": {"version": "1.0.0", "archive": V1.archive},
            "canary": {"version": "2.0.0", "archive": V2.archive, "revision": revision, "weight": [10, 50][step],
                       "step": step, "failedChecks": 0, "stepStartedAt": now_str(T0)},
        }
    )  # fmt: skip


def summary(todo: list[Action]) -> list[tuple[str, str]]:
    out = []
    for a in todo:
        if isinstance(a, Apply):
            kind = a.manifest["kind"] + (" (create only)" if a.create_only else "")
            out.append((f"Apply {kind}", str(a.manifest["metadata"]["name"])))
        elif isinstance(a, Delete):
            out.append((f"Delete {a.kind}", a.name))
        elif isinstance(a, Emit):
            out.append(("Emit", a.reason))
    return out


REV = "2.0.0@abc1234"


@pytest.mark.parametrize(
    ("step", "existing", "expected"),
    [
        (  # the step starts: its Job, the canary Service it targets, one Event
            0,
            {},
            [("Apply Service", "digits-canary"), ("Apply Job (create only)", "digits-smoke-s0"),
             ("Emit", "SmokeTraffic")],
        ),
        (  # the next step: the earlier step's Job goes, the new one comes
            1,
            {"digits-smoke-s0": REV},
            [("Delete Job", "digits-smoke-s0"), ("Apply Service", "digits-canary"),
             ("Apply Job (create only)", "digits-smoke-s1"), ("Emit", "SmokeTraffic")],
        ),
        (  # the step's Job runs: nothing to create, no second Event
            1,
            {"digits-smoke-s1": REV},
            [("Apply Service", "digits-canary")],
        ),
        (  # a Job of that name made for a previous canary goes; the pass its deletion brings creates the new one
            0,
            {"digits-smoke-s0": "1.5.0@0000000"},
            [("Delete Job", "digits-smoke-s0"), ("Apply Service", "digits-canary")],
        ),
    ],
)  # fmt: skip
def test_smoke_actions_create_the_steps_job_once_and_delete_every_other(
    step: int, existing: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    c = ctx()
    plan = Plan(status=canary_status(step), smoke_step=step)
    assert summary(smoke_actions(c, plan, existing)) == expected


@pytest.mark.parametrize("phase", ["Promoting", "Available", "RolledBack"])
def test_every_smoke_job_goes_when_the_canary_is_no_longer_analysed(phase: str) -> None:
    plan = Plan(status=canary_status(1, phase=phase), smoke_step=None)
    todo = smoke_actions(ctx(), plan, {"digits-smoke-s0": REV, "digits-smoke-s1": REV})
    assert summary(todo) == [("Delete Job", "digits-smoke-s0"), ("Delete Job", "digits-smoke-s1")]


def test_smoke_actions_come_after_the_rollback_runbook() -> None:
    """The runbook (traffic to stable, the Event, canary to zero) is not delayed by the smoke Jobs' deletion."""
    c = ctx()
    spec = c.spec
    st = canary_status(0)
    st.canary.failed_checks = 2  # type: ignore[union-attr]
    obs = Observed(now=T0 + timedelta(minutes=1, seconds=1), source=V2, stable=READY, canary=CANARY_READY,
                   measurement=BAD)  # fmt: skip
    plan = decide(spec, st, obs, 1)
    assert plan.status.phase == "RolledBack" and plan.smoke_step is None
    steps = summary(actions(c, plan, obs, {"digits-smoke-s0": REV}))
    assert steps[-2:] == [("Emit", "RolledBack"), ("Delete Job", "digits-smoke-s0")]


def test_the_smoke_job_is_built_from_the_canarys_template_and_revision() -> None:
    """The canary's recorded template decides the image and the token (the pods it calls run that template)."""
    c = ctx()
    st = canary_status(0)
    assert st.canary is not None
    template = serving_template(c.spec, c.cluster)
    st.canary.template = template.model_copy(
        update={"server_image": "registry.example/serve:canary", "inference_token_secret": "canary-token"}
    )
    job = next(
        a.manifest for a in smoke_actions(c, Plan(status=st, smoke_step=0), {}) if isinstance(a, Apply)
        and a.manifest["kind"] == "Job"
    )  # fmt: skip
    assert pod_spec(job)["containers"][0]["image"] == "registry.example/serve:canary"
    assert pod_spec(job)["volumes"][0]["secret"]["secretName"] == "canary-token"
    assert job["metadata"]["annotations"]["flownexus.io/revision"] == REV


# ---- the client, run on this host ------------------------------------------------------------------


class Recorder(BaseHTTPRequestHandler):
    """Answers every POST with ``status``; records path, body and Authorization."""

    status = 200
    seen: list[tuple[str, bytes, str | None]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append((self.path, body, self.headers.get("Authorization")))
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[ThreadingHTTPServer, type[Recorder]]]:
    handler = type("Handler", (Recorder,), {"seen": [], "status": 200})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def run_client(job: dict[str, Any], url: str, token: Path | None = None) -> tuple[int, list[dict[str, Any]], str]:
    """The Job's container command with the Job's environment, the URL pointed at 127.0.0.1."""
    e = env(job)
    e["FLOWNEXUS_SMOKE_URL"] = url
    if token is not None:
        e["FLOWNEXUS_TOKEN_FILE"] = str(token)
    command = [sys.executable, *pod_spec(job)["containers"][0]["command"][1:]]
    done = subprocess.run(command, env={**os.environ, **e}, capture_output=True, text=True, timeout=60, check=False)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, reports, done.stderr


@pytest.mark.parametrize(("answer", "token"), [(200, False), (503, False), (200, True)])
def test_the_client_sends_about_rate_times_duration_posts_with_the_body_and_exits_0_whatever_the_answers(
    server: tuple[ThreadingHTTPServer, type[Recorder]], tmp_path: Path, answer: int, token: bool
) -> None:
    httpd, handler = server
    handler.status = answer
    smoke = {"request": BODY, "requestsPerSecond": 20}
    job = build_smoke_job(ctx(smoke, **({"spec.serving.inferenceTokenSecret": "t"} if token else {})), "2.0.0", 0, 2)
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    url = f"http://127.0.0.1:{httpd.server_address[1]}/predictions/digits"
    code, reports, stderr = run_client(job, url, secret if token else None)
    assert code == 0, stderr
    final = reports[-1]
    assert final["final"] is True and final["sent"] == 40  # 20/s x 2 s
    assert final["answers"] == {str(answer): 40}
    assert final["expected"] == (40 if answer == 200 else 0) and final["expectStatus"] == 200
    assert len(handler.seen) == 40
    assert all(path == "/predictions/digits" and body == BODY.encode() for path, body, _ in handler.seen)
    assert {auth for _, _, auth in handler.seen} == {"Bearer s3cret" if token else None}


def test_the_client_counts_refused_connections_and_still_exits_0() -> None:
    """No canary pod ready yet (no endpoints): every request fails to connect, which the analysis never sees."""
    job = build_smoke_job(ctx({"request": BODY, "requestsPerSecond": 10}), "2.0.0", 0, 1)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, reports, stderr = run_client(job, f"http://127.0.0.1:{port}/predictions/digits")
    assert code == 0, stderr
    assert reports[-1]["sent"] == 10 and reports[-1]["expected"] == 0
    assert reports[-1]["answers"] == {"error:ConnectionRefusedError": 10}


def test_the_client_refuses_a_configuration_it_cannot_use() -> None:
    job = build_smoke_job(ctx(), "2.0.0", 0, 1)
    e = {**env(job), "FLOWNEXUS_SMOKE_RPS": "fast"}
    command = [sys.executable, *pod_spec(job)["containers"][0]["command"][1:]]
    done = subprocess.run(command, env={**os.environ, **e}, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "bad configuration" in done.stderr
