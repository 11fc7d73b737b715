"""Bring your own model (model.architecture custom + spec.trainer): the API rules and the worker Job it builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from flownexus.api import KINDS
from flownexus.api.common import format_validation_error
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.api.trainingjob import (
    CUSTOM_CROSS_VALIDATION_MESSAGE,
    CUSTOM_TRAINER_MESSAGE,
    TRAINER_COMMAND_MESSAGE,
    TrainingJobSpec,
)
from flownexus.crdgen import build_crd
from flownexus.trainingjob.children import TrainingContext, build_validator_job, build_worker_job, trainer_config
from tests.factories import neural_cluster, training_job

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom-cnn" / "trainingjob.yaml"
IMAGE = "registry.example.com/team/custom-cnn:0.1.0"
CUSTOM: dict[str, Any] = {
    "spec.model": {"architecture": "custom"},
    "spec.trainer": {"image": IMAGE, "command": ["/opt/x.py"]},
}


def ctx(**overrides: Any) -> TrainingContext:
    tj = training_job(**overrides)
    tj["metadata"]["uid"] = "uid-1"
    return TrainingContext(
        owner=tj,
        spec=TrainingJobSpec.model_validate(tj["spec"]),
        cluster=NeuralClusterSpec.model_validate(neural_cluster()["spec"]),
        artifact_claim="demo-artifacts",
    )


def trainer_container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def torchrun(job: dict[str, Any]) -> list[str]:
    """The torchrun part of the trainer's command (a store wrapper may stand before it)."""
    cmd: list[str] = trainer_container(job)["command"]
    return cmd[cmd.index("torchrun") :]


def errors(spec: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        TrainingJobSpec.model_validate(spec)
    return "\n".join(format_validation_error(caught.value))


@pytest.mark.parametrize(
    ("trainer", "tail"),
    [
        ({"command": ["/opt/example/train_cnn.py"]}, ["/opt/example/train_cnn.py"]),
        ({"command": ["-m", "mypkg.train"]}, ["-m", "mypkg.train"]),
        (
            {"command": ["/opt/x.py"], "args": ["--width", "64", ""]},
            ["/opt/x.py", "--width", "64", ""],
        ),
        (
            {"command": ["-m", "mypkg.train", "--fast"], "args": ["--seed=1"]},
            ["-m", "mypkg.train", "--fast", "--seed=1"],
        ),
    ],
)
def test_a_custom_trainer_runs_its_command_and_args_in_its_image_under_the_same_torchrun(
    trainer: dict[str, Any], tail: list[str]
) -> None:
    builtin = build_worker_job(ctx(), 2)
    custom = build_worker_job(ctx(**{**CUSTOM, "spec.trainer": {"image": IMAGE, **trainer}}), 2)
    assert trainer_container(custom)["image"] == IMAGE
    # The same torchrun options (gang size, node rank, rendezvous, no elastic restarts); only what it runs changes.
    assert torchrun(custom) == torchrun(builtin)[:-2] + tail
    assert torchrun(builtin)[-2:] == ["-m", "flownexus_trainer.train"]

    # Everything else in the pod is the built-in trainer's: env (but the image it names), mounts, security, resources.
    def rest(job: dict[str, Any]) -> dict[str, Any]:
        c = {k: v for k, v in trainer_container(job).items() if k not in ("image", "command")}
        return {**c, "env": [e for e in c["env"] if e["name"] != "FLOWNEXUS_IMAGE"]}

    assert rest(custom) == rest(builtin)


def test_a_builtin_architecture_keeps_the_clusters_trainer_image() -> None:
    job = build_worker_job(ctx(), 1)
    assert trainer_container(job)["image"] == NeuralClusterSpec.model_validate(neural_cluster()["spec"]).images.trainer


def test_the_validator_of_a_custom_model_runs_on_the_clusters_images_not_the_users() -> None:
    custom, builtin = build_validator_job(ctx(**CUSTOM)), build_validator_job(ctx())
    for key in ("initContainers", "containers"):
        images = [c["image"] for c in custom["spec"]["template"]["spec"][key]]
        assert images == [c["image"] for c in builtin["spec"]["template"]["spec"][key]]
        assert IMAGE not in images


def test_the_trainer_config_tells_the_pods_the_architecture_is_custom() -> None:
    config = trainer_config(ctx(**CUSTOM))
    assert config["model"]["architecture"] == "custom"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"spec.model": {"architecture": "custom"}}, CUSTOM_TRAINER_MESSAGE),
        ({"spec.trainer": {"image": IMAGE, "command": ["/opt/x.py"]}}, CUSTOM_TRAINER_MESSAGE),
        ({**CUSTOM, "spec.trainer": {"image": IMAGE, "command": ["--nnodes=9", "/opt/x.py"]}}, TRAINER_COMMAND_MESSAGE),
        ({**CUSTOM, "spec.trainer": {"image": IMAGE, "command": ["-m"]}}, TRAINER_COMMAND_MESSAGE),
        ({**CUSTOM, "spec.trainer": {"image": IMAGE, "command": ["-m", "--x"]}}, TRAINER_COMMAND_MESSAGE),
        ({**CUSTOM, "spec.validation": {"crossValidation": {"folds": 5}}}, CUSTOM_CROSS_VALIDATION_MESSAGE),
    ],
    ids=["custom-without-trainer", "trainer-without-custom", "torchrun-option", "bare-m", "m-then-option", "crossval"],
)
def test_custom_and_trainer_are_refused_unless_they_go_together_and_can_run(
    overrides: dict[str, Any], message: str
) -> None:
    assert message in errors(training_job(**overrides)["spec"])


