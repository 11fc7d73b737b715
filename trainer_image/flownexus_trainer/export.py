"""Exports of a validated model: the TorchServe archive (always), TorchScript, int8, ONNX.

Every optional export takes RAW feature rows, exactly what a client sends: the training split's
standardization (and, for regression, the target's de-standardization) is part of the exported graph
(:class:`RawInputModel`). ``exports/schema.json`` describes the input and output of those files.

Each written file is loaded back and run on the test rows next to the float model; the agreement
(argmax agreement and accuracy drop for classification, max abs diff and R² drop for regression) is
recorded per export. An export whose drop in the primary metric exceeds ``output.maxExportDrop`` is
recorded as failed, with a message naming the export, the drop and the limit, and its file is removed.
A failing or skipped export never raises: the caller decides what a failure means for the verdict.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent
ARCHIVE_FILES = ("model_config.json", "normalization.json")

SCHEMA_VERSION = 1
SCHEMA_FILE = "schema.json"
ONNX_OPSET = 18
DEFAULT_MAX_EXPORT_DROP = 0.02
INPUT_NAME, OUTPUT_NAME = "inputs", "outputs"
FILES = {"torchscript": "model.torchscript.pt", "int8": "model.int8.torchscript.pt", "onnx": "model.onnx"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
BATCH_CHECK_ROWS = 64  # rows also run one at a time to measure how much an answer depends on its batch

Runner = Callable[[torch.Tensor], torch.Tensor]


# --- the archive ---------------------------------------------------------------------------------


def is_torchscript_model(model_dir: Path) -> bool:
    """A custom trainer's model (flownexus_trainer.sdk): ``model.pt`` is TorchScript that takes raw feature rows."""
    spec = json.loads((model_dir / "model_config.json").read_text(encoding="utf-8"))
    return bool(spec.get("format") == "torchscript")


def stage_archive(model_dir: Path, staging: Path) -> dict[str, Path]:
    """Lay out the files an archive holds; also used by tests to mimic an unpacked archive.

    A custom trainer's TorchScript model goes in as it is, without a model file: TorchServe's BaseHandler then
    loads it with ``torch.jit.load``, so serving needs none of the user's Python code.
    """
    staging.mkdir(parents=True, exist_ok=True)
    if is_torchscript_model(model_dir):
        shutil.copyfile(model_dir / "model.pt", staging / "model.pt")
        shutil.copyfile(PACKAGE_DIR / "handler.py", staging / "flownexus_handler.py")
        for name in ARCHIVE_FILES:
            shutil.copyfile(model_dir / name, staging / name)
        return {"serialized": staging / "model.pt", "handler": staging / "flownexus_handler.py"}
    weights = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    # ServedModel wraps the network as ``net``, so its state-dict keys carry that prefix.
    torch.save({f"net.{k}": v for k, v in weights.items()}, staging / "model.pt")
    shutil.copyfile(PACKAGE_DIR / "served_model.py", staging / "served_model.py")
    shutil.copyfile(PACKAGE_DIR / "models.py", staging / "flownexus_models.py")
    shutil.copyfile(PACKAGE_DIR / "handler.py", staging / "flownexus_handler.py")
    for name in ARCHIVE_FILES:
        shutil.copyfile(model_dir / name, staging / name)
    return {
        "serialized": staging / "model.pt",
        "model_file": staging / "served_model.py",
        "handler": staging / "flownexus_handler.py",
        "extra": staging / "flownexus_models.py",
    }


