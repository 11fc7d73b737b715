"""The trainer can write only its progress, and only from rank 0: the chart's ValidatingAdmissionPolicy
(generated into policies/) enforced by a real API server, tested with real ServiceAccount tokens bound to
the worker pods, sent by the trainer's own status sink."""

from __future__ import annotations

import json
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.factories import neural_cluster, training_job
from tests.realapi.conftest import REPO, Harness

from flownexus_trainer.progress import EpochMetrics, KubeStatusSink, Progress

pytestmark = pytest.mark.realapi
POLICY_FILE = REPO / "policies" / "trainer-status.yaml"
ADMISSION = "/apis/admissionregistration.k8s.io/v1"


PLURALS = {
    "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
    "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings",
    "MutatingAdmissionPolicy": "mutatingadmissionpolicies",
    "MutatingAdmissionPolicyBinding": "mutatingadmissionpolicybindings",
}


def _install_policy(h: Harness) -> None:
    for obj in yaml.safe_load_all(POLICY_FILE.read_text()):
        plural = PLURALS[obj["kind"]]
        present = h.user.request("GET", f"{ADMISSION}/{plural}")["items"]
        if any(i["metadata"]["name"] == obj["metadata"]["name"] for i in present):
            continue  # the control plane is shared by the tests of a session
        h.user.request("POST", f"{ADMISSION}/{plural}", body=obj)


def _pod(h: Harness, name: str) -> dict[str, Any]:
    spec = {
        "serviceAccountName": "digits-trainer",
        "automountServiceAccountToken": False,
        "containers": [{"name": "trainer", "image": "trainer"}],
    }
    return h.user.request("POST", f"/api/v1/namespaces/{h.ns}/pods", body={"metadata": {"name": name}, "spec": spec})


def _token_file(h: Harness, pod: dict[str, Any], tmp: Path) -> Path:
    """A token of the trainer's ServiceAccount bound to ``pod``, as the kubelet projects it."""
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 600,
                 "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"],
                                    "uid": pod["metadata"]["uid"]}},
    }  # fmt: skip
    answer = h.user.request("POST", f"/api/v1/namespaces/{h.ns}/serviceaccounts/digits-trainer/token", body=request)
    path = tmp / pod["metadata"]["name"]
    path.write_text(answer["status"]["token"])
    return path


def _sink(h: Harness, token: Path, name: str = "digits") -> KubeStatusSink:
    return KubeStatusSink(
        h.ns, name, host=h.plane.server, token_path=token, ca_path=h.plane.root / "pki" / "ca.crt", min_interval_s=0
    )


def _refused(sink: KubeStatusSink, status: dict[str, Any]) -> tuple[int, str]:
    try:
        sink._patch({"status": status})
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()).get("message", "")
    return 200, ""


EPOCH = EpochMetrics(
    epoch=3, total_epochs=10, loss=0.4, val_loss=0.5, learning_rate=1e-3, grad_norm=0.2, samples_per_second=900
)


@pytest.fixture
def trainer(harness: Harness, tmp_path: Path) -> tuple[Harness, KubeStatusSink, KubeStatusSink]:
    """A TrainingJob whose first attempt exists, and the sinks of its rank 0 and rank 1 pods."""
    h = harness
    _install_policy(h)
    h.ready_cluster(neural_cluster())
    h.create(training_job("digits", **{"spec.distributed.workers": 2}))
    h.reconcile("TrainingJob", "digits")  # the trainer's ServiceAccount, Role, RoleBinding and attempt 1
    rank0 = _sink(h, _token_file(h, _pod(h, "digits-a1-0-x7k2p"), tmp_path))
    rank1 = _sink(h, _token_file(h, _pod(h, "digits-a1-1-q9z4m"), tmp_path))
    # The policy is in force once the API server has compiled it: a forbidden write tells.
    deadline = time.monotonic() + 30
    while _refused(rank0, {"phase": "Succeeded"})[0] == 200:
        assert time.monotonic() < deadline, "the policy never took effect"
        h.set_status("TrainingJob", "digits", {"phase": "Created"})
        time.sleep(0.5)
    return h, rank0, rank1


