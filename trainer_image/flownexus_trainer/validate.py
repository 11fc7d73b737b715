"""The validator Job (``python -m flownexus_trainer.validate``): measure the trained model, gate it.

Writes into the run directory: ``validation.json`` (verdict and numbers), ``metadata.json``
(lineage), ``report.md`` + ``training_curves.png``, and when the gate passes
``model-store/<model>.mar`` plus the requested exports. A short verdict also goes to
``/dev/termination-log`` so the operator can read it from the pod status without the pod holding
API rights.

Exit status: 0 when validation ran (passed *or* rejected: read the verdict), 2 when it could not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from . import quality
from .checkpoint import atomic_write_bytes
from .config import JobConfig, load_config
from .crossval import cross_validate
from .data import Normalization, Splits, load_splits
from .distributed import DistContext
from .errors import TERMINATION_LOG, failure_summary, write_termination_message
from .export import (
    SCHEMA_FILE,
    ModelSignature,
    Preprocessing,
    StandardizedInput,
    build_mar,
    export_failures,
    load_torchscript_module,
    run_exports,
)
from .models import build_model
from .report import plot_curves, render_report
from .served_latency import withdraw_exports
from .thresholds import (
    ChampionScore,
    CrossValScores,
    Measured,
    ThresholdResult,
    assess_convergence,
    evaluate_thresholds,
    failed,
)
from .train import EVAL_CHUNK, evaluate

log = logging.getLogger(__name__)


def load_trained_model(model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained network on standardized rows (logits, or standardized targets), and its model_config.json.

    A custom trainer's model (``"format": "torchscript"``, flownexus_trainer.sdk) is a TorchScript graph on raw
    rows: it is loaded without the user's code and wrapped so that it answers like a built-in network.
    """
    spec = json.loads((model_dir / "model_config.json").read_text(encoding="utf-8"))
    if spec.get("format") == "torchscript":
        raw_norm = json.loads((model_dir / "normalization.json").read_text(encoding="utf-8"))
        norm = Normalization(
            mean=list(raw_norm["mean"]), std=list(raw_norm["std"]),
            target_mean=float(raw_norm.get("targetMean", 0.0)), target_std=float(raw_norm.get("targetStd", 1.0)),
        )  # fmt: skip
        raw = load_torchscript_module(model_dir / "model.pt")
        return StandardizedInput(raw, Preprocessing.of(norm, str(spec["task"]))).eval(), spec
    model = build_model(spec["model"], spec["numFeatures"], spec["numOutputs"])
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), spec


def measure_latency(
    model: nn.Module, rows: torch.Tensor, classification: bool, runs: int = 300, warmup: int = 30
) -> dict[str, Any]:
    """The model alone: single-row forward (plus softmax for classes) in this process, one thread, no serving.

    The gate's latency is the served one (``served_latency``); this is reported next to it as ``modelLatencyMs``.
    """
    timings = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            row = rows[i % len(rows)].unsqueeze(0)
            started = time.perf_counter()
            out = model(row)
            if classification:
                torch.softmax(out, dim=-1)
            if i >= warmup:
                timings.append((time.perf_counter() - started) * 1000.0)
    p50, p95, p99 = np.percentile(timings, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "samples": runs, "device": "cpu"}


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def predict(model: nn.Module, x: NDArray[Any]) -> NDArray[np.float32]:
    """The model's raw outputs (logits, or standardized targets) for a whole standardized split."""
    with torch.inference_mode():
        rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return torch.cat([model(chunk) for chunk in torch.split(rows, EVAL_CHUNK)]).float().numpy()


def score_outputs(
    task: str, outputs: NDArray[Any], y: NDArray[Any], class_labels: list[str], target_std: float = 1.0
) -> dict[str, Any]:
    """quality's metrics of one split from the model's outputs (y standardized like the outputs)."""
    if task == "classification":
        scores = None
        if outputs.shape[1] == 2:
            shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
            scores = shifted[:, 1] / shifted.sum(axis=1)
        return quality.classification_metrics(y, outputs.argmax(axis=1), class_labels, scores)
    return quality.regression_metrics(np.asarray(y) * target_std, outputs[:, 0] * target_std)


class ChampionError(Exception):
    """The champion's model cannot be scored on this job's test rows; the message says why."""


def champion_dir(artifact_root: Path, relative: str) -> Path:
    """The champion's run directory, which must lie inside the artifact store."""
    path = (artifact_root / relative).resolve()
    if artifact_root.resolve() not in path.parents:
        raise ChampionError(f"paths.championRunDir {relative!r} is outside the artifact store")
    return path


