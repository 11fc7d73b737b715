"""The pod-side store wrapper against a real S3 server: pull, run, push while running and at exit.

Every test runs ``python -m flownexus_trainer.store`` as a pod would (its own process, env from the
operator's contract) and then reads the bucket back with a separate client.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flownexus_trainer.store import Pusher, S3Store, StoreConfig, StoreError
from tests.prereq import missing
from tests.s3server import S3Server, free_ports

pytestmark = pytest.mark.integration

TRAINER_SRC = Path(__file__).resolve().parents[3] / "trainer_image"

# Helpers the commands below use: an atomic write (temp name, then os.replace) and checkpoint rotation.
PRELUDE = """
import os, sys, time
from pathlib import Path
run = Path(sys.argv[1])
def atomic(name, data):
    run.joinpath(name).parent.mkdir(parents=True, exist_ok=True)
    tmp = run.joinpath(name).with_name(f".{Path(name).name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, run / name)
def rotate(keep=2):
    for old in sorted(run.glob("ckpt-*.pt"))[:-keep]:
        old.unlink()
"""


def store_env(server: S3Server, root: Path, prefix: str, **overrides: object) -> dict[str, str]:
    spec = {"type": "s3", "endpoint": server.endpoint, "bucket": server.bucket, "prefix": prefix,
            "region": "us-east-1", "insecureSkipTLSVerify": False, "root": str(root)}  # fmt: skip
    keys = {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        keys[name] = str(overrides.pop(name, keys[name]))
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWNEXUS_STORE", "AWS_ACCESS_KEY_ID")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRAINER_SRC), env.get("PYTHONPATH")]))
    return {**env, **keys, "FLOWNEXUS_STORE": json.dumps({**spec, **overrides})}


def wrapper(*args: str, script: str = "", run: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "flownexus_trainer.store", *args, "--", sys.executable, "-c", PRELUDE + script]
    return [*cmd, str(run)] if run is not None else cmd


def wrap(
    env: dict[str, str], *args: str, script: str = "", run: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(wrapper(*args, script=script, run=run), env=env, capture_output=True, text=True, timeout=90)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_pull_run_push_mirrors_the_run_dir_with_rotation_and_atomic_writes(s3_server: S3Server, tmp_path: Path) -> None:
    """Pulled checkpoints the command rotates away are deleted, new ones uploaded, temp files never."""
    p = "t1/p"
    for key, data in {"ns/run-1/state.json": b"resume-me", "ns/run-1/ckpt-00001.pt": b"one",
                      "ns/run-1/ckpt-00002.pt": b"two", "ns/run-1/.ckpt-00009.pt.tmp-1": b"junk",
                      "ns/run-10/other.pt": b"not this run"}.items():  # fmt: skip
        s3_server.put(f"{p}/{key}", data)
    run = tmp_path / "artifacts" / "ns" / "run-1"
    script = """
assert (run / "state.json").read_bytes() == b"resume-me" and (run / "ckpt-00002.pt").read_bytes() == b"two"
assert not (run / ".ckpt-00009.pt.tmp-1").exists() and not (run.parent / "run-10").exists()
atomic("ckpt-00003.pt", b"three"); rotate(); time.sleep(0.7)
atomic("ckpt-00004.pt", b"four"); rotate(); atomic("sub/metrics.json", b"{}")
(run / "upload.part").write_bytes(b"partial"); (run / ".hidden").write_bytes(b"h")
time.sleep(0.7)
"""
    env = store_env(s3_server, tmp_path / "artifacts", p)
    result = wrap(env, "--pull", str(run), "--push", "ns/run-1", "--interval", "0.2", script=script, run=run)

    assert result.returncode == 0, result.stderr
    assert s3_server.keys(prefix=f"{p}/") == [
        f"{p}/ns/run-1/.ckpt-00009.pt.tmp-1", f"{p}/ns/run-1/ckpt-00003.pt", f"{p}/ns/run-1/ckpt-00004.pt",
        f"{p}/ns/run-1/state.json", f"{p}/ns/run-1/sub/metrics.json", f"{p}/ns/run-10/other.pt",
    ]  # fmt: skip
    assert s3_server.get(f"{p}/ns/run-1/ckpt-00004.pt") == b"four"
    assert "pushed s3://" in result.stderr and "deleted s3://" in result.stderr


def test_sigterm_mid_run_leaves_the_last_complete_checkpoint_in_the_bucket(s3_server: S3Server, tmp_path: Path) -> None:
    """SIGTERM reaches the command, the final push uploads its last complete file, the exit code is 128+15."""
    run = tmp_path / "artifacts" / "ns" / "run-2"
    script = """
atomic("ckpt-00001.pt", b"complete")
run.joinpath(".ckpt-00002.pt.tmp-9").write_bytes(b"half")
print("ready", flush=True)
time.sleep(120)
"""
    env = store_env(s3_server, tmp_path / "artifacts", "t2")
    cmd = wrapper("--push", str(run), "--interval", "60", script=script, run=run)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert s3_server.keys(prefix="t2/") == []  # the 60 s scan has not run: only the final push can upload
        os.kill(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert time.monotonic() - started < 15
    assert s3_server.keys(prefix="t2/") == ["t2/ns/run-2/ckpt-00001.pt"]
    assert s3_server.get("t2/ns/run-2/ckpt-00001.pt") == b"complete"


def test_the_commands_exit_code_is_the_wrappers_and_its_files_are_pushed(s3_server: S3Server, tmp_path: Path) -> None:
    run = tmp_path / "artifacts" / "ns" / "run-3"
    env = store_env(s3_server, tmp_path / "artifacts", "t3")
    result = wrap(env, "--push", str(run), script="atomic('report.json', b'{}'); sys.exit(7)", run=run)
    assert result.returncode == 7, result.stderr
    assert s3_server.keys(prefix="t3/") == ["t3/ns/run-3/report.json"]


def test_a_model_store_archive_is_never_overwritten(s3_server: S3Server, tmp_path: Path) -> None:
    """A second run with different bytes fails naming the URI; the first archive stays byte for byte."""
    key = "t4/ns/run-4/model-store/digits.mar"
    a, b = tmp_path / "a", tmp_path / "b"
    first = wrap(store_env(s3_server, a, "t4"), "--push", "ns/run-4",
                 script="atomic('model-store/digits.mar', b'A' * 100)", run=a / "ns" / "run-4")  # fmt: skip
    assert first.returncode == 0, first.stderr
    second = wrap(store_env(s3_server, b, "t4"), "--push", "ns/run-4",
                  script="atomic('model-store/digits.mar', b'B' * 100)", run=b / "ns" / "run-4")  # fmt: skip
    assert second.returncode == 2
    assert f"s3://{s3_server.bucket}/{key}" in last_line(second) and "immutable" in last_line(second)
    assert s3_server.get(key) == b"A" * 100


def test_a_failed_command_publishes_no_archive_but_its_other_files(s3_server: S3Server, tmp_path: Path) -> None:
    """Archives are written in place by torch-model-archiver: only a command that exits 0 publishes one."""
    run = tmp_path / "artifacts" / "ns" / "run-12"
    script = "atomic('model-store/digits.mar', b'maybe-partial'); atomic('log.txt', b'x'); time.sleep(0.6); sys.exit(1)"
    result = wrap(store_env(s3_server, tmp_path / "artifacts", "t12"), "--push", str(run), "--interval", "0.1",
                  script=script, run=run)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert s3_server.keys(prefix="t12/") == ["t12/ns/run-12/log.txt"]


def test_identical_archive_is_skipped_and_a_local_delete_keeps_it(s3_server: S3Server, tmp_path: Path) -> None:
    key = "t5/ns/run-5/model-store/digits.mar"
    s3_server.put(key, b"archive")
    run = tmp_path / "artifacts" / "ns" / "run-5"
    script = "mar = run / 'model-store/digits.mar'; assert mar.read_bytes() == b'archive'; mar.unlink()"
    deleted = wrap(store_env(s3_server, tmp_path / "artifacts", "t5"), "--pull", str(run), "--push", str(run),
                   script=script, run=run)  # fmt: skip
    assert deleted.returncode == 0, deleted.stderr
    again = tmp_path / "again"
    same = wrap(store_env(s3_server, again, "t5"), "--push", "ns/run-5",
                script="atomic('model-store/digits.mar', b'archive')", run=again / "ns" / "run-5")  # fmt: skip
    assert same.returncode == 0, same.stderr
    assert s3_server.keys(prefix="t5/") == [key] and s3_server.get(key) == b"archive"


def test_pull_file_downloads_an_absolute_and_a_relative_source_and_prints_sha256(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """``s3://bucket/key`` is used as is; a relative source gets the prefix; a key may hold "=" (year=2026/)."""
    s3_server.put("datasets/iris.csv", b"a,b\n1,2\n")
    s3_server.put("t6/shared/config.json", b"{}")
    s3_server.put("datasets/year=2026/part=1", b"hive")
    data, conf, hive = tmp_path / "in" / "iris.csv", tmp_path / "in" / "config.json", tmp_path / "in" / "part=1"
    script = f"assert Path({str(data)!r}).read_bytes() == b'a,b\\n1,2\\n' and Path({str(conf)!r}).exists()"
    script += f"; assert Path({str(hive)!r}).read_bytes() == b'hive'"
    result = wrap(store_env(s3_server, tmp_path / "artifacts", "t6"),
                  "--pull-file", f"s3://{s3_server.bucket}/datasets/iris.csv={data}",
                  "--pull-file", f"shared/config.json={conf}",
                  "--pull-file", f"s3://{s3_server.bucket}/datasets/year=2026/part=1={hive}",
                  script=script, run=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    sha = hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    assert f"store: pulled s3://{s3_server.bucket}/datasets/iris.csv (8 bytes, sha256 {sha})" in result.stdout
    assert f"store: pulled s3://{s3_server.bucket}/t6/shared/config.json (2 bytes" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pull-file", "s3://other/key=/tmp/x"], "store: s3://other/key: outside the artifact store's bucket {b}"),
        (["--pull-file", "s3://{b}/t7/nope.csv=/tmp/x"], "store: s3://{b}/t7/nope.csv: no such object"),
        (["--pull-file", "s3://{b}/t7/../x=/tmp/x"], "store: s3://{b}/t7/../x: a key with a '..' segment is refused"),
        (["--pull", "ns/../../etc"], "store: 'ns/../../etc': a path with a '..' segment (or a NUL) is refused"),
        (["--push", "/etc"], "store: /etc: outside the artifact root {root}"),
    ],
    ids=["other-bucket", "missing-object", "dotdot-key", "dotdot-dir", "outside-root"],
)
def test_refused_sources_fail_before_the_command_with_exit_2(
    s3_server: S3Server, tmp_path: Path, args: list[str], message: str
) -> None:
    root = tmp_path / "artifacts"
    args = [a.replace("{b}", s3_server.bucket) for a in args]
    result = wrap(store_env(s3_server, root, "t7"), *args, script="Path(sys.argv[1]).write_text('ran')",
                  run=tmp_path / "ran")  # fmt: skip
    assert (result.returncode, last_line(result)) == (2, message.format(b=s3_server.bucket, root=root))
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("flag", ["--pull", "--push"])
def test_a_wrong_secret_key_says_the_credentials_were_refused_and_names_the_uri(
    s3_server: S3Server, tmp_path: Path, flag: str
) -> None:
    """Also with only --push: the store is checked before the command, not after hours of training."""
    secret = "wrong-secret-must-not-be-printed"
    result = wrap(store_env(s3_server, tmp_path / "artifacts", "t8", AWS_SECRET_ACCESS_KEY=secret),
                  flag, "ns/run-8", script="Path(sys.argv[1]).write_text('ran')", run=tmp_path / "ran")  # fmt: skip
    assert result.returncode == 2
    line = last_line(result)
    assert line.startswith(f"store: s3://{s3_server.bucket}/t8")
    assert "the credentials in the store's Secret were refused" in line
    assert secret not in result.stdout + result.stderr and not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    ("override", "retryable"), [({"AWS_SECRET_ACCESS_KEY": "wrong"}, False), ({"endpoint": "free"}, True)],
    ids=["refused-keys", "unreachable-endpoint"],
)  # fmt: skip
def test_a_store_failure_before_the_command_is_the_pods_termination_message_with_whether_a_retry_helps(
    s3_server: S3Server, tmp_path: Path, override: dict[str, object], retryable: bool
) -> None:
    """The operator reads the message: refused keys fail the job at once, an endpoint that is down is retried."""
    if override.get("endpoint") == "free":
        override = {"endpoint": f"http://127.0.0.1:{free_ports(1)[0]}"}
    log = tmp_path / "termination-log"
    env = store_env(s3_server, tmp_path / "artifacts", "t13", **override)
    result = wrap(env, "--termination-log", str(log), "--pull", "ns/run-13")
    assert result.returncode == 2
    summary = json.loads(log.read_text())
    assert summary["retryable"] is retryable
    assert summary["error"].startswith(f"store: s3://{s3_server.bucket}/t13/ns/run-13"), summary


