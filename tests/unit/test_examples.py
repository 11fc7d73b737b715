"""Every manifest in examples/ parses through the API types (the e2e tests apply them for real)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flownexus.api import KINDS

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
SPECS = {k.kind: k.spec for k in KINDS}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["apiVersion"] == "flownexus.io/v1alpha1"
        SPECS[doc["kind"]].model_validate(doc["spec"])
