"""The generated CRDs on a real API server: they install, explain themselves, and validate the corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.corpus import INVALID_MANIFESTS, VALID_MANIFESTS
from tests.e2e.conftest import REPO, Cluster, wait_until

pytestmark = pytest.mark.e2e

CRD_DIR = REPO / "crds"
CRD_FILES = sorted(CRD_DIR.glob("*.yaml"))


def _name(manifest: dict[str, object]) -> str:
    meta = manifest.get("metadata")
    return f"{manifest.get('kind')}/{meta.get('name') if isinstance(meta, dict) else '?'}"


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> Cluster:
    if len(CRD_FILES) != 3:
        pytest.fail(f"expected the three generated CRDs in {CRD_DIR}, found {[p.name for p in CRD_FILES]}")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", *(a for p in CRD_FILES for a in ("-f", str(p))))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"-f={p}" for p in CRD_FILES))

    def discoverable() -> bool:
        # Established comes slightly before the API is served; explain and dry-run need discovery.
        return "trainingjobs" in cluster.kubectl("api-resources", "--api-group=flownexus.io", check=False).stdout

    wait_until("flownexus.io in discovery", discoverable, 60)
    return cluster


def test_explain_shows_field_descriptions(crds: Cluster) -> None:
    # The OpenAPI document that explain reads is published a little after discovery serves the kind.
    wait_until(
        "trainingjob in the published OpenAPI",
        lambda: crds.kubectl("explain", "trainingjob.spec", check=False).returncode == 0,
        90,
    )
    out = crds.kubectl("explain", "trainingjob.spec").stdout
    assert "DESCRIPTION" in out and "FIELDS" in out
    # Every field carries a description from the pydantic models; the spec's own must not be empty.
    description = out.split("DESCRIPTION:", 1)[1].split("FIELDS:", 1)[0].strip()
    assert description and description != "<empty>", out
    for field in ("model", "dataset", "training", "distributed"):
        assert f"\n  {field}\t" in out, f"spec.{field} missing from explain output:\n{out}"


@pytest.mark.parametrize("manifest", VALID_MANIFESTS, ids=_name)
def test_valid_manifest_is_accepted(crds: Cluster, manifest: dict[str, object]) -> None:
    # Server-side dry run: full schema, defaulting and CEL validation, nothing stored.
    crds.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(manifest))


@pytest.mark.parametrize(
    ("manifest", "expected"), INVALID_MANIFESTS, ids=lambda v: _name(v) if isinstance(v, dict) else v
)
def test_invalid_manifest_is_rejected_with_field_path(
    crds: Cluster, manifest: dict[str, object], expected: str
) -> None:
    result = crds.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(manifest), check=False)
    assert result.returncode != 0, f"{_name(manifest)} was accepted but must be rejected ({expected})"
    assert expected in result.stderr, f"error does not name {expected!r}:\n{result.stderr}"


def test_crd_files_are_what_the_cluster_serves(crds: Cluster) -> None:
    served = {
        item["spec"]["names"]["plural"] for item in crds.get("crd")["items"] if item["spec"]["group"] == "flownexus.io"
    }
    assert served == {"neuralclusters", "trainingjobs", "modeldeployments"}
    assert all(Path(p).exists() for p in CRD_FILES)