def test_only_the_pod_named_by_push_when_env_pushes(s3_server: S3Server, tmp_path: Path) -> None:
    """One writer per run dir: the gang's other pods run the same command and push nothing."""
    for index in ("1", "0"):
        run = tmp_path / index / "artifacts" / "ns" / "run-14"
        env = {**store_env(s3_server, tmp_path / index / "artifacts", "t14"), "JOB_COMPLETION_INDEX": index}
        result = wrap(env, "--push-when-env", "JOB_COMPLETION_INDEX=0", "--push", str(run),
                      script=f"atomic('from-{index}.txt', b'x')", run=run)  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert s3_server.keys(prefix="t14/") == ["t14/ns/run-14/from-0.txt"]


def test_a_read_only_key_runs_the_command_then_fails_the_push_naming_the_uri(
    s3_server: S3Server, tmp_path: Path
) -> None:
    run = tmp_path / "artifacts" / "ns" / "run-9"
    env = store_env(s3_server, tmp_path / "artifacts", "t9", AWS_ACCESS_KEY_ID=s3_server.read_only_key,
                    AWS_SECRET_ACCESS_KEY=s3_server.read_only_secret)  # fmt: skip
    result = wrap(env, "--push", str(run), script="atomic('ckpt-00001.pt', b'x')", run=run)
    assert result.returncode == 2
    line = last_line(result)
    assert f"s3://{s3_server.bucket}/t9/ns/run-9/ckpt-00001.pt" in line and "refused" in line
    assert s3_server.keys(prefix="t9/") == []


