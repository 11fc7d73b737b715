"""The Argo CD resource customizations in argocd/ (health check and resource actions of ModelDeployment and
TrainingJob), run with Lua 5.1, the dialect of Argo CD's gopher-lua: what each discovery enables, and that every
action's object is one the API accepts and the operator (decide) acts on."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from flownexus.api.common import VERSION_PATTERN
from flownexus.api.modeldeployment import ModelDeploymentSpec
from flownexus.api.trainingjob import RunPolicy
from flownexus.modeldeployment.decide import decide
from tests.factories import model_deployment
from tests.unit.test_canary import in_canary, obs
from tests.unit.test_modeldeployment_docs import health_check_script, lua_literal

ROOT = Path(__file__).resolve().parents[2]
CUSTOM = ROOT / "argocd" / "resource_customizations" / "flownexus.io"
LUA = shutil.which("lua5.1")
needs_lua = pytest.mark.skipif(LUA is None, reason="lua5.1 is not installed (apt-get install lua5.1)")

# Lua tables back to JSON (an empty table is an object), so that the test reads what the script returned.
ENCODE = r"""
local function encode(v)
  local t = type(v)
  if t == "nil" then return "null" end
  if t == "boolean" then return tostring(v) end
  if t == "number" then return tostring(v) end
  if t == "string" then return (string.format("%q", v):gsub("\\\n", "\\n")) end
  if #v > 0 then
    local parts = {}
    for _, x in ipairs(v) do table.insert(parts, encode(x)) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(v) do table.insert(keys, k) end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do table.insert(parts, string.format("%q", k) .. ":" .. encode(v[k])) end
  return "{" .. table.concat(parts, ",") .. "}"
