"""First step of the validator pod (trainer image, an init container): everything but the latency gate.

``python -m flownexus_trainer.candidate`` runs the validator (``validate.validate``) with ``maxLatencyP95Ms``
left out, because the gate's latency is measured next, in the server image, with the model behind TorchServe
(``flownexus_trainer.served_latency``). It leaves in the hand-over directory (``$FLOWNEXUS_CANDIDATE_DIR``, an
emptyDir of the validator pod; ``<runDir>/candidate`` outside a pod):

- ``<model>.mar``: the archive, built whether or not quality passed (the latency is reported either way);
  it reaches ``model-store/`` only when the served step passes the whole gate;
- ``requests.json``: test rows as a client sends them (raw features, before standardization), at most
  ``MAX_ROWS``;
- ``verdict.json``: the verdict so far, with the termination summary ``validate`` would have written; or
  ``{"error": ..., "retryable": ...}`` when validation could not run.

It exits 0 even when validation could not run, as long as it could record that in ``verdict.json``: the pod's
termination message comes from the served step (the main container), which relays the error and fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from . import validate
from .checkpoint import atomic_write_bytes
from .config import JobConfig, load_config
from .data import Normalization, load_splits
from .errors import TERMINATION_LOG, failure_summary, write_termination_message
from .export import build_mar
from .served_latency import REQUESTS_FILE, VERDICT_FILE, candidate_dir

log = logging.getLogger(__name__)

MAX_ROWS = 1000


def raw_rows(x_standardized: Any, normalization: Normalization, limit: int = MAX_ROWS) -> list[list[float]]:
    """Undo the standardization: the features as a client of the served model sends them."""
    return [[round(float(v), 6) for v in row] for row in normalization.invert(x_standardized[:limit])]


def without_latency_gate(cfg: JobConfig) -> JobConfig:
    """The config with ``maxLatencyP95Ms`` off: the served step applies it to the served latency."""
    return dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, max_latency_p95_ms=None))


def stage(cfg: JobConfig) -> dict[str, Any]:
    """Validate everything but latency, and leave the archive, the request rows and the verdict in candidate/."""
    run_dir = cfg.run_dir
    out = candidate_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.output.model_name
    verdict = validate.validate(without_latency_gate(cfg))
    built = run_dir / "model-store" / f"{name}.mar"
    staged = out / f"{name}.mar"
    if built.exists():  # quality passed: validate wrote the archive where a served model's goes
        # A move, not os.replace: in the pod the hand-over dir is an emptyDir, another filesystem than the store.
        shutil.move(built, staged)
    else:
        build_mar(run_dir / "model", out, name, cfg.output.version)
    artifacts = dict(verdict["artifacts"])
    artifacts.pop("modelArchive", None)
    artifacts["candidateArchive"] = validate._relative(staged, cfg.artifact_root)
    splits = load_splits(cfg.dataset, cfg.artifact_root)
    rows = raw_rows(splits.x_test, splits.normalization)
    atomic_write_bytes(out / REQUESTS_FILE, json.dumps({"rows": rows}, separators=(",", ":")).encode())
    candidate = {
        **verdict,
        "artifacts": artifacts,
        "task": splits.task,
        "maxLatencyP95Ms": cfg.validation.max_latency_p95_ms,
        "summary": validate.termination_summary({**verdict, "artifacts": artifacts}),
    }
    atomic_write_bytes(out / VERDICT_FILE, json.dumps(candidate, indent=2).encode())
    # validation.json is the final verdict only: the served step writes it.
    (run_dir / "validation.json").unlink(missing_ok=True)
    return candidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="config JSON (default: $FLOWNEXUS_CONFIG)")
    parser.add_argument("--termination-log", default=str(TERMINATION_LOG))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config)
    except Exception as exc:
        log.exception("validation could not run")
        write_termination_message({"passed": False, **failure_summary(exc)}, Path(args.termination_log))
        return 2
    verdict_path = candidate_dir(cfg.run_dir) / VERDICT_FILE
    try:
        verdict_path.unlink(missing_ok=True)  # a previous pod's verdict must not stand in for this one's
        candidate = stage(cfg)
        # For people (kubectl describe); the operator reads the served step's message, not this one.
        write_termination_message(candidate["summary"], Path(args.termination_log))
    except Exception as exc:
        log.exception("validation could not run")
        failure = {"passed": False, **failure_summary(exc)}
        write_termination_message(failure, Path(args.termination_log))
        try:
            verdict_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(verdict_path, json.dumps(failure).encode())
        except OSError:
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