@pytest.mark.parametrize(
    ("override", "reason"),
    [({"bucket": "no-such-bucket"}, "no such bucket 'no-such-bucket'"), ({"endpoint": "free"}, "cannot connect")],
    ids=["no-such-bucket", "unreachable-endpoint"],
)
def test_a_store_that_cannot_work_fails_before_the_command(
    s3_server: S3Server, tmp_path: Path, override: dict[str, str], reason: str
) -> None:
    if override.get("endpoint") == "free":
        override = {"endpoint": f"http://127.0.0.1:{free_ports(1)[0]}"}
    result = wrap(store_env(s3_server, tmp_path / "artifacts", "t10", **override), "--pull", "ns/run",
                  script="Path(sys.argv[1]).write_text('ran')", run=tmp_path / "ran")  # fmt: skip
    assert result.returncode == 2 and "store: s3://" in last_line(result) and reason in last_line(result)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    ("tls", "outcome"),
    [
        ({"caFile": "ca"}, 0),
        ({"insecureSkipTLSVerify": True}, 0),
        ({}, "TLS to https://127.0.0.1:"),  # a self-signed certificate, no CA given
    ],
    ids=["ca-file", "insecure-skip-verify", "untrusted"],
)
def test_https_endpoints_trust_the_ca_file_or_skip_verification_when_told(
    s3_server: S3Server, tmp_path: Path, tls: dict[str, object], outcome: int | str
) -> None:
    if s3_server.https_endpoint is None:
        missing("the openssl CLI (for the test server's certificate)")
    s3_server.put("t13/ns/run/ckpt.pt", b"over tls")
    overrides = {**tls, "endpoint": s3_server.https_endpoint}
    if "caFile" in tls:
        overrides["caFile"] = str(s3_server.ca_file)
    run = tmp_path / "artifacts" / "ns" / "run"
    result = wrap(store_env(s3_server, tmp_path / "artifacts", "t13", **overrides), "--pull", str(run),
                  script="assert (run / 'ckpt.pt').read_bytes() == b'over tls'", run=run)  # fmt: skip
    if isinstance(outcome, int):
        assert result.returncode == outcome, result.stderr
    else:
        assert result.returncode == 2 and outcome in last_line(result) and "certificate" in last_line(result)


