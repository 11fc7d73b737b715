"""The pure parts of `kubectl flownexus` (flownexus.cli): targets, the merge patches it writes (checked against the
API types), the tables and details it prints, the prediction body and the choice of pod. The commands against a
real API server are in tests/realapi/test_kubectl_plugin.py."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from flownexus.api.modeldeployment import ModelDeploymentSpec
from flownexus.api.trainingjob import RunPolicy
from flownexus.cli import (
    Endpoint,
    Target,
    UsageError,
    action_patch,
    age,
    api_error,
    handled,
    md_details,
    md_history,
    md_row,
    new_action_id,
    parse_target,
    pause_patch,
    pick_endpoint,
    post_over,
    prediction_body,
    prediction_headers,
    ready_endpoints,
    require_kind,
    run,
    table,
    tj_details,
    tj_history,
    tj_row,
    validation_verdict,
)
from flownexus.modeldeployment.decide import decide
from tests.factories import model_deployment
from tests.unit.test_canary import T0, in_canary, obs, spec

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def md_object(status: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    obj = model_deployment(**{"spec.rollout.steps": [10, 50, 100], **overrides})
    obj["metadata"].update(namespace="default", creationTimestamp="2026-12-02T11:00:00Z", generation=4)
    if status is not None:
        obj["status"] = status
    return obj


def canary_status() -> dict[str, Any]:
    st = in_canary(step=1, failed=1)
    st.canary.weight = 50  # type: ignore[union-attr]
    st.reason, st.message = "AnalysisFailed", "check failed (1/3): p99 latency 250.0 ms > 100.0 ms"
    wire: dict[str, Any] = st.model_dump(by_alias=True, exclude_none=True, mode="json")
    return wire


def action_spec(name: str, action_id: str) -> ModelDeploymentSpec:
    """A spec with the rollout action that action_patch writes merged in."""
    overrides: dict[str, Any] = {"spec.rollout.action": action_patch(name, action_id)["spec"]["rollout"]["action"]}
    return spec(**overrides)


def details(text: str) -> dict[str, str]:
    """``Key:   value`` lines, with the values aligned in one column."""
    lines = text.splitlines()
    column = len(re.match(r"[^:]+:\s+", lines[0]).group(0))  # type: ignore[union-attr]
    assert all(len(line) > column and line[column - 1] == " " and line[column] != " " for line in lines), text
    return {line.split(":", 1)[0]: line[column:] for line in lines}


# ---- targets and patches -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("digits", Target("ModelDeployment", "digits")),
        ("mdep/digits", Target("ModelDeployment", "digits")),
        ("modeldeployments.flownexus.io/digits", Target("ModelDeployment", "digits")),
        ("tj/digits", Target("TrainingJob", "digits")),
        ("TrainingJob/digits", Target("TrainingJob", "digits")),
    ],
)
def test_targets_take_kubectls_kind_names(arg: str, expected: Target) -> None:
    assert parse_target(arg) == expected


@pytest.mark.parametrize(("arg", "words"), [("deploy/digits", "unknown kind 'deploy'"), ("tj/", "no name after tj/")])
def test_a_bad_target_is_named_in_the_error(arg: str, words: str) -> None:
    with pytest.raises(UsageError, match=re.escape(words)):
        parse_target(arg)


def test_promote_is_refused_for_a_trainingjob_naming_it() -> None:
    with pytest.raises(UsageError, match="promote does not apply to a TrainingJob \\(TrainingJob digits\\)"):
        require_kind(Target("TrainingJob", "digits"), ("ModelDeployment",), "promote")


def test_action_ids_are_valid_and_distinct() -> None:
    ids = {new_action_id(NOW) for _ in range(50)}
    assert len(ids) == 50
    for action_id in ids:
        assert action_id.startswith("kubectl-20261202t120000z-")
        # what the API accepts: the patch, merged into a spec, validates
        merged = action_spec("promote", action_id)
        assert merged.rollout.action is not None and merged.rollout.action.id == action_id


@pytest.mark.parametrize("name", ["promote", "abort", "retry"])
def test_the_action_patch_sets_only_spec_rollout_action(name: str) -> None:
    assert action_patch(name, "x-1") == {"spec": {"rollout": {"action": {"name": name, "id": "x-1"}}}}


def test_pause_and_resume_patch_the_field_of_each_kind() -> None:
    assert pause_patch("ModelDeployment", True) == {"spec": {"rollout": {"paused": True}}}
    assert pause_patch("ModelDeployment", False) == {"spec": {"rollout": {"paused": False}}}
    assert pause_patch("TrainingJob", True) == {"spec": {"runPolicy": {"suspend": True}}}
    # the fields exist in the API types under those names
    assert ModelDeploymentSpec.model_validate(
        {**md_object()["spec"], "rollout": pause_patch("ModelDeployment", True)["spec"]["rollout"]}
    ).rollout.paused
    assert RunPolicy.model_validate(pause_patch("TrainingJob", True)["spec"]["runPolicy"]).suspend


def test_handled_finds_the_operators_record_of_the_action() -> None:
    plan = decide(action_spec("abort", "k-1"), in_canary(), obs(), 3)
    obj = md_object(plan.status.model_dump(by_alias=True, exclude_none=True, mode="json"))
    done = handled(obj, "k-1")
    assert done is not None and done.result == "Applied" and "aborted by" in (done.message or "")
    assert handled(obj, "k-2") is None and handled(md_object(), "k-1") is None


def test_an_api_refusal_names_the_object_and_the_servers_message() -> None:
    body = '{"kind":"Status","message":"spec.rollout.action.name: Unsupported value: \\"stop\\"","code":422}'
    err = api_error("patching ModelDeployment digits in namespace default", 422, "Unprocessable Entity", body)
    assert str(err) == (
        'patching ModelDeployment digits in namespace default: 422 spec.rollout.action.name: Unsupported value: "stop"'
    )
    assert str(api_error("ModelDeployment nope in namespace default", 404, "Not Found", "")) == (
        "ModelDeployment nope in namespace default: not found"
    )


# ---- tables ------------------------------------------------------------------------------------------


def test_table_aligns_columns_like_kubectl() -> None:
    assert table(["NAME", "PHASE"], [["digits", "Canary"], ["a", "-"]]) == (
        "NAME     PHASE\ndigits   Canary\na        -"
    )


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(seconds=5), "5s"),
        (timedelta(seconds=150), "2m30s"),
        (timedelta(minutes=45), "45m"),
        (timedelta(hours=2, minutes=5), "125m"),
        (timedelta(hours=3, minutes=20), "3h20m"),
        (timedelta(hours=20), "20h"),
        (timedelta(days=3, hours=4), "3d4h"),
        (timedelta(days=9), "9d"),
    ],
)
def test_age_reads_like_kubectl(delta: timedelta, expected: str) -> None:
    assert age((NOW - delta).strftime("%Y-%m-%dT%H:%M:%SZ"), NOW) == expected


def test_age_of_no_timestamp() -> None:
    assert age(None, NOW) == "<unknown>"


def test_a_canary_row_shows_versions_weight_step_and_phase() -> None:
    obj = md_object(canary_status(), **{"spec.rollout.paused": True})
    assert md_row(obj, NOW) == ["digits", "1.0.0", "2.0.0", "50%", "2/3", "Canary", "AnalysisFailed", "yes", "60m"]


def test_a_row_shows_each_tracks_revision_when_the_operator_recorded_one() -> None:
    """Two templates of one version (a template canary) are told apart by version@templateHash."""
    st = canary_status()
    st["stable"]["revision"], st["canary"]["revision"] = "1.0.0@5c2fa2e", "1.0.0@0b1d2e3"
    row = md_row(md_object(st), NOW)
    assert row[1:3] == ["1.0.0@5c2fa2e", "1.0.0@0b1d2e3"]
    fields = details(md_details(md_object(st)))
    assert fields["Stable"].startswith("1.0.0@5c2fa2e") and fields["Canary"].startswith("1.0.0@0b1d2e3")


def test_a_row_of_a_new_deployment_is_dashes() -> None:
    assert md_row(md_object(), NOW) == ["digits", "-", "-", "-", "-", "-", "-", "no", "60m"]


def test_details_say_where_the_canary_is_and_the_last_action() -> None:
    st = canary_status()
    st["actions"] = [
        {"name": "promote", "id": "k-1", "handledAt": "2026-12-02T11:30:00Z", "result": "Ignored", "message": "why"}
    ]
    st["lastAnalysis"] = {"time": "2026-12-02T11:31:00Z", "outcome": "Failed", "message": "p99 latency 250.0 ms"}
    fields = details(md_details(md_object(st)))
    assert fields["ModelDeployment"] == "default/digits"
    assert fields["Canary"].startswith("2.0.0 (TrainingJob digits-v2), step 2/3 at 50%")
    assert fields["Canary"].endswith("failed checks 1/3")
    assert fields["Last analysis"] == "Failed at 2026-12-02T11:31:00Z: p99 latency 250.0 ms"
    assert fields["Last action"] == "promote (id k-1) Ignored at 2026-12-02T11:30:00Z: why"
    assert fields["Phase"] == "Canary (AnalysisFailed)" and fields["Paused"] == "no"


def test_details_show_an_action_the_operator_has_not_handled_yet() -> None:
    requested = md_object(canary_status(), **{"spec.rollout.action": {"name": "abort", "id": "k-2"}})
    assert details(md_details(requested))["Requested"] == "abort (id k-2): not handled by the operator yet"
    st = canary_status()
    st["actions"] = [{"name": "abort", "id": "k-2", "handledAt": "2026-12-02T11:30:00Z", "result": "Applied"}]
    done = md_object(st, **{"spec.rollout.action": {"name": "abort", "id": "k-2"}})
    assert "Requested" not in details(md_details(done))


def test_history_lists_versions_and_actions() -> None:
    plan = decide(action_spec("abort", "k-1"), in_canary(), obs(), 3)
    text = md_history(md_object(plan.status.model_dump(by_alias=True, exclude_none=True, mode="json")))
    lines = text.splitlines()
    assert lines[0].split() == ["VERSION", "TRAININGJOB", "OUTCOME", "AT", "METRICS", "REASON"]
    assert lines[1].split()[:3] == ["1.0.0", "digits", "Deployed"]
    assert lines[2].split()[:3] == ["2.0.0", "digits-v2", "RolledBack"] and "aborted by" in lines[2]
    assert "ACTION" in text and re.search(r"abort\s+k-1\s+Applied\s+" + T0.strftime("%Y-%m-%dT%H:%M:%SZ"), text)


def test_history_of_a_new_deployment() -> None:
    assert md_history(md_object()) == "No history yet."


def tj_object(status: dict[str, Any], suspend: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": "digits", "namespace": "default", "creationTimestamp": "2026-12-02T10:00:00Z"},
        "spec": {"training": {"epochs": 10}, "runPolicy": {"suspend": suspend, "maxRestarts": 2}},
        "status": status,
    }


VALIDATED = {
    "phase": "Succeeded",
    "reason": "Validated",
    "attempt": 2,
    "progress": {"epoch": 10, "totalEpochs": 10, "valAccuracy": 0.97123},
    "validation": {"passed": True, "accuracy": 0.9712, "latencyP95Ms": 12.5, "failedThresholds": []},
    "artifacts": {"modelArchive": "/artifacts/default/digits/digits.mar"},
    "conditions": [
        {"type": "Validated", "status": "True", "lastTransitionTime": "2026-12-02T10:30:00Z", "reason": "Passed"},
        {"type": "Running", "status": "False", "lastTransitionTime": "2026-12-02T10:20:00Z", "reason": "Done"},
    ],
}


def test_a_trainingjob_row_shows_attempt_epoch_and_verdict() -> None:
    assert tj_row(tj_object(VALIDATED, suspend=True), NOW) == [
        "digits", "Succeeded", "2", "10/10", "0.9712", "passed", "Validated", "yes", "120m",
    ]  # fmt: skip


def test_a_failed_verdict_names_every_failed_threshold() -> None:
    verdict = validation_verdict(
        {"passed": False, "accuracy": 0.5, "failedThresholds": ["accuracy 0.5 < 0.85", "p95 200 ms > 100 ms"]}
    )
    assert verdict == "FAILED (accuracy 0.5 < 0.85; p95 200 ms > 100 ms): accuracy 0.5"
    assert validation_verdict(None) == "not validated yet"


def test_trainingjob_details_and_history() -> None:
    fields = details(tj_details(tj_object(VALIDATED)))
    assert fields["Attempt"] == "2 (restarts allowed: 2)"
    assert fields["Validation"] == "passed: accuracy 0.9712, latencyP95Ms 12.5"
    assert fields["Model archive"] == "/artifacts/default/digits/digits.mar"
    events = [
        {"type": "Warning", "reason": "Restarting", "message": "attempt 2: worker 1 exited 137", "count": 1,
         "lastTimestamp": "2026-12-02T10:10:00Z"},
        {"type": "Normal", "reason": "Created", "message": "attempt 1", "count": 1,
         "lastTimestamp": "2026-12-02T10:00:00Z"},
    ]  # fmt: skip
    history = tj_history(tj_object(VALIDATED), events).splitlines()
    assert history[0] == "Attempts: 2" and history[1].startswith("Validation: passed")
    conditions = [line.split()[0] for line in history[4:6]]
    assert conditions == ["Running", "Validated"]  # oldest transition first
    reasons = [line.split()[2] for line in history if line.startswith("2026-12-02T10:")]
    assert reasons == ["Created", "Restarting"]  # oldest event first


# ---- predict ------------------------------------------------------------------------------------


def test_the_prediction_body_is_the_files_json() -> None:
    assert prediction_body('{"inputs": [[0, 1.5]]}', "in.json") == b'{"inputs": [[0, 1.5]]}'


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"inputs": [[0, 1.5]}', "in.json: not JSON: Expecting ',' delimiter at line 1, column 21"),
        ("3", "in.json: expected a JSON object"),
    ],
)
def test_a_bad_prediction_body_names_the_file_and_the_place(text: str, words: str) -> None:
    with pytest.raises(UsageError, match=re.escape(words)):
        prediction_body(text, "in.json")


def test_the_example_request_is_one_digits_row() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "predict-digits.json"
    body = json.loads(prediction_body(example.read_text(), str(example)))
    assert [len(row) for row in body["inputs"]] == [64]


class Echo(BaseHTTPRequestHandler):
    """A real HTTP server that answers what it received (method, path, auth header, body)."""

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        answer = json.dumps(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": json.loads(data)}
        ).encode()
        self.send_response(207)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


def test_post_over_an_open_connection_sends_the_request_and_reads_the_answer() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]))  # a port-forward stand-in
        body = prediction_body('{"inputs": [[1, 2]]}', "in.json")
        status, answer = post_over(sock, "/predictions/digits", body, prediction_headers("s3cret"))
    finally:
        server.shutdown()
        server.server_close()
    assert status == 207
    assert json.loads(answer) == {"path": "/predictions/digits", "auth": "Bearer s3cret", "body": {"inputs": [[1, 2]]}}


def test_the_bearer_token_goes_in_the_authorization_header() -> None:
    assert prediction_headers("s3cret")["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in prediction_headers(None)


SLICES = [
    {
        "endpoints": [
            {"targetRef": {"kind": "Pod", "name": "digits-stable-7d9-abcde"}, "conditions": {"ready": True}},
            {"targetRef": {"kind": "Pod", "name": "digits-stable-7d9-fghij"}, "conditions": {"ready": False}},
        ]
    },
    {"endpoints": [{"targetRef": {"kind": "Pod", "name": "digits-canary-5c4-klmno"}, "conditions": {"ready": True}}]},
]


def test_only_ready_endpoints_are_candidates() -> None:
    assert [e.pod for e in ready_endpoints(SLICES)] == ["digits-stable-7d9-abcde", "digits-canary-5c4-klmno"]


def test_a_pod_is_chosen_among_the_ready_ones_and_its_track_named() -> None:
    endpoints = ready_endpoints(SLICES)
    assert pick_endpoint(endpoints, "digits", None, lambda e: e[-1]) == Endpoint("digits-canary-5c4-klmno", "canary")
    assert pick_endpoint(endpoints, "digits", "stable", lambda e: e[-1]) == Endpoint(
        "digits-stable-7d9-abcde", "stable"
    )


def test_no_ready_pod_is_an_error_naming_the_service() -> None:
    with pytest.raises(UsageError, match="ModelDeployment digits: Service digits has no ready pod of track canary"):
        pick_endpoint(ready_endpoints(SLICES[:1]), "digits", "canary", lambda e: e[0])


# ---- the command line -----------------------------------------------------------------------------


def test_a_bad_target_exits_1_before_any_api_call(capsys: pytest.CaptureFixture[str]) -> None:
    def no_cluster(kubeconfig: str | None, context: str | None) -> Any:
        raise AssertionError("no API call expected")

    assert run(["promote", "deploy/x"], io.StringIO(), no_cluster) == 1
    assert "unknown kind 'deploy'" in capsys.readouterr().err


def test_predict_requires_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run(["predict", "digits"], io.StringIO())
    assert exit_.value.code == 2 and "-f/--filename" in capsys.readouterr().err
