"""The operator image installs exactly the pinned versions the project declares."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_operator_image_requirements_match_the_operator_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = _pins(project["optional-dependencies"]["operator"])
    image = _pins((REPO / "operator" / "requirements.txt").read_text().splitlines())
    assert image == extra
