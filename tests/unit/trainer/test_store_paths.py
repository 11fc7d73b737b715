"""The artifact store's pure mapping: local ``<root>/<rel>`` <-> key ``<prefix>/<rel>``, and what is refused."""

from __future__ import annotations

import json

import pytest

from flownexus_trainer.store import (
    S3Store,
    StoreConfig,
    StoreError,
    clean_rel,
    is_immutable,
    is_pushable,
    key_for,
    parse_s3_uri,
    rel_for_key,
    rel_of,
)


@pytest.mark.parametrize(
    ("path", "root", "rel"),
    [
        ("/artifacts/ns/run-1234", "/artifacts", "ns/run-1234"),
        ("/artifacts/ns/run-1234/", "/artifacts/", "ns/run-1234"),
        ("/artifacts", "/artifacts", ""),
        ("ns/run-1234", "/artifacts", "ns/run-1234"),
        ("./ns//run/./x.pt", "/artifacts", "ns/run/x.pt"),
        ("/data/a", "/", "data/a"),
    ],
)
def test_a_path_under_the_root_maps_to_its_relative_path(path: str, root: str, rel: str) -> None:
    assert rel_of(path, root) == rel


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/artifacts/../etc/passwd", "'..' segment"),
        ("../outside", "'..' segment"),
        ("ns/run/../../x", "'..' segment"),
        ("/etc/passwd", "outside the artifact root /artifacts"),
        ("/artifacts-other/x", "outside the artifact root /artifacts"),
        ("ns/\0x", "NUL"),
    ],
)
def test_a_path_outside_the_root_or_with_dotdot_is_refused(path: str, error: str) -> None:
    with pytest.raises(StoreError, match=error):
        rel_of(path, "/artifacts")


@pytest.mark.parametrize(
    ("prefix", "rel", "key"),
    [
        ("p/q", "ns/run/ckpt.pt", "p/q/ns/run/ckpt.pt"),
        ("", "ns/run/ckpt.pt", "ns/run/ckpt.pt"),
        ("/p/q/", "ns/run", "p/q/ns/run"),
        ("p", "", "p"),
        ("", "", ""),
    ],
)
def test_the_key_is_the_prefix_then_the_relative_path_without_a_leading_slash(prefix: str, rel: str, key: str) -> None:
    assert key_for(prefix, rel) == key
    if rel:
        assert rel_for_key(prefix, key) == rel


@pytest.mark.parametrize(
    ("prefix", "key"),
    [("p/q", "p/other/x"), ("p/q", "p/qx/y"), ("p", "x/p/y"), ("p", "p/../x"), ("", "a/../../x")],
)
def test_a_key_outside_the_prefix_or_with_dotdot_is_refused(prefix: str, key: str) -> None:
    with pytest.raises(StoreError, match=r"outside the store's prefix|'\.\.' segment"):
        rel_for_key(prefix, key)


def test_dotdot_in_a_relative_path_or_the_prefix_is_refused() -> None:
    with pytest.raises(StoreError, match=r"'\.\.' segment"):
        key_for("p/../q", "x")
    with pytest.raises(StoreError, match=r"'\.\.' segment"):
        clean_rel("a/..")


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [("s3://b/datasets/iris.csv", ("b", "datasets/iris.csv")), ("s3://b/a/.../x", ("b", "a/.../x"))],
)
def test_an_s3_uri_splits_into_bucket_and_key_as_is(uri: str, parsed: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == parsed


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        ("s3://b/a/../x", "'..' segment"),
        ("s3://b/..", "'..' segment"),
        ("s3://b", "not an s3://bucket/key URI"),
        ("s3:///key", "not an s3://bucket/key URI"),
        ("s3://b/dir/", "not an s3://bucket/key URI"),
        ("http://b/key", "not an s3://bucket/key URI"),
    ],
)
def test_a_malformed_or_dotdot_s3_uri_is_refused(uri: str, error: str) -> None:
    with pytest.raises(StoreError, match=error):
        parse_s3_uri(uri)