def build_mar(model_dir: Path, out_dir: Path, model_name: str, version: str) -> Path:
    """Run torch-model-archiver; returns ``<out_dir>/<model_name>.mar``."""
    staging = out_dir / f".staging-{model_name}"
    shutil.rmtree(staging, ignore_errors=True)
    files = stage_archive(model_dir, staging)
    extra = [*([files["extra"]] if "extra" in files else []), *(staging / name for name in ARCHIVE_FILES)]
    model_file = ["--model-file", str(files["model_file"])] if "model_file" in files else []
    cmd = [
        sys.executable, "-m", "model_archiver.model_packaging",
        "--model-name", model_name,
        "--version", version,
        *model_file,
        "--serialized-file", str(files["serialized"]),
        "--handler", str(files["handler"]),
        "--extra-files", ",".join(str(p) for p in extra),
        "--export-path", str(out_dir),
        "--force",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    shutil.rmtree(staging, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return out_dir / f"{model_name}.mar"


# --- what the exported graphs contain ------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """The training split's standardization, as the exported graph applies it (see ``data.Normalization``)."""

    mean: list[float]
    std: list[float]
    target_mean: float = 0.0
    target_std: float = 1.0
    regression: bool = False

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"normalization: {len(self.mean)} means but {len(self.std)} stds")
        bad = [i for i, s in enumerate(self.std) if not (math.isfinite(s) and s > 0)]
        if bad:
            raise ValueError(f"normalization.std[{bad[0]}]: must be a finite number > 0, got {self.std[bad[0]]!r}")
        if not (math.isfinite(self.target_std) and self.target_std > 0):
            raise ValueError(f"normalization.targetStd: must be a finite number > 0, got {self.target_std!r}")

    @classmethod
    def of(cls, normalization: Any, task: str) -> Preprocessing:
        """From a ``data.Normalization`` (or anything with its four fields) and the task."""
        return cls(
            mean=[float(v) for v in normalization.mean],
            std=[float(v) for v in normalization.std],
            target_mean=float(normalization.target_mean),
            target_std=float(normalization.target_std),
            regression=task == "regression",
        )

    def raw_rows(self, standardized: NDArray[Any]) -> NDArray[np.float32]:
        """Undo the standardization: the rows a client would have sent."""
        rows = np.asarray(standardized, np.float32) * np.asarray(self.std, np.float32)
        return (rows + np.asarray(self.mean, np.float32)).astype(np.float32)

    def raw_targets(self, standardized: NDArray[Any]) -> NDArray[Any]:
        if not self.regression:
            return np.asarray(standardized)
        return (np.asarray(standardized, np.float64) * self.target_std + self.target_mean).astype(np.float32)


class _Standardization(nn.Module):
    """The input standardization and (regression) the target's scale, as frozen parameters of a module.

    Frozen parameters rather than buffers: TorchScript cannot read class-level buffer annotations under postponed
    evaluation, and without them mypy cannot type the attributes. Classification keeps logits (scale 1, shift 0).
    """

    def __init__(self, prep: Preprocessing) -> None:
        super().__init__()

        def frozen(value: list[float] | float) -> nn.Parameter:
            return nn.Parameter(torch.tensor(value, dtype=torch.float32), requires_grad=False)

        self.mean = frozen(prep.mean)
        self.std = frozen(prep.std)
        scale, shift = (prep.target_std, prep.target_mean) if prep.regression else (1.0, 0.0)
        self.out_scale = frozen(scale)
        self.out_shift = frozen(shift)


class RawInputModel(_Standardization):
    """Raw features in; standardize, run the network, and (regression) return the target in its own units."""

    def __init__(self, net: nn.Module, prep: Preprocessing) -> None:
        super().__init__(prep)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net((x - self.mean) / self.std)
        return out * self.out_scale + self.out_shift


class StandardizedInput(_Standardization):
    """A custom trainer's raw-feature TorchScript model seen as a built-in network: standardized rows in, logits or
    standardized targets out, so the validator measures it with the same code. ``raw`` is the loaded graph."""

    def __init__(self, raw: nn.Module, prep: Preprocessing) -> None:
        super().__init__(prep)
        self.raw = raw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.raw(x * self.std + self.mean)
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        return (out - self.out_shift) / self.out_scale


class RowWise(nn.Module):
    """Run the wrapped module one row at a time.

    Dynamic int8 quantization picks the activation scale from the whole input tensor, so in a batch a
    row's answer would depend on the other rows; one row at a time it depends on that row only.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(row) for row in torch.split(x, 1)])


# --- building the exports ------------------------------------------------------------------------


def _check_same(reference: nn.Module, exported: Any, example: torch.Tensor, atol: float) -> None:
    with torch.no_grad():
        for batch in (example[:1], example):
            diff = (reference(batch) - exported(batch)).abs().max().item()
            if diff > atol:
                raise RuntimeError(f"exported model differs from the eager one by {diff:.3g} (batch {len(batch)})")


def to_torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Script the model (trace as a fallback), then check it matches eager on batch 1 and batch N."""
    model.eval()
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but still the format many runtimes load; users ask for it.
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(model)
        except Exception as exc:  # scripting fails on some layers; tracing is the fallback
            log.info("torch.jit.script failed (%s); tracing instead", exc)
            # Our own comparison below replaces trace's sanity check, which the fused attention path trips.
            scripted = torch.jit.trace(model, example, check_trace=False)  # type: ignore[no-untyped-call]
    _check_same(model, scripted, example, atol=1e-4)
    return scripted


def quantizable_layers(model: nn.Module) -> set[str]:
    """Linear and LSTM layers that dynamic int8 can replace.

    Layers inside a TransformerEncoderLayer are left in float: its fused fast path reads their
    ``.weight`` as a tensor, which a quantized Linear no longer has.
    """
    encoders = [name for name, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)]
    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.LSTM)) and not any(name.startswith(f"{e}.") for e in encoders)
    }


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization (weights int8, activations quantized on the fly); ``model`` is not changed."""
    with warnings.catch_warnings():
        # torch.ao.quantization warns it is moving to torchao; torchao is not in this image.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        spec = dict.fromkeys(quantizable_layers(model), default_dynamic_qconfig)
        quantized: nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            model.eval(), spec, dtype=torch.qint8, inplace=False
        )
        return quantized


def int8_model(model: nn.Module, prep: Preprocessing) -> nn.Module:
    """What the int8 file holds: float standardization around the quantized network, one row at a time."""
    return RowWise(RawInputModel(quantize_int8(model), prep)).eval()


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    to_torchscript(model, example).save(str(path))


def missing_onnx_packages() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.onnx (dynamo exporter), one self-contained file, dynamic batch size."""
    # The exporter's registry warns, once per process, about torchvision ops this image has no use for.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=ONNX_OPSET,
            dynamo=True, external_data=False, verbose=False,
        )  # fmt: skip


