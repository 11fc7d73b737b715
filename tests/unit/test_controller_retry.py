"""How soon a failed pass is retried: an API server that is away is looked at again within seconds."""

from __future__ import annotations

import pytest
import urllib3

from flownexus.runtime.client import ApiError, Conflict
from flownexus.runtime.controller import _unreachable


@pytest.mark.parametrize(
    ("exc", "unreachable"),
    [
        (ConnectionRefusedError(111, "Connection refused"), True),
        (urllib3.exceptions.MaxRetryError(None, "/api", reason=None), True),  # type: ignore[arg-type]
        (urllib3.exceptions.ProtocolError("Connection aborted"), True),
        (TimeoutError(), True),
        (ApiError(500, "etcdserver: request timed out"), False),  # an answer: normal backoff
        (Conflict(409, "the object has been modified"), False),
        (ValueError("a bug"), False),
        (None, False),
    ],
)
def test_only_failed_connections_count_as_an_unreachable_api_server(
    exc: BaseException | None, unreachable: bool
) -> None:
    assert _unreachable(exc) is unreachable
