"""spec.validation.champion: what the operator tells the validator about the model it must beat (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from flownexus.api.modeldeployment import ServingSpec
from flownexus.api.trainingjob import ServedLatencySpec
from flownexus.trainingjob.children import champion_paths, resolve_served_latency


def md(archive: str | None, version: str = "1.0.0") -> dict[str, Any]:
    status = {"stable": {"version": version, "archive": archive}} if archive is not None else {}
    return {"metadata": {"name": "digits"}, "spec": {"clusterRef": {"name": "demo"}}, "status": status}


@pytest.mark.parametrize(
    ("deployment", "md_claim", "expected_key", "expected_text"),
    [
        (None, None, "championAbsent", "ModelDeployment digits does not exist"),
        (md(None), "art", "championAbsent", "serves no model yet"),
        (md(""), "art", "championAbsent", "serves no model yet"),
        (md("ns/digits-1a2b3c4d/model-store/digits.mar"), "other", "championError", "another artifact store"),
        (md("uploads/digits.mar"), "art", "championError", "not a TrainingJob's archive"),
        (md("ns/../x/model-store/digits.mar"), "art", "championError", "not a TrainingJob's archive"),
        (md("ns/digits-1a2b3c4d/model-store/digits.mar"), "art", "championRunDir", "ns/digits-1a2b3c4d"),
    ],
)
def test_champion_paths_name_the_run_dir_or_say_why_there_is_none(
    deployment: dict[str, Any] | None, md_claim: str | None, expected_key: str, expected_text: str
) -> None:
    paths = champion_paths("digits", deployment, md_claim, "art")
    assert expected_key in paths, paths
    assert expected_text in paths[expected_key]
    assert len([k for k in paths if k in ("championAbsent", "championError", "championRunDir")]) == 1


def test_champion_run_dir_comes_with_the_served_version() -> None:
    paths = champion_paths("digits", md("ns/digits-1a2b3c4d/model-store/digits.mar", "2.0.0"), "art", "art")
    assert paths == {"championRunDir": "ns/digits-1a2b3c4d", "championVersion": "2.0.0"}


def test_the_latency_gate_serves_like_the_champion_modeldeployment() -> None:
    serving = {"batchSize": 8, "maxBatchDelayMs": 20, "workersPerModel": 2, "resources": {"limits": {"cpu": "2"}}}
    served = resolve_served_latency(ServedLatencySpec(concurrency=4), serving)
    assert (served.batch_size, served.max_batch_delay_ms, served.workers, served.concurrency) == (8, 20, 2, 4)
    assert served.resources is not None and served.resources.to_wire()["limits"]["cpu"] == "2"


def test_a_modeldeployment_with_default_serving_gives_the_serving_defaults() -> None:
    served = resolve_served_latency(ServedLatencySpec(), {})
    defaults = ServingSpec()
    assert (served.batch_size, served.max_batch_delay_ms) == (defaults.batch_size, defaults.max_batch_delay_ms)
    assert resolve_served_latency(ServedLatencySpec(), None) == served


def test_settings_the_job_sets_win_over_the_champions() -> None:
    served = resolve_served_latency(ServedLatencySpec(batch_size=1, max_batch_delay_ms=0), {"batchSize": 8})
    assert (served.batch_size, served.max_batch_delay_ms, served.workers) == (1, 0, 1)