def export_onnx_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX of a TorchScript graph (a custom trainer's model): torch.export cannot read TorchScript, so the
    TorchScript-based exporter, dynamic batch size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=ONNX_OPSET,
            dynamo=False,
        )  # fmt: skip


def load_torchscript_module(path: Path) -> torch.jit.ScriptModule:
    """A TorchScript file on the CPU, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated upstream
        loaded: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return loaded.eval()


def load_torchscript(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated upstream
        loaded = torch.jit.load(str(path))  # type: ignore[no-untyped-call]

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = loaded(x)
            return out

    return run


def load_onnx(path: Path) -> Runner:
    onnxruntime = importlib.import_module("onnxruntime")  # optional: run_exports checks it is installed
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]))

    return run


# --- checking an export against the float model --------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How an export answers the test rows compared with the float model."""

    task: str
    rows: int
    metric: str  # accuracy | r2
    float_score: float
    export_score: float
    max_abs_diff: float  # over the outputs: logits (classification) or target units (regression)
    argmax_agreement: float | None = None  # classification only
    batch_dependence: float | None = None  # max |batched - one row at a time| of the export's outputs

    @property
    def drop(self) -> float:
        return self.float_score - self.export_score

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rows": self.rows,
            "metric": self.metric,
            "float": round(self.float_score, 6),
            "export": round(self.export_score, 6),
            "drop": round(self.drop, 6),
            "maxAbsDiff": float(f"{self.max_abs_diff:.4g}"),
        }
        if self.argmax_agreement is not None:
            out["argmaxAgreement"] = round(self.argmax_agreement, 6)
        if self.batch_dependence is not None:
            out["batchDependence"] = float(f"{self.batch_dependence:.4g}")
        return out


def _r2(pred: NDArray[Any], y: NDArray[Any]) -> float:
    sst = float(((y - y.mean()) ** 2).sum()) or 1.0
    return 1.0 - float(((pred - y) ** 2).sum()) / sst