@pytest.mark.parametrize(
    ("trainer", "path"),
    [
        ({"image": "Not An Image", "command": ["/opt/x.py"]}, "trainer.image"),
        ({"image": IMAGE, "command": []}, "trainer.command"),
        ({"image": IMAGE}, "trainer.command"),
        ({"command": ["/opt/x.py"]}, "trainer.image"),
        ({"image": IMAGE, "command": ["/opt/x.py"] * 65}, "trainer.command"),
        ({"image": IMAGE, "command": [""]}, "trainer.command.0"),
    ],
)
def test_a_malformed_trainer_is_refused_naming_the_field(trainer: dict[str, Any], path: str) -> None:
    assert path in errors(training_job(**{**CUSTOM, "spec.trainer": trainer})["spec"])


def test_the_message_names_both_fields() -> None:
    assert "model.architecture" in CUSTOM_TRAINER_MESSAGE and "trainer" in CUSTOM_TRAINER_MESSAGE


def test_the_trainer_is_immutable_and_its_rules_reach_the_crd() -> None:
    kind = next(k for k in KINDS if k.kind == "TrainingJob")
    schema = build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    trainer = schema["properties"]["trainer"]
    assert {"rule": "self == oldSelf", "message": "is immutable once the TrainingJob exists"} in trainer[
        "x-kubernetes-validations"
    ]
    rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
    assert "(self.model.architecture == 'custom') == has(self.trainer)" in rules
    assert "custom" in schema["properties"]["model"]["properties"]["architecture"]["enum"]


def test_the_custom_cnn_example_is_a_valid_trainingjob() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert doc["apiVersion"] == "flownexus.io/v1alpha1" and doc["kind"] == "TrainingJob"
    spec = TrainingJobSpec.model_validate(doc["spec"])
    assert spec.model.architecture == "custom" and spec.trainer is not None
    assert spec.trainer.command == ["/opt/example/train_cnn.py"]
    assert spec.distributed.workers == 2 and spec.dataset.name == "digits"


def test_the_lineage_names_the_image_that_trained_the_model_for_workers_and_validator() -> None:
    """metadata.json's ``image`` comes from FLOWNEXUS_IMAGE: for a custom trainer, the user's image."""
    c = ctx(**CUSTOM)

    def env(container: dict[str, Any]) -> dict[str, Any]:
        return {e["name"]: e.get("value") for e in container["env"]}

    validator = build_validator_job(c)["spec"]["template"]["spec"]["initContainers"][0]
    assert env(trainer_container(build_worker_job(c, 1)))["FLOWNEXUS_IMAGE"] == IMAGE
    assert env(validator)["FLOWNEXUS_IMAGE"] == IMAGE
    assert validator["image"] == c.cluster.images.trainer  # the validator itself stays on the cluster's image