def champion_primary(model_dir: Path, splits: Splits) -> float:
    """The champion's primary metric on this job's test rows.

    The rows are turned back into raw features with this job's standardization and standardized
    again with the champion's own (normalization.json, fitted on its training split), and for
    regression its outputs are turned into target units with its own target statistics.
    """
    for name in ("model_config.json", "model.pt", "normalization.json"):
        if not (model_dir / name).is_file():
            raise ChampionError(f"{model_dir.parent.name}/model/{name} does not exist")
    spec = json.loads((model_dir / "model_config.json").read_text(encoding="utf-8"))
    if spec.get("task", splits.task) != splits.task:
        raise ChampionError(f"it is a {spec.get('task')} model, this job is {splits.task}")
    if spec.get("numFeatures") != splits.num_features:
        raise ChampionError(f"it takes {spec.get('numFeatures')} features, this dataset has {splits.num_features}")
    theirs_names = list(spec.get("featureNames", splits.feature_names))
    if theirs_names != splits.feature_names:
        where = _first_difference(theirs_names, splits.feature_names)
        raise ChampionError(f"its features differ from this dataset's: {where}")
    if splits.task == "classification" and spec.get("classLabels", splits.class_labels) != splits.class_labels:
        raise ChampionError(f"its classes {spec.get('classLabels')} differ from this dataset's {splits.class_labels}")
    raw_norm = json.loads((model_dir / "normalization.json").read_text(encoding="utf-8"))
    theirs = Normalization(
        mean=list(raw_norm["mean"]), std=list(raw_norm["std"]),
        target_mean=float(raw_norm.get("targetMean", 0.0)), target_std=float(raw_norm.get("targetStd", 1.0)),
    )  # fmt: skip
    if len(theirs.mean) != splits.num_features or len(theirs.std) != splits.num_features:
        raise ChampionError(
            f"its normalization.json has {len(theirs.mean)} features, this dataset has {splits.num_features}"
        )
    try:
        model, _ = load_trained_model(model_dir)
    except Exception as exc:  # a state dict that does not fit its own config, a corrupt file
        raise ChampionError(f"its model.pt does not load: {type(exc).__name__}: {str(exc)[:200]}") from exc
    ours = splits.normalization
    outputs = predict(model, theirs.apply(ours.invert(splits.x_test)))
    if splits.task == "classification":
        test = quality.classification_metrics(splits.y_test, outputs.argmax(axis=1), splits.class_labels)
        return float(test["balancedAccuracy"])
    y_true, y_pred = ours.invert_target(splits.y_test), theirs.invert_target(outputs[:, 0])
    return float(quality.regression_metrics(y_true, y_pred)["r2"])


def _first_difference(theirs: list[str], ours: list[str]) -> str:
    i = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), min(len(theirs), len(ours)))
    return (
        f"feature {i} is {theirs[i] if i < len(theirs) else None!r} there, {ours[i] if i < len(ours) else None!r} here"
    )


def score_champion(cfg: JobConfig, splits: Splits) -> ChampionScore | None:
    """validation.champion scored on this job's test rows; None when no champion is configured."""
    name = cfg.validation.champion_model_deployment
    if name is None:
        return None
    relative = cfg.champion_run_dir
    if cfg.champion_absent:
        return ChampionScore(name, None, absent=cfg.champion_absent)
    if cfg.champion_error:
        return ChampionScore(name, None, cfg.champion_error)
    if not relative:
        return ChampionScore(name, None, "no run directory of its model was given (paths.championRunDir)")
    try:
        score = champion_primary(champion_dir(cfg.artifact_root, relative) / "model", splits)
    except (ChampionError, OSError, ValueError, KeyError) as exc:
        return ChampionScore(name, None, str(exc), relative)
    return ChampionScore(name, score, run_dir=relative)


