"""The API layer never adopts or overwrites an object that another controller owns."""

from __future__ import annotations

from typing import Any

import pytest

from flownexus.kube import OwnershipConflict, _check_controller


def obj(owner_uid: str | None, kind: str = "TrainingJob", name: str = "digits") -> dict[str, Any]:
    refs = [] if owner_uid is None else [{"kind": kind, "name": name, "uid": owner_uid, "controller": True}]
    return {"kind": "Service", "metadata": {"name": "digits", "namespace": "ns", "ownerReferences": refs}}


def test_same_controller_is_fine() -> None:
    _check_controller(obj("a"), obj("a"))


def test_desired_without_owner_is_not_checked() -> None:
    _check_controller(obj(None), obj("a"))


@pytest.mark.parametrize("current_owner", ["b", None])
def test_someone_elses_object_is_a_clear_error(current_owner: str | None) -> None:
    with pytest.raises(OwnershipConflict, match="Service ns/digits already exists and belongs to"):
        _check_controller(obj("a", kind="ModelDeployment"), obj(current_owner))
