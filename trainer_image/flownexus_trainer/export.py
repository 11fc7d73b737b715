"""Exports of a validated model: the TorchServe archive (always), TorchScript, dynamic int8, ONNX.

Each optional export is best effort: a failure or a missing dependency is recorded with its reason
in metadata.json and never turns a passed validation into a failed one.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent
ARCHIVE_FILES = ("model_config.json", "normalization.json")


@dataclass(frozen=True)
class ExportResult:
    format: str
    status: str  # written | skipped | failed
    path: str | None = None
    reason: str = ""
    size_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format, "status": self.status, "path": self.path, "reason": self.reason}
        out["sizeBytes"] = self.size_bytes
        return {k: v for k, v in out.items() if v not in (None, "")}


def stage_archive(model_dir: Path, staging: Path) -> dict[str, Path]:
    """Lay out the files an archive holds; also used by tests to mimic an unpacked archive."""
    staging.mkdir(parents=True, exist_ok=True)
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
    extra = [files["extra"], *(staging / name for name in ARCHIVE_FILES)]
    cmd = [
        sys.executable, "-m", "model_archiver.model_packaging",
        "--model-name", model_name,
        "--version", version,
        "--model-file", str(files["model_file"]),
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


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    to_torchscript(model, example).save(str(path))


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
    """Dynamic int8 quantization (weights int8, activations quantized on the fly)."""
    with warnings.catch_warnings():
        # torch.ao.quantization warns it is moving to torchao; torchao is not in this image.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        spec = dict.fromkeys(quantizable_layers(model), default_dynamic_qconfig)
        quantized: nn.Module = quantize_dynamic(model.eval(), spec, dtype=torch.qint8)  # type: ignore[no-untyped-call]
        return quantized


def export_int8(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    to_torchscript(quantize_int8(model), example).save(str(path))


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> ExportResult:
    if importlib.util.find_spec("onnx") is None:
        return ExportResult("onnx", "skipped", reason="the onnx package is not installed in this image")
    torch.onnx.export(
        model.eval(), (example,), str(path), input_names=["inputs"], output_names=["outputs"],
        dynamic_axes={"inputs": {0: "batch"}, "outputs": {0: "batch"}},
    )  # fmt: skip
    return ExportResult("onnx", "written", str(path), size_bytes=path.stat().st_size)


def run_exports(
    model: nn.Module, example: torch.Tensor, out_dir: Path, torchscript: bool, int8: bool, onnx: bool
) -> list[ExportResult]:
    """The optional exports the spec asked for; each result says written, skipped or failed, and why."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[ExportResult] = []
    jobs: list[tuple[str, bool, str]] = [
        ("torchscript", torchscript, "model.torchscript.pt"),
        ("int8", int8, "model.int8.torchscript.pt"),
        ("onnx", onnx, "model.onnx"),
    ]
    for fmt, wanted, filename in jobs:
        if not wanted:
            continue
        path = out_dir / filename
        try:
            if fmt == "torchscript":
                export_torchscript(model, example, path)
            elif fmt == "int8":
                export_int8(model, example, path)
            else:
                results.append(export_onnx(model, example, path))
                continue
            results.append(ExportResult(fmt, "written", str(path), size_bytes=path.stat().st_size))
        except Exception as exc:
            log.warning("export %s failed: %s", fmt, exc)
            results.append(ExportResult(fmt, "failed", reason=f"{type(exc).__name__}: {exc}"))
    return results
