"""Optional exports work for every architecture, and a failing one is recorded, not raised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flownexus_trainer.export import run_exports
from flownexus_trainer.models import build_model
from tests.unit.trainer.test_models import SPECS


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("arch", SPECS)
def test_torchscript_and_int8_exports_load_and_match(arch: str, tmp_path: Path) -> None:
    model = build_model(SPECS[arch], num_features=5, num_outputs=3).eval()
    example = torch.randn(6, 5)
    results = {r.format: r for r in run_exports(model, example, tmp_path, torchscript=True, int8=True, onnx=False)}
    assert results["torchscript"].status == "written", results["torchscript"].reason
    assert results["int8"].status == "written", results["int8"].reason
    loaded = torch.jit.load(str(tmp_path / "model.torchscript.pt"))  # type: ignore[no-untyped-call]
    assert torch.allclose(loaded(example[:2]), model(example[:2]), atol=1e-4)
    quantized = torch.jit.load(str(tmp_path / "model.int8.torchscript.pt"))  # type: ignore[no-untyped-call]
    assert quantized(example).shape == (6, 3)


def test_onnx_is_skipped_with_a_reason_when_the_module_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    model = build_model(SPECS["mlp"], num_features=5, num_outputs=3)
    [result] = run_exports(model, torch.randn(2, 5), tmp_path, torchscript=False, int8=False, onnx=True)
    assert result.status == "skipped" and "onnx" in result.reason


def test_a_failing_export_is_recorded_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("no space left on device")

    monkeypatch.setattr("flownexus_trainer.export.export_torchscript", broken)
    model = build_model(SPECS["mlp"], num_features=5, num_outputs=3)
    [result] = run_exports(model, torch.randn(2, 5), tmp_path, torchscript=True, int8=False, onnx=False)
    assert result.status == "failed" and "no space left" in result.reason