def measure(
    model: nn.Module,
    splits: Splits,
    history: list[dict[str, Any]],
    stopped_early: bool,
    champion: ChampionScore | None = None,
    cross_validation: CrossValScores | None = None,
) -> tuple[dict[str, Any], Measured]:
    """Test quality against the baselines (and the champion), the train - test gap, latency, convergence.

    ``metrics`` holds flat numbers plus ``quality``: the full test metrics (confusion matrix,
    per-class table, interval), both baselines and the champion, for metadata.json and report.md.
    """
    t_std = splits.normalization.target_std
    tensors = {
        name: (torch.from_numpy(getattr(splits, f"x_{name}")), torch.from_numpy(getattr(splits, f"y_{name}")))
        for name in ("train", "val", "test")
    }
    scores = {name: evaluate(model, x, y, splits.task, t_std) for name, (x, y) in tensors.items()}
    labels = splits.class_labels
    train_q = score_outputs(splits.task, predict(model, splits.x_train), splits.y_train, labels, t_std)
    test_q = score_outputs(splits.task, predict(model, splits.x_test), splits.y_test, labels, t_std)
    base = quality.baselines(splits.task, splits.x_train, splits.y_train, splits.x_test, splits.y_test, labels, t_std)
    key = quality.primary_metric(splits.task)
    gap = train_q[key] - test_q[key]
    latency = measure_latency(model, tensors["test"][0], splits.task == "classification")
    converged, reason = assess_convergence(history, stopped_early)
    metrics: dict[str, Any] = {f"{split}{k.title()}": round(v, 6) for split, s in scores.items() for k, v in s.items()}
    classification = splits.task == "classification"
    interval = [round(v, 6) for v in test_q["accuracyInterval"]] if classification else None
    metrics.update(
        {
            "primaryMetric": key,
            f"train{key[0].upper()}{key[1:]}": round(train_q[key], 6),
            f"test{key[0].upper()}{key[1:]}": round(test_q[key], 6),
            **(
                {"testMacroF1": round(test_q["macroF1"], 6), "testRocAuc": _round(test_q["rocAuc"]),
                 "accuracyInterval": interval, "classesWithoutTestRows": test_q["classesWithoutTestRows"]}
                if classification
                else {"testMae": round(test_q["mae"], 6)}
            ),
            "testRows": len(splits.y_test),
            "baselineTrivial": round(base["trivial"].score(splits.task), 6),
            "baselineLinear": round(base["linear"].score(splits.task), 6),
            "overfittingGap": round(gap, 6),
        }
    )  # fmt: skip
    if champion is not None:
        metrics["championScore"] = _round(champion.score)
    if cross_validation is not None:  # validation.crossValidation: every fold's score (crossval.py)
        metrics["crossValidation"] = cross_validation.to_json()
    # latencyMs is the gate's figure: this in-process one when the validator runs as one step; the served step
    # (served_latency.py) replaces it with TorchServe's. modelLatencyMs stays: what the model alone costs.
    metrics.update(converged=converged, convergenceReason=reason, latencyMs=latency, modelLatencyMs=latency)
    metrics["quality"] = {
        "primaryMetric": key,
        "test": _rounded(test_q),
        "train": {key: round(train_q[key], 6)},
        "baselines": {kind: b.summary(splits.task) for kind, b in base.items()},
        "champion": None
        if champion is None
        else {"modelDeployment": champion.model_deployment, "runDir": champion.run_dir,
              key: _round(champion.score), "error": champion.error or None},
    }  # fmt: skip
    measured = Measured(
        task=splits.task,
        test_accuracy=scores["test"].get("accuracy"),
        test_rmse=scores["test"].get("rmse"),
        test_r2=scores["test"].get("r2"),
        latency_p95_ms=latency["p95"],
        converged=converged,
        convergence_reason=reason,
        overfitting_gap=gap,
        train_primary=train_q[key],
        test_balanced_accuracy=test_q.get("balancedAccuracy"),
        test_rows=len(splits.y_test),
        accuracy_interval=(test_q["accuracyInterval"][0], test_q["accuracyInterval"][1]) if classification else None,
        baseline_trivial=base["trivial"].score(splits.task),
        baseline_linear=base["linear"].score(splits.task),
        classes_without_test_rows=tuple(test_q.get("classesWithoutTestRows", ())),
        champion=champion,
        cross_validation=cross_validation,
    )
    return metrics, measured


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Floats rounded for JSON, recursively (nan becomes null)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, float):
            out[k] = _round(v)
        elif isinstance(v, dict):
            out[k] = _rounded(v)
        elif isinstance(v, list):
            out[k] = [_rounded(i) if isinstance(i, dict) else (_round(i) if isinstance(i, float) else i) for i in v]
        else:
            out[k] = v
    return out


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _exports(cfg: JobConfig, model: nn.Module, splits: Splits) -> tuple[dict[str, Any], list[str]]:
    """The archive plus the requested exports (raw features in, checked against the float model on the
    test rows); returns the artifacts entry and one message per requested export that was not written."""
    run_dir = cfg.run_dir
    mar = build_mar(run_dir / "model", run_dir / "model-store", cfg.output.model_name, cfg.output.version)
    prep = Preprocessing.of(splits.normalization, splits.task)
    signature = ModelSignature(
        task=splits.task,
        feature_names=splits.feature_names,
        class_labels=splits.class_labels,
        num_outputs=splits.num_outputs,
        prep=prep,
        encoding=splits.input_schema() if splits.encoding else None,
    )
    results = run_exports(
        model, signature, prep.raw_rows(splits.x_test), prep.raw_targets(splits.y_test),
        run_dir / "exports", cfg.output.export_formats, cfg.output.max_export_drop,
    )  # fmt: skip
    out: dict[str, Any] = {"modelArchive": _relative(mar, cfg.artifact_root)}
    out["exports"] = [
        {**r.to_json(), **({"path": _relative(Path(r.path), cfg.artifact_root)} if r.path else {})} for r in results
    ]
    if cfg.output.export_formats:
        out["exportSchema"] = _relative(run_dir / "exports" / SCHEMA_FILE, cfg.artifact_root)
    return out, export_failures(results)