def compare(
    task: str, reference: NDArray[Any], exported: NDArray[Any], y: NDArray[Any], batch_dependence: float | None = None
) -> Agreement:
    """Pure: float-model outputs vs export outputs on the same raw rows, and the labels/targets ``y``."""
    reference, exported = np.asarray(reference, np.float64), np.asarray(exported, np.float64)
    if reference.shape != exported.shape:
        raise ValueError(f"export output shape {exported.shape} differs from the float model's {reference.shape}")
    diff = float(np.abs(reference - exported).max()) if reference.size else 0.0
    if not math.isfinite(diff):
        diff = math.inf
    if task == "classification":
        ref_cls, exp_cls = reference.argmax(-1), exported.argmax(-1)
        return Agreement(
            task, len(y), "accuracy",
            float_score=float((ref_cls == y).mean()), export_score=float((exp_cls == y).mean()),
            max_abs_diff=diff, argmax_agreement=float((ref_cls == exp_cls).mean()), batch_dependence=batch_dependence,
        )  # fmt: skip
    target = np.asarray(y, np.float64)
    return Agreement(
        task, len(y), "r2",
        float_score=_r2(reference.reshape(-1), target), export_score=_r2(exported.reshape(-1), target),
        max_abs_diff=diff, batch_dependence=batch_dependence,
    )  # fmt: skip


def measure_export(task: str, reference: Runner, exported: Runner, x_raw: torch.Tensor, y: NDArray[Any]) -> Agreement:
    """Run both on the whole test batch (and the export also row by row, on the first rows) and compare."""
    with torch.no_grad():
        ref = reference(x_raw).numpy()
        batched = exported(x_raw).numpy()
        head = x_raw[:BATCH_CHECK_ROWS]
        one_by_one = torch.cat([exported(row) for row in torch.split(head, 1)]).numpy() if len(head) else batched
    dependence = float(np.abs(batched[: len(head)].astype(np.float64) - one_by_one).max()) if len(head) else 0.0
    return compare(task, ref, batched, y, batch_dependence=dependence)


def gate_message(fmt: str, agreement: Agreement, max_drop: float) -> str | None:
    """None when the export may be kept, else why not (naming the export, the drop and the limit)."""
    # The tolerance keeps a drop equal to the limit (0.02 read back as 0.020000000000000018) inside it.
    if math.isfinite(agreement.drop) and math.isfinite(agreement.export_score) and agreement.drop <= max_drop + 1e-9:
        return None
    return (
        f"{fmt} export: test {agreement.metric} drop {agreement.drop:.4f} vs the float model "
        f"({agreement.float_score:.4f} -> {agreement.export_score:.4f} on {agreement.rows} rows) "
        f"exceeds output.maxExportDrop {max_drop:g}; the file was not kept"
    )


# --- results and the schema ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    format: str
    status: str  # written | skipped | failed
    path: str | None = None
    reason: str = ""
    size_bytes: int | None = None
    agreement: Agreement | None = None
    max_drop: float | None = None

    @property
    def passed(self) -> bool | None:
        """True when written, False when failed (error or too large a drop), None when skipped."""
        return {"written": True, "failed": False}.get(self.status)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format, "status": self.status, "passed": self.passed}
        out.update(path=self.path, reason=self.reason, sizeBytes=self.size_bytes)
        if self.agreement is not None:
            out["check"] = {**self.agreement.to_json(), "maxDrop": self.max_drop}
        return {k: v for k, v in out.items() if v not in (None, "")}


def export_failures(results: list[ExportResult]) -> list[str]:
    """One message per export that was asked for and not written (skipped ones excluded)."""
    return [r.reason for r in results if r.status == "failed"]


@dataclass(frozen=True)
class ModelSignature:
    """What schema.json states about the model's input and output."""

    task: str
    feature_names: list[str]
    class_labels: list[str]
    num_outputs: int
    prep: Preprocessing
    # Declared categorical columns (``Splits.input_schema()``): {"columns": [...], "categorical": {col: [cat]}}.
    encoding: dict[str, Any] | None = None


def build_schema(sig: ModelSignature, results: list[ExportResult]) -> dict[str, Any]:
    """Pure: the versioned description of what the exported files take and return."""
    classification = sig.task == "classification"
    files: dict[str, Any] = {}
    for r in results:
        if r.status != "written" or r.path is None:
            continue
        entry: dict[str, Any] = {"file": Path(r.path).name, "runtime": "onnxruntime" if r.format == "onnx" else "torch"}
        if r.format == "onnx":
            entry["opset"] = ONNX_OPSET
        if r.format == "int8":
            entry["quantization"] = "dynamic int8 (Linear/LSTM weights int8, activations per row)"
        files[r.format] = entry
    schema: dict[str, Any] = {
        "schemaVersion": SCHEMA_VERSION,
        "task": sig.task,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", len(sig.feature_names)],
            "featureNames": list(sig.feature_names),
            "features": "raw",
            "standardizedInGraph": True,
            "encoding": dict(sig.encoding) if sig.encoding else None,
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", sig.num_outputs],
            "kind": "logits" if classification else "value",
            "classLabels": list(sig.class_labels) if classification else [],
            "targetDestandardizedInGraph": not classification,
        },
        "normalization": {
            "mean": sig.prep.mean,
            "std": sig.prep.std,
            "targetMean": sig.prep.target_mean,
            "targetStd": sig.prep.target_std,
        },
        "exports": files,
    }
    if sig.encoding:
        schema["input"]["note"] = (
            "the graph takes the already one-hot-encoded numeric row in featureNames order: each categorical "
            "column of input.encoding.columns becomes one 0/1 feature per category, named column=category"
        )
    return schema