def test_rank_0_reports_progress_with_its_own_token(trainer: tuple[Harness, KubeStatusSink, KubeStatusSink]) -> None:
    h, rank0, _ = trainer
    rank0._patch(Progress("Running", 3, 10, metrics=EPOCH, best={"epoch": 3, "valLoss": 0.5}).status_patch(1))
    status = h.get("TrainingJob", "digits")["status"]
    assert status["progress"]["epoch"] == 3 and status["bestMetrics"]["epoch"] == 3
    assert status["phase"] == "Created"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("phase", "Succeeded"),
        (
            "conditions",
            [
                {
                    "type": "Validated",
                    "status": "True",
                    "reason": "ThresholdsMet",
                    "message": "",
                    "lastTransitionTime": "2026-12-01T00:00:00Z",
                }
            ],
        ),
        ("artifacts", {"modelArchive": "other-team/model-store/stolen.mar"}),
        ("validation", {"passed": True, "accuracy": 0.99}),
        ("attempt", 7),
    ],
)
def test_the_trainers_token_cannot_write_what_the_operator_owns(
    trainer: tuple[Harness, KubeStatusSink, KubeStatusSink], field: str, value: Any
) -> None:
    h, rank0, _ = trainer
    before = h.get("TrainingJob", "digits")["status"]
    code, message = _refused(rank0, {field: value, "progress": EPOCH.status_json(1)})
    assert code == 403 and f"status.{field} is the operator's" in message, (code, message)
    assert h.get("TrainingJob", "digits")["status"] == before


def test_other_ranks_tokens_cannot_write_at_all(trainer: tuple[Harness, KubeStatusSink, KubeStatusSink]) -> None:
    _, _, rank1 = trainer
    code, message = _refused(rank1, {"progress": EPOCH.status_json(1)})
    assert code == 403 and "only rank 0 of TrainingJob digits" in message and "digits-a1-1-q9z4m" in message


def test_the_trainers_token_cannot_touch_another_trainingjob(
    trainer: tuple[Harness, KubeStatusSink, KubeStatusSink],
) -> None:
    h, rank0, _ = trainer
    h.create(training_job("other"))
    token = rank0.token_path
    code, _ = _refused(_sink(h, token, "other"), {"progress": EPOCH.status_json(1)})
    assert code == 403  # RBAC: the Role names one TrainingJob


def test_the_operator_is_not_constrained_by_the_policy(trainer: tuple[Harness, KubeStatusSink, KubeStatusSink]) -> None:
    h, _, _ = trainer
    h.job_running("digits-a1")
    h.reconcile("TrainingJob", "digits")
    assert h.get("TrainingJob", "digits")["status"]["phase"] == "Running"


def _worker_pod(h: Harness, index: int, role: str = "worker") -> dict[str, Any]:
    """A pod as the Job controller creates it for completion index ``index`` of attempt 1."""
    labels = {"flownexus.io/trainingjob": "digits", "flownexus.io/role": role,
              "batch.kubernetes.io/job-completion-index": str(index)}  # fmt: skip
    spec = {
        "serviceAccountName": "digits-trainer",
        "containers": [{"name": "trainer", "image": "trainer",
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/flownexus"}]}],
        "volumes": [{"name": "config", "emptyDir": {}}],
    }  # fmt: skip
    body = {"metadata": {"name": f"digits-a1-{index}-{role[:3]}", "labels": labels}, "spec": spec}
    return h.user.request("POST", f"/api/v1/namespaces/{h.ns}/pods", body=body)


def _token_mounted(pod: dict[str, Any]) -> bool:
    volumes = [v["name"] for v in pod["spec"].get("volumes") or []]
    mounts = [m["name"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts") or []]
    return any(v.startswith("kube-api-access-") for v in volumes + mounts)


def test_only_rank_0s_pod_gets_a_serviceaccount_token(
    trainer: tuple[Harness, KubeStatusSink, KubeStatusSink],
) -> None:
    h, _, _ = trainer
    rank0, rank1, rank2 = (_worker_pod(h, i) for i in range(3))
    assert _token_mounted(rank0)
    for pod in (rank1, rank2):
        assert not _token_mounted(pod) and pod["spec"]["automountServiceAccountToken"] is False
        assert [m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]] == ["config"]  # the rest stays
    # Pods that are not a TrainingJob's workers are left alone (the validator mounts no token by itself).
    assert _token_mounted(_worker_pod(h, 1, role="validator"))
