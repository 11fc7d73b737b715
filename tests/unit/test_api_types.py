"""The API types: defaults from the requirements, lossless round trips, and clear rejections."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from flownexus.api import KINDS, MODEL_DEPLOYMENT, NEURAL_CLUSTER, TRAINING_JOB, Kind, modeldeployment, trainingjob
from flownexus.api.common import Check, format_validation_error, parse_quantity
from flownexus.api.modeldeployment import ModelDeploymentSpec
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.api.trainingjob import DistributedSpec, RunPolicy, TrainingJobSpec
from tests.corpus import INVALID_CASES, VALID_MANIFESTS, InvalidCase
from tests.factories import model_deployment, neural_cluster, training_job

SPEC_BY_KIND: dict[str, type[BaseModel]] = {k.kind: k.spec for k in KINDS}


def parse(manifest: dict[str, Any]) -> BaseModel:
    return SPEC_BY_KIND[manifest["kind"]].model_validate(manifest["spec"])


def test_trainingjob_defaults_match_the_requirements() -> None:
    spec = TrainingJobSpec.model_validate(training_job()["spec"])
    assert spec.training.checkpoint_every == 5
    assert spec.dataset.seed == 42
    assert spec.validation.min_accuracy == 0.85
    assert spec.validation.max_latency_p95_ms == 100
    assert spec.validation.max_overfitting_gap == 0.15
    assert spec.validation.min_margin_over_trivial == 0.05
    assert spec.validation.champion is None
    assert spec.validation.require_convergence is True
    assert spec.run_policy.suspend is False


def test_modeldeployment_defaults_match_the_requirements() -> None:
    spec = ModelDeploymentSpec.model_validate(model_deployment()["spec"])
    assert (spec.autoscaling.min_replicas, spec.autoscaling.max_replicas) == (2, 10)
    assert spec.autoscaling.target_cpu_utilization == 70
    assert spec.rollout.steps[:2] == [5, 15]
    assert all(b - a == 10 for a, b in zip(spec.rollout.steps[1:], spec.rollout.steps[2:], strict=False))
    assert spec.rollout.thresholds.max_error_rate == 0.01
    assert spec.rollout.thresholds.max_latency_p99_ms == 100
    assert spec.rollout.thresholds.window == "5m"
    assert spec.rollout.failed_checks_before_rollback == 3
    assert (spec.serving.batch_size, spec.serving.max_batch_delay_ms) == (32, 5)


@pytest.mark.parametrize("manifest", VALID_MANIFESTS, ids=lambda m: f"{m['kind']}/{m['metadata']['name']}")
def test_valid_manifests_round_trip_without_loss(manifest: dict[str, Any]) -> None:
    model = parse(manifest)
    wire = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    again = type(model).model_validate(wire)
    assert again == model
    assert again.model_dump(by_alias=True, exclude_none=True, mode="json") == wire
    # Every field the user wrote survives, unchanged, in the dumped form.
    assert _contains(wire, manifest["spec"])


def _contains(big: Any, small: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _contains(big[k], v) for k, v in small.items())
    return bool(big == small)


@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda c: c.name)
def test_invalid_manifests_are_rejected_with_path_and_value(case: InvalidCase) -> None:
    with pytest.raises(ValidationError) as caught:
        parse(case.manifest)
    message = "\n".join(format_validation_error(caught.value))
    assert case.path in message
    if case.value is not None:
        assert str(case.value) in message


def test_error_lines_name_field_and_value() -> None:
    with pytest.raises(ValidationError) as caught:
        TrainingJobSpec.model_validate(training_job(**{"spec.distributed.workers": 0})["spec"])
    (line,) = format_validation_error(caught.value)
    assert line.startswith("spec.distributed.workers: ")
    assert line.endswith("got 0")


def test_neuralcluster_needs_claim_or_size() -> None:
    assert NeuralClusterSpec.model_validate({"artifactStore": {"size": "1Gi"}}).artifact_store.size == "1Gi"
    with pytest.raises(ValidationError):
        NeuralClusterSpec.model_validate({"artifactStore": {}})


# Hypothesis: any spec drawn from the valid space parses and round-trips.
steps_strategy = st.lists(st.integers(1, 100), min_size=1, max_size=12, unique=True).map(sorted)


@st.composite
def deployment_specs(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(1, 50))
    source = draw(st.sampled_from([{"trainingJobRef": {"name": "digits"}}, {"archivePath": "m/a.mar"}]))
    return {
        "clusterRef": {"name": draw(st.from_regex(r"^[a-z][a-z0-9-]{0,20}[a-z0-9]$", fullmatch=True))},
        "model": {**source, "version": draw(st.from_regex(r"^[0-9]([0-9.]{0,7}[0-9])?$", fullmatch=True))},
        "serving": {"batchSize": draw(st.integers(1, 1024)), "maxBatchDelayMs": draw(st.integers(0, 60000))},
        "autoscaling": {
            "minReplicas": low,
            "maxReplicas": draw(st.integers(low, 1000)),
            "targetCpuUtilization": draw(st.integers(1, 100)),
        },
        "rollout": {
            "steps": draw(steps_strategy),
            "failedChecksBeforeRollback": draw(st.integers(1, 100)),
            "interval": f"{draw(st.integers(1, 600))}{draw(st.sampled_from('smh'))}",
        },
    }


@st.composite
def training_specs(draw: st.DrawFn) -> dict[str, Any]:
    arch = draw(st.sampled_from(["mlp", "residual_mlp", "transformer", "lstm"]))
    heads = draw(st.integers(1, 8))
    epochs = draw(st.integers(1, 500))
    gpus = draw(st.integers(0, 4))
    procs = draw(st.integers(1, max(gpus, 1)))
    workers = draw(st.integers(1, 512))
    return {
        "clusterRef": {"name": "demo"},
        "model": {
            "architecture": arch,
            "numHeads": heads,
            "dModel": heads * draw(st.integers(1, 32)),
            "hiddenSizes": draw(st.lists(st.integers(1, 512), min_size=1, max_size=4)),
            "dropout": draw(st.floats(0, 0.9)),
        },
        "dataset": draw(
            st.sampled_from(
                [
                    {"source": "builtin", "name": "wine"},
                    {"source": "synthetic", "task": "regression", "split": "temporal"},
                    {"source": "file", "path": "d/x.npz", "task": "classification"},
                ]
            )
        ),
        "training": {
            "epochs": epochs,
            "scheduler": {"warmupEpochs": draw(st.integers(0, epochs - 1))},
            "learningRate": draw(st.floats(1e-6, 1.0)),
            "optimizer": draw(st.sampled_from(["adamw", "sgd"])),
            # The global batch: at least one row per process.
            "batchSize": draw(st.integers(workers * procs, 65_536)),
        },
        "distributed": {"workers": workers, "procsPerWorker": procs, "gpusPerWorker": gpus},
        "runPolicy": {"maxRestarts": draw(st.integers(0, 100)), "suspend": draw(st.booleans())},
    }


@settings(max_examples=60, deadline=None)
@given(deployment_specs())
def test_generated_deployment_specs_are_accepted(spec: dict[str, Any]) -> None:
    model = ModelDeploymentSpec.model_validate(spec)
    assert ModelDeploymentSpec.model_validate(model.model_dump(by_alias=True)) == model


@settings(max_examples=60, deadline=None)
@given(training_specs())
def test_generated_training_specs_are_accepted(spec: dict[str, Any]) -> None:
    model = TrainingJobSpec.model_validate(spec)
    assert TrainingJobSpec.model_validate(model.model_dump(by_alias=True)) == model


# ---- the rules that keep bad input out (issue: invalid specs) ----------------------------------------------


def _problem(manifest: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        parse(manifest)
    return "\n".join(format_validation_error(caught.value))


def test_name_limits_keep_every_derived_name_a_valid_dns_label() -> None:
    from flownexus.modeldeployment import children as md_children
    from flownexus.trainingjob import children as tj_children

    label = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    # The bounds the limits were derived from are the schema's.
    assert RunPolicy.model_fields["max_restarts"].metadata[-1].le == trainingjob.MAX_RESTARTS
    assert DistributedSpec.model_fields["workers"].metadata[-1].le == trainingjob.MAX_WORKERS

    def tj_labels(name: str) -> list[str]:
        # Attempts run 1..maxRestarts + 1; Indexed pods get the hostname <job>-<index>, and a name from it.
        job = tj_children.worker_job_name(name, trainingjob.MAX_RESTARTS + 1)
        return [f"{job}-{trainingjob.MAX_WORKERS - 1}", job, tj_children.validator_job_name(name),
                tj_children.service_name(name)]  # fmt: skip

    def pod_prefix(name: str) -> str:  # generateName of an Indexed Job's pod, kept whole for the policy
        return f"{tj_children.worker_job_name(name, trainingjob.MAX_RESTARTS + 1)}-{trainingjob.MAX_WORKERS - 1}-"

    longest = "t" * TRAINING_JOB.names.max_length
    assert all(len(n) <= 63 and label.match(n) for n in tj_labels(longest))
    assert len(pod_prefix(longest)) <= trainingjob.POD_NAME_KEPT
    assert len(pod_prefix(longest + "x")) > trainingjob.POD_NAME_KEPT

    longest = "m" * MODEL_DEPLOYMENT.names.max_length
    for track in ("stable", "canary"):
        assert len(md_children.pod_prefix(longest, track)) <= modeldeployment.GENERATED_NAME_KEPT
        assert len(md_children.pod_prefix(longest + "x", track)) > modeldeployment.GENERATED_NAME_KEPT
    assert len(md_children.service_name(longest)) <= 63


@pytest.mark.parametrize(
    ("kind", "name", "needle"),
    [
        (TRAINING_JOB, "t" * 49, "TrainingJob name " + "t" * 49 + " is longer than 48 characters: "),
        (TRAINING_JOB, "1digits", "is not a DNS-1035 label"),
        (MODEL_DEPLOYMENT, "m" * 51, "is longer than 50 characters"),
        (MODEL_DEPLOYMENT, "digits.v2", "it names the Service <name>"),
        (NEURAL_CLUSTER, "n" * 64, "is longer than 63 characters"),
        (NEURAL_CLUSTER, "demo.cluster", "is not a DNS-1123 label"),
    ],
)
def test_name_problems_say_the_limit_and_why(kind: Kind, name: str, needle: str) -> None:
    problems = kind.names.problems(kind.kind, name)
    assert any(needle in p for p in problems), problems


def test_names_at_the_limit_are_fine() -> None:
    for kind in KINDS:
        assert kind.names.problems(kind.kind, "a" * kind.names.max_length) == []


@pytest.mark.parametrize(
    "name",
    ["JOB_COMPLETION_INDEX", "MASTER_ADDR", "RANK", "WORLD_SIZE", "PET_RDZV_ENDPOINT", "TORCHELASTIC_RUN_ID",
     "FLOWNEXUS_CONFIG", "FLOWNEXUS_ANYTHING", "OMP_NUM_THREADS", "KUBERNETES_SERVICE_HOST"],
)  # fmt: skip
def test_reserved_env_is_refused_naming_the_variable(name: str) -> None:
    message = _problem(training_job(**{"spec.distributed.env": [{"name": "OK", "value": "1"}, {"name": name}]}))
    assert message.startswith(f"spec.distributed.env.1.name: Value error, {name} is reserved: ")


def test_job_completion_index_message() -> None:
    message = _problem(training_job(**{"spec.distributed.env": [{"name": "JOB_COMPLETION_INDEX", "value": "3"}]}))
    assert "JOB_COMPLETION_INDEX is reserved: the Job controller sets it to each worker pod's index" in message


def test_user_env_that_nobody_sets_is_fine() -> None:
    spec = TrainingJobSpec.model_validate(
        training_job(**{"spec.distributed.env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "MY_RANK"}]})["spec"]
    )
    assert [e.name for e in spec.distributed.env or []] == ["NCCL_DEBUG", "MY_RANK"]


SPEC_RULE_CASES = [
    # (manifest, path in pydantic's words, words of the message)
    (training_job(**{"spec.dataset": {"source": "file", "path": "../secrets.csv"}}), "spec.dataset.path", "'..'"),
    (training_job(**{"spec.dataset": {"source": "file", "path": "a/../../b.npz"}}), "spec.dataset.path", "'..'"),
    (training_job(**{"spec.dataset": {"source": "file", "path": "/etc/x.csv"}}), "spec.dataset.path", "absolute"),
    (training_job(**{"spec.dataset": {"source": "file", "path": "data/x.txt"}}), "spec.dataset.path", ".csv or .npz"),
    (model_deployment(**{"spec.model": {"archivePath": "/artifacts/x.mar", "version": "1"}}), "spec.model.archivePath",
     "absolute"),
    (training_job(**{"spec.model.hiddenSizes": [128, 100_000]}), "spec.model.hiddenSizes.1", "8192"),
    (training_job(**{"spec.model.hiddenSizes": [0]}), "spec.model.hiddenSizes.0", "greater than or equal to 1"),
    (training_job(**{"spec.model.hiddenSizes": [8] * 17}), "spec.model.hiddenSizes", "at most 16"),
    (training_job(**{"spec.dataset": {"source": "synthetic", "synthetic": {"samples": 10_000_000, "features": 1000}}}),
     "spec.dataset.synthetic", "samples x features must be at most 100,000,000"),
    (training_job(**{"spec.distributed.resources": {"requests": {"cpu": "lots"}}}),
     "spec.distributed.resources.requests.cpu", "must be a non-negative quantity"),
    (training_job(**{"spec.distributed.resources": {"limits": {"memory": "-1Gi"}}}),
     "spec.distributed.resources.limits.memory", "must be a non-negative quantity"),
    (training_job(**{"spec.distributed.resources": {"requests": {"cpu": "4"}, "limits": {"cpu": 2}}}),
     "spec.distributed.resources", "requests.cpu 4 is above limits.cpu 2"),
    (model_deployment(**{"spec.serving.resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "2G"}}}),
     "spec.serving.resources", "requests.memory 2Gi is above limits.memory 2G"),
    (neural_cluster(**{"spec.artifactStore": {"size": "0"}}), "spec.artifactStore.size", "positive quantity"),
    (neural_cluster(**{"spec.defaultServingResources": {"requests": {"cpu": "1.5.5"}}}),
     "spec.defaultServingResources.requests.cpu", "quantity"),
    (model_deployment(**{"spec.rollout.interval": "0s"}), "spec.rollout.interval", "must be longer than 0s"),
    (model_deployment(**{"spec.rollout.thresholds": {"window": "000m"}}), "spec.rollout.thresholds.window",
     "must be longer than 0s"),
    (model_deployment(**{"spec.rollout.interval": "1d"}), "spec.rollout.interval", "pattern"),
    (neural_cluster(**{"spec.images": {"trainer": "Not An Image"}}), "spec.images.trainer", "image reference"),
    (neural_cluster(**{"spec.images": {"server": "registry:5000/server:"}}), "spec.images.server", "image reference"),
    (neural_cluster(**{"spec.images": {"server": "server@sha256:abc"}}), "spec.images.server", "image reference"),
    (model_deployment(**{"spec.model.version": "1.0."}), "spec.model.version", "pattern"),
    (model_deployment(**{"spec.model.version": "1" * 64}), "spec.model.version", "at most 63"),
    (training_job(**{"spec.runPolicy.ttlSecondsAfterFinished": 2**31}), "spec.runPolicy.ttlSecondsAfterFinished",
     "less than or equal"),
    (neural_cluster(**{"spec.training": {"gpuResourceName": "nvidia gpu"}}), "spec.training.gpuResourceName",
     "pattern"),
    (neural_cluster(**{"spec.serving": {"nodeSelector": {"zone": "a" * 64}}}), "spec.serving.nodeSelector.zone",
     "at most 63"),
]  # fmt: skip


@pytest.mark.parametrize(("manifest", "path", "words"), SPEC_RULE_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_the_operator_refuses_what_the_schema_refuses(manifest: dict[str, Any], path: str, words: str) -> None:
    message = _problem(manifest)
    assert any(line.startswith(f"{path}: ") and words in line for line in message.splitlines()), message


@pytest.mark.parametrize(
    "image",
    ["flownexus/trainer:0.1.0", "trainer", "localhost:5000/team/trainer:v1.2_rc-1", "registry.example.com/a/b/c",
     "ghcr.io/org/image@sha256:" + "0" * 64, "docker.io/library/python:3.11-slim@sha256:" + "ab" * 32,
     "my-registry.local/x__y/z.w"],
)  # fmt: skip
def test_image_references_that_are_references(image: str) -> None:
    spec = NeuralClusterSpec.model_validate({"artifactStore": {"size": "1Gi"}, "images": {"trainer": image}})
    assert spec.images.trainer == image


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", Decimal("0.5")), ("2Gi", Decimal(2 * 1024**3)), ("1e3", Decimal(1000)), (4, Decimal(4)),
     ("+1.5k", Decimal(1500)), (".5", Decimal("0.5")), ("1E", Decimal(10**18)), ("-1", Decimal(-1))],
)  # fmt: skip
def test_quantities_parse_as_kubernetes_parses_them(text: str | int, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text", ["", "lots", "1.5.5", "2 Gi", "1Gb", "1e", "1ki", "--1", "0x10", True, "1\n", ".", "+", "Gi", "1e999999999"]
)
def test_what_is_not_a_quantity(text: str | int) -> None:
    assert parse_quantity(text) is None


def test_cel_and_python_say_the_same_words() -> None:
    """A ``{value}`` in a Check's message becomes a messageExpression that names the value."""
    check = Check("self != 'X'", lambda v: v != "X", "{value} is reserved: it's taken")
    assert check.cel() == {"rule": "self != 'X'", "messageExpression": "self + ' is reserved: it\\'s taken'"}
    assert check.text("X") == "X is reserved: it's taken"
    assert Check("true", None, "plain").cel() == {"rule": "true", "message": "plain"}


def test_a_global_batch_smaller_than_the_process_count_is_refused_naming_batch_size() -> None:
    spec: dict[str, Any] = {
        "clusterRef": {"name": "demo"},
        "model": {"architecture": "mlp"},
        "dataset": {"source": "builtin", "name": "digits"},
        "training": {"batchSize": 3},
        "distributed": {"workers": 2, "procsPerWorker": 2},
    }
    with pytest.raises(ValidationError, match=r"training.batchSize is the global batch"):
        TrainingJobSpec.model_validate(spec)
    spec["training"] = {"batchSize": 4}
    TrainingJobSpec.model_validate(spec)


def test_cross_validation_with_a_temporal_split_is_refused() -> None:
    spec: dict[str, Any] = {
        "clusterRef": {"name": "demo"},
        "model": {"architecture": "mlp"},
        "dataset": {"source": "synthetic", "split": "temporal"},
        "validation": {"crossValidation": {"folds": 3}},
    }
    with pytest.raises(ValidationError, match=r"crossValidation shuffles rows into folds"):
        TrainingJobSpec.model_validate(spec)
    spec["dataset"]["split"] = "random"
    TrainingJobSpec.model_validate(spec)
