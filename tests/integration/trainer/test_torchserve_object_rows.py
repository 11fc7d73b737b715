"""Object rows keyed by column name, answered by the handler inside a real TorchServe."""

from __future__ import annotations

import json

import pytest
from sklearn.datasets import load_digits

from tests.integration.trainer.procs import TorchServe
from tests.integration.trainer.test_torchserve_handler import post

pytestmark = pytest.mark.integration


def test_an_object_row_keyed_by_feature_name_gets_the_same_answer_as_the_list(torchserve: TorchServe) -> None:
    digits = load_digits()
    row = digits.data[3].tolist()
    by_name = dict(zip(digits.feature_names, row, strict=True))
    status, as_list = post(torchserve, json.dumps({"inputs": row}).encode())
    assert status == 200, as_list
    status, as_object = post(torchserve, json.dumps({"inputs": by_name}).encode())
    assert status == 200, as_object
    assert as_object["predictions"] == as_list["predictions"]


def test_an_object_row_missing_a_column_is_a_400_naming_it(torchserve: TorchServe) -> None:
    digits = load_digits()
    by_name = dict(zip(digits.feature_names, digits.data[0].tolist(), strict=True))
    del by_name["pixel_3_4"]
    status, answer = post(torchserve, json.dumps({"inputs": [by_name]}).encode())
    assert status == 400 and 'missing column "pixel_3_4"' in answer.get("message", ""), (status, answer)