# --- running them --------------------------------------------------------------------------------


def _build(fmt: str, model: nn.Module, prep: Preprocessing, example: torch.Tensor, path: Path) -> Runner:
    """Write one export file and return a runner over the file as written."""
    if isinstance(model, StandardizedInput):
        # A custom trainer's model is already a raw-feature TorchScript graph: it is the export.
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.save is deprecated upstream
                torch.jit.save(model.raw, str(path))
            return load_torchscript(path)
        if fmt == "onnx":
            export_onnx_torchscript(model.raw, example, path)
            return load_onnx(path)
    if fmt == "torchscript":
        export_torchscript(RawInputModel(model, prep).eval(), example, path)
        return load_torchscript(path)
    if fmt == "int8":
        export_torchscript(int8_model(model, prep), example, path)
        return load_torchscript(path)
    export_onnx(RawInputModel(model, prep).eval(), example, path)
    return load_onnx(path)


def run_exports(
    model: nn.Module,
    sig: ModelSignature,
    x_raw: NDArray[Any],
    y: NDArray[Any],
    out_dir: Path,
    formats: list[str],
    max_drop: float = DEFAULT_MAX_EXPORT_DROP,
) -> list[ExportResult]:
    """Write the requested exports (``torchscript``, ``int8``, ``onnx``) and ``schema.json`` into ``out_dir``.

    ``model`` is the float network on standardized inputs; ``x_raw``/``y`` are the test rows in the
    client's units (raw features; class indices or raw targets). Each result says written, skipped or
    failed, and why, with its agreement with the float model.
    """
    unknown = [f for f in formats if f not in FILES]
    if unknown:
        raise ValueError(f"exports: unknown format {unknown[0]!r}, expected one of {list(FILES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    reference_model = RawInputModel(model, sig.prep).eval()

    def reference(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = reference_model(x)
            return out

    rows = torch.from_numpy(np.ascontiguousarray(x_raw, dtype=np.float32))
    example = rows[:8]
    results: list[ExportResult] = []
    for fmt in formats:
        path = out_dir / FILES[fmt]
        path.unlink(missing_ok=True)  # never leave a previous run's file behind a failed export
        if fmt == "onnx" and (missing := missing_onnx_packages()):
            results.append(ExportResult(fmt, "skipped", reason=f"not installed in this image: {', '.join(missing)}"))
            continue
        if fmt == "int8" and isinstance(model, StandardizedInput):
            reason = "a custom trainer's TorchScript model cannot be quantized here: quantize it in the trainer"
            results.append(ExportResult(fmt, "skipped", reason=reason))
            continue
        try:
            agreement = measure_export(sig.task, reference, _build(fmt, model, sig.prep, example, path), rows, y)
        except Exception as exc:
            log.warning("export %s failed: %s", fmt, exc)
            path.unlink(missing_ok=True)
            results.append(ExportResult(fmt, "failed", reason=f"{fmt} export: {type(exc).__name__}: {exc}"))
            continue
        refused = gate_message(fmt, agreement, max_drop)
        if refused is not None:
            log.warning("%s", refused)
            path.unlink(missing_ok=True)
            results.append(ExportResult(fmt, "failed", reason=refused, agreement=agreement, max_drop=max_drop))
            continue
        size = path.stat().st_size
        results.append(ExportResult(fmt, "written", str(path), size_bytes=size, agreement=agreement, max_drop=max_drop))
    if formats:
        schema = build_schema(sig, results)
        (out_dir / SCHEMA_FILE).write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    return results