@pytest.mark.parametrize(
    ("name", "pushed"),
    [("ckpt-00001.pt", True), (".ckpt-00001.pt.tmp-42", False), ("digits.mar.part", False), ("a.partial", True)],
)
def test_temporary_names_are_never_pushed(name: str, pushed: bool) -> None:
    assert is_pushable(name) is pushed


@pytest.mark.parametrize(
    ("rel", "immutable"),
    [("ns/run/model-store/digits.mar", True), ("model-store/x.mar", True), ("ns/run/model-store", False),
     ("ns/run/model-store-old/x.mar", False), ("ns/run/ckpt.pt", False)],
)  # fmt: skip
def test_only_files_under_a_model_store_dir_are_immutable(rel: str, immutable: bool) -> None:
    assert is_immutable(rel) is immutable


FULL = {"type": "s3", "endpoint": "https://minio.example:9000", "bucket": "b", "prefix": "p/q", "region": "eu-west-1",
        "insecureSkipTLSVerify": True, "caFile": "/etc/ca.crt", "root": "/work"}  # fmt: skip


def test_the_operators_store_json_parses_into_a_config() -> None:
    assert StoreConfig.parse(json.dumps(FULL)) == StoreConfig(
        endpoint="https://minio.example:9000", bucket="b", prefix="p/q", region="eu-west-1",
        insecure_skip_tls_verify=True, ca_file="/etc/ca.crt", root="/work",
    )  # fmt: skip
    minimal = {"type": "s3", "endpoint": "http://seaweed:8333", "bucket": "b", "prefix": "", "root": "/artifacts"}
    assert StoreConfig.parse(json.dumps(minimal)) == StoreConfig(endpoint="http://seaweed:8333", bucket="b")
    assert StoreConfig.parse('{"type": "pvc"}') is None


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"type": "gcs"}, "unknown store type 'gcs'"),
        ({"endpoint": "ftp://host"}, "is not http"),
        ({"endpoint": "http://host/path"}, "is not http"),
        ({"endpoint": "host:9000"}, "is not http"),
        ({"bucket": ""}, "no bucket"),
        ({"prefix": "a/../b"}, "'..' segment"),
    ],
)
def test_a_store_json_that_cannot_work_is_refused(override: dict[str, str], error: str) -> None:
    with pytest.raises(StoreError, match=error):
        StoreConfig.parse(json.dumps({**FULL, **override}))


def test_from_env_is_none_without_a_store_and_refuses_missing_credentials() -> None:
    assert S3Store.from_env({}) is None
    assert S3Store.from_env({"FLOWNEXUS_STORE": '{"type": "pvc"}'}) is None
    with pytest.raises(StoreError, match=r"s3://b/p/q: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY unset"):
        S3Store.from_env({"FLOWNEXUS_STORE": json.dumps(FULL), "AWS_ACCESS_KEY_ID": "k"})
    with pytest.raises(StoreError, match="not a JSON object"):
        S3Store.from_env({"FLOWNEXUS_STORE": "{nope"})


def test_uri_prefixes_paths_and_s3_sources_must_name_the_configured_bucket() -> None:
    """No request is made: building the client and mapping names is offline."""
    env = {"FLOWNEXUS_STORE": json.dumps(FULL), "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    store = S3Store.from_env(env)
    assert store is not None
    assert store.uri("ns/run/ckpt.pt") == "s3://b/p/q/ns/run/ckpt.pt"
    assert store.rel("/work/ns/run") == "ns/run"
    assert store.source_key("s3://b/datasets/iris.csv") == "datasets/iris.csv"
    assert store.source_key("ns/run/x") == "p/q/ns/run/x"
    with pytest.raises(StoreError, match=r"^s3://other/k: outside the artifact store's bucket b$"):
        store.source_key("s3://other/k")
