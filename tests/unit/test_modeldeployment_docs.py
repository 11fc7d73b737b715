"""The Argo CD health check in docs/MODELDEPLOYMENT.md, run with Lua 5.1 (gopher-lua's dialect) on objects in
every phase; and the example manifest's ModelDeployment."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LUA = shutil.which("lua5.1")


def health_check_script() -> str:
    doc = (ROOT / "docs" / "MODELDEPLOYMENT.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", doc, flags=re.S):
        parsed = yaml.safe_load(block)
        if isinstance(parsed, dict) and parsed.get("kind") == "ConfigMap":
            script: str = parsed["data"]["resource.customizations.health.flownexus.io_ModelDeployment"]
            return script
    raise AssertionError("no argocd-cm health check in docs/MODELDEPLOYMENT.md")


def lua_literal(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # Control characters (the JSON in a last-applied-configuration annotation has newlines) as \ddd escapes.
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(f"\\{ord(c):03d}" if ord(c) < 32 or ord(c) == 127 else c for c in escaped) + '"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    return "{" + ", ".join(f"[{lua_literal(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    assert LUA is not None
    program = (
        f"obj = {lua_literal(obj)}\n"
        f"local function check()\n{health_check_script()}\nend\n"
        'local hs = check()\nio.write(hs.status .. "\\n" .. hs.message)\n'
    )
    done = subprocess.run([LUA, "-"], input=program, capture_output=True, text=True, check=True)
    status, _, message = done.stdout.partition("\n")
    return status, message


def md(phase: str | None, generation: int = 2, observed: int | None = 2, **conditions: str) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase is not None:
        status = {
            "phase": phase,
            "message": f"in {phase}",
            "observedGeneration": observed,
            "conditions": [{"type": t, "status": s} for t, s in conditions.items()],
        }
    return {"metadata": {"name": "digits", "generation": generation}, "status": status}


@pytest.mark.skipif(LUA is None, reason="lua5.1 is not installed (apt-get install lua5.1)")
@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (md(None), "Progressing"),
        (md("Available", observed=1, Ready="True"), "Progressing"),  # the operator has not seen the new spec
        (md("Pending", Ready="False", Progressing="False", Degraded="False"), "Progressing"),
        (md("Progressing", Ready="False", Progressing="True", Degraded="False"), "Progressing"),
        (md("Available", Ready="True", Progressing="False", Degraded="False"), "Healthy"),
        (md("Available", Ready="False", Progressing="True", Degraded="False"), "Progressing"),  # waiting for model
        (md("Canary", Ready="False", Progressing="True", Degraded="False"), "Progressing"),
        (md("Promoting", Ready="False", Progressing="True", Degraded="False"), "Progressing"),
        (md("RolledBack", Ready="False", Progressing="False", Degraded="True"), "Degraded"),
        (md("Failed", Degraded="True"), "Degraded"),
    ],
)
def test_argocd_health_check(obj: dict[str, Any], expected: str) -> None:
    status, message = health(obj)
    assert status == expected
    assert message


def test_example_serves_the_digits_trainingjob() -> None:
    docs = list(yaml.safe_load_all((ROOT / "examples" / "modeldeployment-digits.yaml").read_text()))
    (mdep,) = [d for d in docs if d["kind"] == "ModelDeployment"]
    tj = yaml.safe_load((ROOT / "examples" / "trainingjob-digits.yaml").read_text())
    assert mdep["spec"]["model"]["trainingJobRef"]["name"] == tj["metadata"]["name"]
    assert mdep["spec"]["model"]["version"] == tj["spec"]["output"]["version"]