def _metadata(
    cfg: JobConfig, splits: Splits, summary: dict[str, Any], metrics: dict[str, Any], results: list[ThresholdResult]
) -> dict[str, Any]:
    ds = cfg.dataset
    return {
        "name": cfg.name,
        "namespace": cfg.namespace,
        "model": cfg.model.to_dict(),
        "output": {"modelName": cfg.output.model_name, "version": cfg.output.version},
        "dataset": {
            "source": ds.source,
            "name": {"file": ds.path, "uri": ds.uri}.get(ds.source, ds.name),
            # Where the table came from and its exact bytes (source file and uri; None for builtin/synthetic).
            "uri": ds.uri or None,
            "sha256": splits.source_sha256,
            "format": splits.source_format,
            "featureColumns": splits.input_columns if splits.source_sha256 else None,
            "timestampColumn": ds.timestamp_column or None,
            "task": ds.task,
            "split": ds.split,
            "seed": ds.seed,
            "validationFraction": ds.validation_fraction,
            "testFraction": ds.test_fraction,
            "fingerprint": splits.fingerprint,
            "rows": {"train": len(splits.x_train), "validation": len(splits.x_val), "test": len(splits.x_test)},
            # Rows dropped (missingValues: dropRows), missing cells per column, unseen categories.
            "dataReport": splits.data_report,
        },
        "image": os.environ.get("FLOWNEXUS_IMAGE", "unknown"),
        "training": summary,
        "metrics": metrics,
        "thresholds": cfg.validation.to_dict(),
        "results": [r.to_json() for r in results],
        "verdict": {"passed": not failed(results), "failedThresholds": [r.name for r in failed(results)]},
        "validatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def validate(cfg: JobConfig) -> dict[str, Any]:
    """Run the whole gate for one TrainingJob and return what went into validation.json."""
    run_dir = cfg.run_dir
    model, _ = load_trained_model(run_dir / "model")
    summary = json.loads((run_dir / "training_summary.json").read_text(encoding="utf-8"))
    splits = load_splits(cfg.dataset, cfg.artifact_root)
    if summary.get("datasetFingerprint") not in (None, splits.fingerprint):
        raise RuntimeError(
            f"dataset changed since training: {summary['datasetFingerprint']} then, {splits.fingerprint} now"
        )
    history = read_history(run_dir / "metrics.jsonl")
    champion = score_champion(cfg, splits)
    folds = None
    if cfg.validation.cross_validation is not None and cfg.model.architecture == "custom":
        raise ValueError(
            "validation.crossValidation retrains the built-in architecture on each fold; "
            "a custom trainer's model (model.architecture custom) cannot be cross-validated"
        )
    if cfg.validation.cross_validation is not None:
        cpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
        folds = cross_validate(cfg, splits, cpu)
    metrics, measured = measure(model, splits, history, bool(summary.get("stoppedEarly")), champion, folds)
    results = evaluate_thresholds(cfg.validation, measured)
    passed = not failed(results)
    metadata = _metadata(cfg, splits, summary, metrics, results)
    artifacts: dict[str, Any] = {
        "report": _relative(run_dir / "report.md", cfg.artifact_root),
        "metadata": _relative(run_dir / "metadata.json", cfg.artifact_root),
    }
    if history:
        plot_curves(history, run_dir / "training_curves.png")
        artifacts["plot"] = _relative(run_dir / "training_curves.png", cfg.artifact_root)
    if passed:
        exported, export_problems = _exports(cfg, model, splits)
        artifacts.update(exported)
        # An export the spec asked for that is not faithful to the float model rejects the model: the user
        # asked for that file. Nothing of a rejected model stays where it could be shipped.
        results += [
            ThresholdResult("maxExportDrop", None, cfg.output.max_export_drop, False, f"maxExportDrop: {problem}")
            for problem in export_problems
        ]
        passed = not failed(results)
        metadata["results"] = [r.to_json() for r in results]
        metadata["verdict"] = {"passed": passed, "failedThresholds": [r.name for r in failed(results)]}
    if not passed:
        # Only a validated model may be served: drop an archive a previous, passing run left behind.
        (run_dir / "model-store" / f"{cfg.output.model_name}.mar").unlink(missing_ok=True)
        artifacts.pop("modelArchive", None)
        withdraw_exports(artifacts, cfg.artifact_root)
    metadata["artifacts"] = artifacts
    atomic_write_bytes(run_dir / "metadata.json", json.dumps(metadata, indent=2).encode())
    atomic_write_bytes(run_dir / "report.md", render_report(metadata, results, "training_curves.png").encode())
    verdict = {
        "passed": passed,
        "failedThresholds": [{"name": r.name, "message": r.message} for r in failed(results)],
        "results": [r.to_json() for r in results],
        "metrics": metrics,
        "artifacts": artifacts,
        "artifactRoot": str(cfg.artifact_root),
        "runDir": _relative(run_dir, cfg.artifact_root),
    }
    atomic_write_bytes(run_dir / "validation.json", json.dumps(verdict, indent=2).encode())
    log.info(
        "%s/%s: validation %s%s", cfg.namespace, cfg.name, "passed" if passed else "FAILED",
        "".join(f"; {r.message}" for r in failed(results)),
    )  # fmt: skip
    return verdict


def termination_summary(verdict: dict[str, Any]) -> dict[str, Any]:
    """What the operator copies into ``status.validation``; paths are relative to the artifact root."""
    metrics, latency = verdict["metrics"], verdict["metrics"]["latencyMs"]
    return {
        "passed": verdict["passed"],
        "failed": [f["message"] for f in verdict["failedThresholds"]],
        "testAccuracy": metrics.get("testAccuracy"),
        "testRmse": metrics.get("testRmse"),
        "testR2": metrics.get("testR2"),
        "balancedAccuracy": metrics.get("testBalancedAccuracy"),
        "macroF1": metrics.get("testMacroF1"),
        "rocAuc": metrics.get("testRocAuc"),
        "accuracyInterval": _short_list(metrics.get("accuracyInterval")),
        "baselines": {
            "trivial": _short(metrics.get("baselineTrivial")),
            "linear": _short(metrics.get("baselineLinear")),
        },
        "overfittingGap": _short(metrics.get("overfittingGap")),
        "champion": _champion_summary(metrics),
        "latencyP50Ms": round(latency["p50"], 4),
        "latencyP95Ms": round(latency["p95"], 4),
        "latencyP99Ms": round(latency["p99"], 4),
        "converged": metrics.get("converged"),
        **(
            {"crossValidation": {"mean": _short(cv["mean"]), "std": _short(cv["std"])}}
            if (cv := metrics.get("crossValidation"))
            else {}
        ),
        "runDir": verdict["runDir"],
        "modelArchive": verdict["artifacts"].get("modelArchive"),
    }


def _short(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _short_list(values: list[float] | None) -> list[float] | None:
    return None if values is None else [round(v, 4) for v in values]


def _champion_summary(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The champion in a few bytes: its ModelDeployment, its score, and the challenger's."""
    champ = (metrics.get("quality") or {}).get("champion")
    if not champ:
        return None
    key = metrics["quality"]["primaryMetric"]
    test_key = f"test{key[0].upper()}{key[1:]}"
    return {
        "modelDeployment": champ["modelDeployment"],
        "score": _short(champ.get(key)),
        "challenger": _short(metrics.get(test_key)),
        **({"error": str(champ["error"])[:200]} if champ.get("error") else {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="config JSON (default: $FLOWNEXUS_CONFIG)")
    parser.add_argument("--termination-log", default=str(TERMINATION_LOG))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config)
        verdict = validate(cfg)
    except Exception as exc:
        log.exception("validation could not run")
        write_termination_message({"passed": False, **failure_summary(exc)}, Path(args.termination_log))
        return 2
    write_termination_message(termination_summary(verdict), Path(args.termination_log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