def test_a_command_that_does_not_exist_exits_127_like_a_shell(s3_server: S3Server, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "flownexus_trainer.store", "--push", "ns/run", "--", str(tmp_path / "no-such-cmd")]
    result = subprocess.run(cmd, env=store_env(s3_server, tmp_path, "t15"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 127 and last_line(result).startswith(f"store: cannot run {tmp_path}/no-such-cmd")


@pytest.mark.parametrize("store", [None, '{"type": "pvc"}'], ids=["unset", "pvc"])
def test_without_an_s3_store_the_command_replaces_the_wrapper(tmp_path: Path, store: str | None) -> None:
    """No store to sync: the wrapper execs the command (same pid), which keeps its exit code."""
    env = {k: v for k, v in os.environ.items() if k != "FLOWNEXUS_STORE"}
    env["PYTHONPATH"] = str(TRAINER_SRC)
    if store is not None:
        env["FLOWNEXUS_STORE"] = store
    cmd = [sys.executable, "-m", "flownexus_trainer.store", "--push", "/nowhere", "--", sys.executable, "-c",
           "import os, sys; print(os.getpid()); sys.exit(5)"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert (proc.returncode, out.strip()) == (5, str(proc.pid))


def test_one_scan_uploads_oldest_first_and_the_api_round_trips(s3_server: S3Server, tmp_path: Path) -> None:
    """Upload order follows mtime, not name; download_dir/exists/upload_file/download_file agree."""
    config = StoreConfig(endpoint=s3_server.endpoint, bucket=s3_server.bucket, prefix="t11", root=str(tmp_path))
    order: list[str] = []

    class Recording(S3Store):
        def upload_file(self, local: str | Path, rel: str, *, immutable: bool = False) -> bool:
            order.append(rel)
            return super().upload_file(local, rel, immutable=immutable)

    store = Recording(config, s3_server.access_key, s3_server.secret_key)
    run = tmp_path / "run"
    run.mkdir()
    for age, name in enumerate(["a-newest", "b-middle", "c-oldest"]):
        run.joinpath(name).write_text(name)
        os.utime(run / name, ns=(1_700_000_000_000_000_000 - age * 10**9,) * 2)
    assert Pusher(store, [run]).scan() == []
    assert order == ["run/c-oldest", "run/b-middle", "run/a-newest"]
    assert store.exists("run/c-oldest") and not store.exists("run/nothing")
    assert store.uri("run/c-oldest") == f"s3://{s3_server.bucket}/t11/run/c-oldest"
    assert store.download_dir("run", tmp_path / "copy") == 3
    assert (tmp_path / "copy" / "b-middle").read_text() == "b-middle"
    size, sha = store.download_file("run/a-newest", tmp_path / "one")
    assert (size, sha) == (8, hashlib.sha256(b"a-newest").hexdigest())


def test_an_archive_put_by_another_tool_is_compared_by_its_md5_etag(s3_server: S3Server, tmp_path: Path) -> None:
    """No sha256 metadata on the object: equal bytes are skipped, other bytes of the same size refused."""
    config = StoreConfig(endpoint=s3_server.endpoint, bucket=s3_server.bucket, prefix="t14", root=str(tmp_path))
    store = S3Store(config, s3_server.access_key, s3_server.secret_key)
    s3_server.put("t14/model-store/m.mar", b"12345678")
    (tmp_path / "same").write_bytes(b"12345678")
    (tmp_path / "other").write_bytes(b"87654321")
    assert store.upload_file(tmp_path / "same", "model-store/m.mar", immutable=True) is False
    with pytest.raises(StoreError, match=f"^s3://{s3_server.bucket}/t14/model-store/m.mar: refusing to overwrite"):
        store.upload_file(tmp_path / "other", "model-store/m.mar", immutable=True)
    assert s3_server.get("t14/model-store/m.mar") == b"12345678"
