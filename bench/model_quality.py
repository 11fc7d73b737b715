"""Model quality with DEFAULT settings: every builtin dataset x every architecture, next to scikit-learn.

Each architecture trains with the TrainingJob defaults (only ``model.architecture`` is set), in
process and on one process, through the real ``Trainer``; the best-validation weights are scored
on the test split. The scikit-learn baselines (SVC, LogisticRegression, MLPClassifier; Ridge, SVR,
MLPRegressor for the regression set) fit on the same standardized train split from
``data.load_splits`` and score on the same test split. Classification reports test accuracy and
balanced accuracy, regression R². Also reports each run's convergence verdict
(``thresholds.assess_convergence``), and one synthetic sequence task (noisy waves, class = frequency)
where the lstm reads a 32-step window. Usage: ``python bench/model_quality.py [--datasets digits,iris]
[--archs mlp,lstm] [--no-sequence]``; a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, balanced_accuracy_score, r2_score
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.svm import SVC, SVR

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))

from flownexus_trainer.config import ARCHITECTURES, BUILTIN_DATASETS, JobConfig
from flownexus_trainer.data import Splits, load_splits
from flownexus_trainer.distributed import DistContext
from flownexus_trainer.progress import Progress
from flownexus_trainer.thresholds import assess_convergence
from flownexus_trainer.train import Trainer

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
SEQUENCE_FILE = "sequence.npz"


class History:
    """A ProgressSink keeping each epoch's status record (what validate.py reads from metrics.jsonl)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def report(self, progress: Progress) -> None:
        if progress.phase == "Running" and progress.metrics is not None:
            self.epochs.append(progress.metrics.status_json())


def sequence_dataset(
    rows: int = 1500, steps: int = 32, classes: int = 3, noise: float = 0.8, seed: int = 7
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Noisy sine windows with a random phase; the class is the frequency (1, 2 or 3 cycles per window).

    The label lives in the order of the values (the same values shuffled lose it), which is what an
    lstm reading the window step by step is for.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    t = np.arange(steps) / steps
    phase = rng.uniform(0, 2 * np.pi, (rows, 1))
    x = np.sin(2 * np.pi * (y[:, None] + 1) * t[None, :] + phase) + noise * rng.standard_normal((rows, steps))
    return x, y.astype(np.int64)


def dataset_spec(name: str) -> dict[str, Any]:
    if name == "sequence":
        return {"source": "file", "path": SEQUENCE_FILE, "targetColumn": "y", "task": "classification"}
    return {"source": "builtin", "name": name}


def train_one(root: Path, dataset: dict[str, Any], arch: str, model_extra: dict[str, Any]) -> dict[str, Any]:
    run = f"{dataset.get('name', 'sequence')}-{arch}"
    cfg = JobConfig.from_dict(
        {
            "name": run,
            "namespace": "bench",
            "model": {"architecture": arch, **model_extra},
            "dataset": dataset,
            "paths": {"artifactRoot": str(root), "runDir": str(root / "bench" / run)},
        }
    )
    sink = History()
    started = time.perf_counter()
    trainer = Trainer(cfg, SINGLE, sink)
    state = trainer.run()
    seconds = time.perf_counter() - started
    trainer.model.load_state_dict(state.best_state)
    trainer.model.eval()
    splits = trainer.splits
    with torch.no_grad():
        out = trainer.model(torch.from_numpy(splits.x_test))
    pred = out.argmax(-1).numpy() if splits.task == "classification" else out.squeeze(-1).numpy()
    converged, reason = assess_convergence(sink.epochs, state.stopped_early)
    return {
        "scores": scores(splits, pred),
        "seconds": seconds,
        "epochs": state.epoch,
        "planned": trainer.epochs,
        "steps": state.epoch * trainer.steps_per_epoch,
        "converged": converged,
        "reason": reason,
    }


def scores(splits: Splits, pred: NDArray[Any]) -> dict[str, float]:
    if splits.task == "classification":
        return {
            "accuracy": float(accuracy_score(splits.y_test, pred)),
            "balanced": float(balanced_accuracy_score(splits.y_test, pred)),
        }
    return {"r2": float(r2_score(splits.y_test, pred))}


def baselines(splits: Splits) -> dict[str, tuple[dict[str, float], float]]:
    if splits.task == "classification":
        models: dict[str, Any] = {
            "sklearn SVC": SVC(),
            "sklearn LogisticRegression": LogisticRegression(max_iter=5000),
            "sklearn MLPClassifier": MLPClassifier(max_iter=2000, random_state=0),
        }
    else:
        models = {
            "sklearn Ridge": Ridge(),
            "sklearn SVR": SVR(),
            "sklearn MLPRegressor": MLPRegressor(max_iter=2000, random_state=0),
        }
    # The rows the networks learn from: the train split (they use validation only to pick the epoch).
    out = {}
    for name, model in models.items():
        started = time.perf_counter()
        model.fit(splits.x_train, splits.y_train)
        out[name] = (scores(splits, model.predict(splits.x_test)), time.perf_counter() - started)
    return out


def fmt(s: dict[str, float]) -> str:
    if "r2" in s:
        return f"R² {s['r2']:.3f}"
    return f"acc {s['accuracy']:.3f}  bal {s['balanced']:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", default=",".join(BUILTIN_DATASETS))
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--no-sequence", action="store_true", help="skip the synthetic sequence task")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} thread), python {platform.python_version()}"
    )
    names = [n for n in args.datasets.split(",") if n]
    if not args.no_sequence:
        names.append("sequence")
    archs = [a for a in args.archs.split(",") if a]
    started_all = time.perf_counter()
    summary: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        x_seq, y_seq = sequence_dataset()
        np.savez(root / SEQUENCE_FILE, x=x_seq, y=y_seq)
        for name in names:
            spec = dataset_spec(name)
            cfg = JobConfig.from_dict({"dataset": spec, "paths": {"artifactRoot": str(root)}})
            splits = load_splits(cfg.dataset, root)
            key = "r2" if splits.task == "regression" else "accuracy"
            print(f"\n{name}: {len(splits.x_train)}/{len(splits.x_val)}/{len(splits.x_test)} rows, "
                  f"{splits.num_features} features, {splits.task}")  # fmt: skip
            best_ours, best_theirs = ("", -1e9), ("", -1e9)
            for arch in archs:
                r = train_one(root, spec, arch, {})
                verdict = "converged" if r["converged"] else "NOT converged"
                print(
                    f"  {arch:<27} {fmt(r['scores'])}  {r['seconds']:6.1f} s  {r['epochs']}/{r['planned']} epochs "
                    f"{r['steps']} steps  {verdict}: {r['reason']}"
                )
                if r["scores"][key] > best_ours[1]:
                    best_ours = (arch, r["scores"][key])
            for model_name, (s, seconds) in baselines(splits).items():
                print(f"  {model_name:<27} {fmt(s)}  {seconds:6.1f} s")
                if s[key] > best_theirs[1]:
                    best_theirs = (model_name, s[key])
            if archs:
                mark = ">=" if best_ours[1] >= best_theirs[1] else "<"
                summary.append(
                    f"  {name:<14} best ours {best_ours[0]} {best_ours[1]:.3f} {mark} "
                    f"best scikit-learn {best_theirs[0]} {best_theirs[1]:.3f}"
                )
    print("\nbest architecture vs best scikit-learn (test " + "accuracy / R²):")
    print("\n".join(summary))
    print(f"\nwall time: {time.perf_counter() - started_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