end
"""


def run_lua(script: str, obj: dict[str, Any]) -> Any:
    assert LUA is not None
    program = f"{ENCODE}\nobj = {lua_literal(obj)}\nlocal function run()\n{script}\nend\nio.write(encode(run()))\n"
    done = subprocess.run([LUA, "-"], input=program, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def md_script(*parts: str) -> str:
    return (CUSTOM / "ModelDeployment" / Path(*parts)).read_text()


def tj_script(*parts: str) -> str:
    return (CUSTOM / "TrainingJob" / Path(*parts)).read_text()


def md_obj(phase: str | None = None, paused: bool | None = None, canary: bool = False) -> dict[str, Any]:
    obj = model_deployment()
    obj["metadata"]["generation"] = 7
    if paused is not None:
        obj["spec"]["rollout"] = {"paused": paused}
    if phase is not None:
        obj["status"] = {"phase": phase, **({"canary": {"version": "2.0.0", "weight": 5}} if canary else {})}
    return obj


def enabled(discovered: dict[str, Any]) -> set[str]:
    return {name for name, flags in discovered.items() if not flags.get("disabled")}


# ---- discovery ------------------------------------------------------------------------------------


@needs_lua
@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (md_obj(), {"pause"}),
        (md_obj("Available"), {"pause"}),
        (md_obj("Canary", canary=True), {"promote", "abort", "pause"}),
        (md_obj("Canary", paused=True, canary=True), {"promote", "abort", "resume"}),
        (md_obj("Promoting", canary=True), {"pause"}),
        (md_obj("RolledBack"), {"retry", "pause"}),
        (md_obj("Available", paused=True), {"resume"}),
    ],
)
def test_modeldeployment_discovery_enables_what_applies(obj: dict[str, Any], expected: set[str]) -> None:
    discovered = run_lua(md_script("actions", "discovery.lua"), obj)
    assert set(discovered) == {"promote", "abort", "retry", "pause", "resume"}
    assert enabled(discovered) == expected


@needs_lua
@pytest.mark.parametrize(
    ("suspend", "phase", "expected"),
    [
        (False, "Running", {"suspend"}),
        (None, None, {"suspend"}),
        (True, "Suspended", {"resume"}),
        (False, "Succeeded", set()),
        (False, "Failed", set()),
    ],
)
def test_trainingjob_discovery(suspend: bool | None, phase: str | None, expected: set[str]) -> None:
    obj: dict[str, Any] = {"metadata": {"name": "digits"}, "spec": {}}
    if suspend is not None:
        obj["spec"]["runPolicy"] = {"suspend": suspend}
    if phase is not None:
        obj["status"] = {"phase": phase}
    assert enabled(run_lua(tj_script("actions", "discovery.lua"), obj)) == expected


def test_every_discovered_action_has_a_script() -> None:
    for kind in ("ModelDeployment", "TrainingJob"):
        names = set(re.findall(r'actions\["([a-z-]+)"\] = ', (CUSTOM / kind / "actions" / "discovery.lua").read_text()))
        scripts = {p.parent.name for p in (CUSTOM / kind / "actions").glob("*/action.lua")}
        assert names == scripts, kind


# ---- actions --------------------------------------------------------------------------------------


@needs_lua
@pytest.mark.parametrize("name", ["promote", "abort", "retry"])
def test_one_shot_actions_write_a_fresh_valid_action_id(name: str) -> None:
    obj = md_obj("Canary", canary=True)
    out = run_lua(md_script("actions", name, "action.lua"), obj)
    action = out["spec"]["rollout"]["action"]
    assert action["name"] == name
    assert re.fullmatch(r"argocd-\d{8}t\d{6}z-g7", action["id"]) and re.fullmatch(VERSION_PATTERN, action["id"])
    spec = ModelDeploymentSpec.model_validate(out["spec"])  # the API accepts it
    assert spec.rollout.action is not None and spec.rollout.action.id == action["id"]
    assert {k: v for k, v in out.items() if k != "spec"} == {k: v for k, v in obj.items() if k != "spec"}


@needs_lua
def test_the_abort_action_makes_the_operator_roll_back() -> None:
    out = run_lua(md_script("actions", "abort", "action.lua"), md_obj("Canary", canary=True))
    spec = ModelDeploymentSpec.model_validate({**out["spec"], "model": {**out["spec"]["model"], "version": "2.0.0"}})
    plan = decide(spec, in_canary(), obs(), 8)
    assert plan.status.phase == "RolledBack" and plan.status.actions[-1].result == "Applied"


@needs_lua
@pytest.mark.parametrize(("name", "value"), [("pause", True), ("resume", False)])
def test_pause_and_resume_set_spec_rollout_paused_keeping_the_rest(name: str, value: bool) -> None:
    obj = md_obj("Canary", canary=True)
    obj["spec"]["rollout"] = {"steps": [10, 50], "paused": not value}
    out = run_lua(md_script("actions", name, "action.lua"), obj)
    assert out["spec"]["rollout"] == {"steps": [10, 50], "paused": value}
    assert ModelDeploymentSpec.model_validate(out["spec"]).rollout.paused is value


@needs_lua
@pytest.mark.parametrize(("name", "value"), [("suspend", True), ("resume", False)])
def test_trainingjob_suspend_and_resume(name: str, value: bool) -> None:
    obj = {"metadata": {"name": "digits"}, "spec": {"runPolicy": {"maxRestarts": 2}}}
    out = run_lua(tj_script("actions", name, "action.lua"), obj)
    assert out["spec"]["runPolicy"] == {"maxRestarts": 2, "suspend": value}
    assert RunPolicy.model_validate(out["spec"]["runPolicy"]).suspend is value


# ---- health ---------------------------------------------------------------------------------------


def test_the_health_check_in_the_docs_is_health_lua() -> None:
    assert health_check_script() == md_script("health.lua")


@needs_lua
@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"Ready": "False", "Progressing": "True", "Degraded": "False", "Paused": "True"}, "Suspended"),
        ({"Ready": "True", "Progressing": "False", "Degraded": "False", "Paused": "True"}, "Healthy"),
        ({"Ready": "False", "Progressing": "True", "Degraded": "False", "Paused": "False"}, "Progressing"),
    ],
)
def test_a_held_rollout_is_suspended_in_argo_cd(conditions: dict[str, str], expected: str) -> None:
    obj = md_obj("Canary", canary=True)
    obj["status"].update(
        observedGeneration=7, message="held", conditions=[{"type": t, "status": s} for t, s in conditions.items()]
    )
    assert run_lua(md_script("health.lua"), obj)["status"] == expected


# ---- the argocd-cm manifest -----------------------------------------------------------------------


def render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("argocd_render", ROOT / "argocd" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_argocd_cm_is_rendered_from_the_lua_files() -> None:
    rendered = render_module().render()
    assert (ROOT / "argocd" / "argocd-cm.yaml").read_text() == rendered, "run python argocd/render.py"
    data = yaml.safe_load(rendered)["data"]
    assert data["resource.customizations.health.flownexus.io_ModelDeployment"] == md_script("health.lua")
    actions = yaml.safe_load(data["resource.customizations.actions.flownexus.io_ModelDeployment"])
    assert actions["discovery.lua"] == md_script("actions", "discovery.lua")
    assert {d["name"]: d["action.lua"] for d in actions["definitions"]} == {
        name: md_script("actions", name, "action.lua") for name in ("abort", "pause", "promote", "resume", "retry")
    }
    tj = yaml.safe_load(data["resource.customizations.actions.flownexus.io_TrainingJob"])
    assert [d["name"] for d in tj["definitions"]] == ["resume", "suspend"]
