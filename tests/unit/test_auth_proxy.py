"""The inference auth proxy, run for real on loopback in front of a stand-in for TorchServe.

Every request here is raw HTTP on a socket with a deadline: a proxy that waited for a body it should not read,
or held a connection it should have answered, fails the test on that deadline instead of hanging it.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from flownexus.modeldeployment.pod.auth_proxy import (
    BUCKETS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_INFLIGHT,
    EdgeMetrics,
    ProxyServer,
    Settings,
    model_name,
    serve_metrics,
)

TOKEN = "s3cret"
POD_KEY = "pod-key"
BODY = b'{"inputs": [1, 2]}'
SLOW_S = 0.2  # how long the stand-in takes for /predictions/slow


# ---- a stand-in for TorchServe ---------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Upstream:
    """Records what reaches it and echoes the body with a 201; ``/block/...`` waits for ``release`` first."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.accepted = 0
        self.probes = 0
        self.arrived = threading.Semaphore(0)
        self.release = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                if self.path == "/sentinel":
                    self._answer(200, b"{}")
                    return
                try:
                    body = self._body()
                except (OSError, ValueError):
                    self.close_connection = True
                    return
                upstream.seen.append(
                    Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                if self.path.startswith("/block/"):
                    upstream.arrived.release()
                    upstream.release.wait(timeout=5)
                if self.path.startswith("/predictions/slow"):
                    time.sleep(SLOW_S)
                self._answer(201, body, {"X-Upstream": "torchserve", "Content-Type": "application/json"})

            do_GET = do_POST

            def _body(self) -> bytes:
                if (self.headers.get("Transfer-Encoding") or "").lower() != "chunked":
                    length = int(self.headers.get("Content-Length") or 0)
                    data = self.rfile.read(length)
                    if len(data) != length:
                        raise ValueError("the body was cut short")
                    return data
                out = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    out += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return out

            def _answer(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request: Any, client_address: Any) -> bool:
                upstream.accepted += 1  # in accept order, on the serving thread
                return True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def contacts(self) -> int:
        """Connections the proxy has made so far: a probe of ours, answered, was accepted after any earlier one."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as probe:
            probe.sendall(b"POST /sentinel HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            while probe.recv(4096):
                pass
        self.probes += 1
        return self.accepted - self.probes

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


# ---- raw HTTP ------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def head(
    path: str = "/predictions/digits",
    token: str | None = TOKEN,
    length: int | None = len(BODY),
    extra: dict[str, str] | None = None,
    method: str = "POST",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: digits.default.svc:8080", "Connection: close"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def exchange(port: int, data: bytes, timeout: float = 3.0) -> Reply:
    """Sends ``data`` and reads until the proxy closes the connection: every request here says Connection: close.
    A proxy that keeps waiting (e.g. for a body) makes this raise TimeoutError after ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return parse(received)


def parse(data: bytes) -> Reply:
    header, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = header.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Reply(int(status_line.split()[1]), headers, body)


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture
def proxies() -> dict[int, ProxyServer]:
    """The proxies ``start_proxy`` started, by port."""
    return {}


@pytest.fixture
def start_proxy(upstream: Upstream, tmp_path: Path, proxies: dict[int, ProxyServer]) -> Iterator[Callable[..., int]]:
    """Starts a proxy in front of ``upstream`` (token file ``tmp_path/token`` holding TOKEN unless given;
    ``open_mode=True``: no token file, as without spec.serving.inferenceTokenSecret); returns its port. Every
    proxy started is stopped at the end."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "key_file.json").write_text(json.dumps({"inference": {"key": POD_KEY}, "management": {"key": "m"}}))
    started: list[tuple[ProxyServer, threading.Thread]] = []

    def start(token_file: Path | None = None, open_mode: bool = False, **limits: Any) -> int:
        if token_file is None and not open_mode:
            token_file = tmp_path / "token"
            token_file.write_text(TOKEN + "\n")
        settings = Settings(
            upstream_port=upstream.port,
            token_file=None if open_mode else str(token_file),
            run_dir=None if open_mode else str(run_dir),
            **{"header_timeout_s": 5.0, "client_timeout_s": 5.0, "model_version": "2.0.0", "hostname": "pod-0",
               **limits},
        )  # fmt: skip
        server = ProxyServer(("127.0.0.1", 0), settings)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        port: int = server.server_address[1]
        proxies[port] = server
        return port

    yield start
    upstream.release.set()  # nothing may stay blocked in the stand-in while the proxies join their threads
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---- tests ---------------------------------------------------------------------------------------------------


def test_defaults_are_a_10_mib_body_cap_and_64_requests_in_flight() -> None:
    settings = Settings.from_env(
        {"FLOWNEXUS_UPSTREAM_PORT": "8079", "FLOWNEXUS_TOKEN_FILE": "t", "FLOWNEXUS_RUN_DIR": "r"}
    )
    assert (settings.max_body_bytes, settings.max_inflight) == (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_INFLIGHT)
    assert (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_INFLIGHT) == (10 * 1024 * 1024, 64)
    custom = Settings.from_env(
        {"FLOWNEXUS_UPSTREAM_PORT": "8079", "FLOWNEXUS_TOKEN_FILE": "t", "FLOWNEXUS_RUN_DIR": "r",
         "FLOWNEXUS_PROXY_MAX_BODY_BYTES": "1024", "FLOWNEXUS_PROXY_MAX_INFLIGHT": "8"}
    )  # fmt: skip
    assert (custom.max_body_bytes, custom.max_inflight) == (1024, 8)
    with pytest.raises(ValueError, match="FLOWNEXUS_PROXY_MAX_INFLIGHT"):
        Settings.from_env({"FLOWNEXUS_UPSTREAM_PORT": "1", "FLOWNEXUS_TOKEN_FILE": "t", "FLOWNEXUS_RUN_DIR": "r",
                           "FLOWNEXUS_PROXY_MAX_INFLIGHT": "lots"})  # fmt: skip
    with pytest.raises(ValueError):
        Settings(upstream_port=1, token_file="t", run_dir="r", max_inflight=0)


@pytest.mark.parametrize("token", [None, "wrong", ""], ids=["no-token", "wrong-token", "empty-token"])
def test_missing_or_wrong_token_gets_401_before_any_body_byte_and_upstream_sees_nothing(
    start_proxy: Callable[..., int], upstream: Upstream, token: str | None
) -> None:
    # A client timeout far beyond the exchange's 3 s: a proxy reading the (never sent) terabyte first would time out.
    port = start_proxy(client_timeout_s=60.0)
    reply = exchange(port, head(token=token, length=10**12, extra={"Expect": "100-continue"}))
    assert reply.status == 401  # not "100 Continue": the client is not invited to send its body
    assert reply.headers["www-authenticate"] == "Bearer"
    assert reply.headers["connection"] == "close"
    assert json.loads(reply.body)["code"] == 401
    assert upstream.contacts() == 0
    assert upstream.seen == []


def test_correct_token_is_proxied_with_status_body_and_headers_and_the_pod_key_upstream(
    start_proxy: Callable[..., int], upstream: Upstream
) -> None:
    port = start_proxy()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        for _ in range(2):  # keep-alive: one connection, two requests
            conn.request(
                "POST", "/predictions/digits", BODY, {"Authorization": f"Bearer {TOKEN}", "X-Request-Id": "r1"}
            )
            response = conn.getresponse()
            assert (response.status, response.read()) == (201, BODY)
            assert response.getheader("X-Upstream") == "torchserve"
            assert response.getheader("Content-Type") == "application/json"
    finally:
        conn.close()
    assert [(s.method, s.path, s.body) for s in upstream.seen] == [("POST", "/predictions/digits", BODY)] * 2
    forwarded = upstream.seen[0].headers
    assert forwarded["authorization"] == f"Bearer {POD_KEY}"  # the pod's TorchServe key, not the client's token
    assert forwarded["x-request-id"] == "r1"
    assert not any(TOKEN in v for v in forwarded.values())


def test_ping_is_open_without_a_token(start_proxy: Callable[..., int], upstream: Upstream) -> None:
    port = start_proxy()
    assert exchange(port, head(path="/ping", token=None, length=None, method="GET")).status == 201
    assert [s.path for s in upstream.seen] == ["/ping"]


def test_chunked_body_within_the_cap_is_forwarded_whole(start_proxy: Callable[..., int], upstream: Upstream) -> None:
    port = start_proxy(max_body_bytes=16)
    chunked = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    reply = exchange(port, head(length=None, extra={"Transfer-Encoding": "chunked"}) + chunked)
    assert (reply.status, reply.body) == (201, b"hello world")
    assert upstream.seen[0].body == b"hello world"


def test_content_length_over_the_cap_gets_413_without_contacting_upstream(
    start_proxy: Callable[..., int], upstream: Upstream
) -> None:
    port = start_proxy(max_body_bytes=1024, client_timeout_s=60.0)
    reply = exchange(port, head(length=1025))  # no body sent: the 413 must not wait for it
    assert reply.status == 413
    assert reply.headers["connection"] == "close"
    assert exchange(port, head(length=1024) + b"x" * 1024).status == 201  # at the cap: admitted
    assert upstream.contacts() == 1


def test_chunked_body_growing_over_the_cap_gets_413(start_proxy: Callable[..., int], upstream: Upstream) -> None:
    port = start_proxy(max_body_bytes=16)
    chunked = b"10\r\n" + b"a" * 16 + b"\r\n1\r\nb\r\n0\r\n\r\n"  # 17 bytes
    assert exchange(port, head(length=None, extra={"Transfer-Encoding": "chunked"}) + chunked).status == 413
    assert upstream.seen == []  # what was streamed was abandoned, never answered


def test_body_method_without_length_or_chunked_gets_411(start_proxy: Callable[..., int], upstream: Upstream) -> None:
    port = start_proxy()
    assert exchange(port, head(length=None)).status == 411
    assert upstream.contacts() == 0


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({"Transfer-Encoding": "chunked", "Content-Length": "5"}, 400),
        ({"Transfer-Encoding": "gzip, chunked"}, 501),
        ({"Content-Length": "-1"}, 400),
        ({"Content-Length": "5, 6"}, 400),
    ],
    ids=["te-and-cl", "unsupported-coding", "negative-length", "conflicting-lengths"],
)
def test_ambiguous_framing_is_rejected_without_contacting_upstream(
    start_proxy: Callable[..., int], upstream: Upstream, extra: dict[str, str], status: int
) -> None:
    port = start_proxy()
    assert exchange(port, head(length=None, extra=extra)).status == status
    assert upstream.contacts() == 0


def test_requests_over_the_concurrency_cap_get_503_with_retry_after_while_in_flight_ones_complete(
    start_proxy: Callable[..., int], upstream: Upstream
) -> None:
    port = start_proxy(max_inflight=2)
    replies: list[Reply] = []
    clients = [threading.Thread(target=lambda: replies.append(exchange(port, head(path="/block/x") + BODY, 5)))
               for _ in range(2)]  # fmt: skip
    for client in clients:
        client.start()
    for _ in clients:
        assert upstream.arrived.acquire(timeout=5)  # both are in flight, held by the stand-in
    refused = exchange(port, head() + BODY, timeout=2)
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    upstream.release.set()
    for client in clients:
        client.join(timeout=5)
    assert [(r.status, r.body) for r in replies] == [(201, BODY), (201, BODY)]
    assert exchange(port, head() + BODY).status == 201  # the slots are free again
    assert len(upstream.seen) == 3


def test_rotated_token_is_honoured_at_once_and_the_old_one_refused(
    start_proxy: Callable[..., int], upstream: Upstream, tmp_path: Path
) -> None:
    volume = tmp_path / "inference"
    volume.mkdir()

    def publish(stamp: str, token: str) -> None:
        """What kubelet's atomic writer does: a new timestamped dir, then ``..data`` renamed onto it."""
        (volume / stamp).mkdir()
        (volume / stamp / "key").write_text(token)
        os.symlink(stamp, volume / "..data_tmp")
        os.replace(volume / "..data_tmp", volume / "..data")

    publish("..2026_01_01_00_00_00.1", "old-token")
    os.symlink("..data/key", volume / "key")
    # A re-read interval far beyond the test: the swap itself (a new inode behind the link) must be noticed.
    port = start_proxy(token_file=volume / "key", token_refresh_s=3600.0)
    assert exchange(port, head(token="old-token") + BODY).status == 201
    publish("..2026_01_01_01_00_00.2", "new-token")
    shutil.rmtree(volume / "..2026_01_01_00_00_00.1")
    assert exchange(port, head(token="new-token") + BODY).status == 201
    assert exchange(port, head(token="old-token") + BODY).status == 401
    assert len(upstream.seen) == 2


@pytest.mark.parametrize("content", [None, "\n"], ids=["missing", "empty"])
def test_missing_or_empty_token_file_denies_every_request(
    start_proxy: Callable[..., int], upstream: Upstream, tmp_path: Path, content: str | None
) -> None:
    token_file = tmp_path / "absent-token"
    if content is not None:
        token_file.write_text(content)
    port = start_proxy(token_file=token_file)
    for token in [TOKEN, "", None]:
        assert exchange(port, head(token=token) + BODY).status == 401
    assert upstream.contacts() == 0
    token_file.write_text(TOKEN)  # the Secret appears: admitted from then on
    assert exchange(port, head() + BODY).status == 201


def test_slow_headers_are_cut_off_at_the_header_deadline_and_free_the_slot(
    start_proxy: Callable[..., int], upstream: Upstream
) -> None:
    port = start_proxy(header_timeout_s=0.2, max_inflight=1)
    with socket.create_connection(("127.0.0.1", port), timeout=3) as slow:
        slow.sendall(b"POST /predictions/digits HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert slow.recv(4096) == b""  # closed by the proxy well before this socket's 3 s
    assert exchange(port, head() + BODY).status == 201  # its only slot is free again


def test_slow_body_gets_408_at_the_client_deadline(start_proxy: Callable[..., int], upstream: Upstream) -> None:
    port = start_proxy(client_timeout_s=0.2)
    reply = exchange(port, head(length=100) + b"x" * 10)
    assert reply.status == 408
    assert upstream.seen == []


def test_oversized_headers_get_431_without_contacting_upstream(
    start_proxy: Callable[..., int], upstream: Upstream
) -> None:
    port = start_proxy()
    padding = {f"X-Pad-{i}": "p" * 8000 for i in range(10)}  # 80 KB of headers, each line within the line limit
    assert exchange(port, head(extra=padding) + BODY).status == 431
    assert upstream.contacts() == 0


# ---- without a token: the pod's edge admits every request ----------------------------------------------------


def test_without_a_token_file_every_request_is_admitted_and_no_key_goes_upstream(
    start_proxy: Callable[..., int], upstream: Upstream
) -> None:
    port = start_proxy(open_mode=True)  # and no key_file.json is read: TorchServe's token authorization is off
    assert exchange(port, head(token=None) + BODY).status == 201
    assert exchange(port, head(token="anything") + BODY).status == 201
    assert [s.body for s in upstream.seen] == [BODY, BODY]
    assert all("authorization" not in s.headers for s in upstream.seen)  # neither a pod key nor the client's


def test_without_a_token_file_the_body_cap_and_framing_checks_still_hold(
    start_proxy: Callable[..., int], upstream: Upstream
) -> None:
    port = start_proxy(open_mode=True, max_body_bytes=1024, client_timeout_s=60.0)
    assert exchange(port, head(token=None, length=1025)).status == 413
    assert exchange(port, head(token=None, length=None)).status == 411
    assert upstream.contacts() == 0


def test_settings_without_a_token_file_need_no_run_dir_and_a_token_file_needs_one() -> None:
    settings = Settings.from_env({"FLOWNEXUS_UPSTREAM_PORT": "8079", "HOSTNAME": "digits-canary-5f-abc"})
    assert (settings.token_file, settings.run_dir, settings.upstream_metrics_port) == (None, None, None)
    assert settings.hostname == "digits-canary-5f-abc"
    with pytest.raises(KeyError):
        Settings.from_env({"FLOWNEXUS_UPSTREAM_PORT": "8079", "FLOWNEXUS_TOKEN_FILE": "t"})
    with pytest.raises(ValueError, match="run dir"):
        Settings(upstream_port=1, token_file="t")
    assert Settings.from_env({"FLOWNEXUS_UPSTREAM_PORT": "1"}).hostname == socket.gethostname()


def test_model_version_from_the_env_or_else_from_the_rendered_config(tmp_path: Path) -> None:
    conf = tmp_path / "config.properties"
    conf.write_text('inference_address=http://127.0.0.1:8079\nmodels={"digits":{"3.1.4":{"batchSize":4}}}\n')
    base = {"FLOWNEXUS_UPSTREAM_PORT": "8079", "FLOWNEXUS_CONF_FILE": str(conf)}
    assert Settings.from_env(base).model_version == "3.1.4"
    assert Settings.from_env({**base, "FLOWNEXUS_MODEL_VERSION": "3.1.4-rc"}).model_version == "3.1.4-rc"
    conf.write_text("inference_address=http://127.0.0.1:8079\n")  # the init container has not run: unknown
    assert Settings.from_env(base).model_version == ""


# ---- the edge metrics ------------------------------------------------------------------------------------------

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text format -> {(name, labels): value}; every line must be a comment or a valid sample."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        key = (name, frozenset(LABEL.findall(labels or "")))
        assert key not in out, f"duplicate series {line!r}"
        out[key] = float(value)
    return out


def series(text: str, name: str, **labels: str) -> dict[str, float]:
    """The samples of ``name`` whose labels include ``labels``; keyed by their ``le`` (or "")."""
    want = set(labels.items())
    return {
        dict(key).get("le", ""): value for (n, key), value in samples(text).items() if n == name and want <= set(key)
    }


def test_exposition_has_cumulative_buckets_inf_sum_count_help_and_type() -> None:
    metrics = EdgeMetrics(model_version="1.0", hostname='pod"a\\b')
    observed = [0.0005, 0.001, 0.003, 0.2, 7.0, 30.0]  # 0.001 is on a bound: le is inclusive
    for seconds in observed:
        metrics.observe("digits", 200, seconds)
    metrics.observe("digits", 503, 0.0001)
    text = metrics.render()
    assert text.endswith("\n")
    for name, kind in [("flownexus_edge_request_duration_seconds", "histogram"),
                       ("flownexus_edge_requests_total", "counter")]:  # fmt: skip
        assert f"# TYPE {name} {kind}\n" in text and f"# HELP {name} " in text
    labels = {"ModelName": "digits", "ModelVersion": "1.0", "Hostname": 'pod\\"a\\\\b', "code": "2xx"}
    buckets = series(text, "flownexus_edge_request_duration_seconds_bucket", **labels)
    assert list(buckets) == [repr(b) for b in BUCKETS] + ["+Inf"]
    expected = [sum(1 for s in observed if s <= bound) for bound in (*BUCKETS, math.inf)]
    assert list(buckets.values()) == expected
    assert buckets["0.001"] == 2 and buckets["10.0"] == 5 and buckets["+Inf"] == 6
    assert series(text, "flownexus_edge_request_duration_seconds_count", **labels) == {"": 6}
    assert series(text, "flownexus_edge_request_duration_seconds_sum", **labels)[""] == pytest.approx(sum(observed))
    assert series(text, "flownexus_edge_requests_total", **labels) == {"": 6}
    assert series(text, "flownexus_edge_requests_total", code="5xx") == {"": 1}
    assert "flownexus_edge_upstream_metrics_up" not in text


def test_observations_from_many_threads_are_all_counted() -> None:
    metrics = EdgeMetrics(model_version="", hostname="pod")

    def work() -> None:
        for i in range(500):
            metrics.observe("digits", 200 if i % 2 else 404, 0.01)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = metrics.render()
    assert series(text, "flownexus_edge_requests_total", code="2xx") == {"": 2000}
    assert series(text, "flownexus_edge_request_duration_seconds_bucket", code="4xx")["+Inf"] == 2000


def test_model_names_come_from_the_prediction_url_and_are_bounded() -> None:
    assert model_name("/predictions/digits") == model_name("/predictions/digits/2.0?x=1") == "digits"
    assert model_name("/ping") == model_name("/models/digits") == model_name("/predictionsX/digits") == ""
    metrics = EdgeMetrics(model_version="", hostname="pod", served_model="digits")
    for i in range(40):  # a client choosing URLs cannot grow the series without bound ...
        metrics.observe(f"m{i}", 404, 0.001)
    metrics.observe("digits", 200, 0.001)  # ... nor crowd out the model the pod serves
    names = {dict(key)["ModelName"] for (n, key) in samples(metrics.render()) if n == "flownexus_edge_requests_total"}
    assert len(names) == 18 and {"", "digits"} <= names


def test_every_proxied_request_is_timed_to_its_last_byte_with_model_status_class_version_and_host(
    start_proxy: Callable[..., int], upstream: Upstream, proxies: dict[int, ProxyServer]
) -> None:
    port = start_proxy(max_body_bytes=1024, client_timeout_s=60.0)
    assert exchange(port, head(path="/predictions/slow/1.0") + BODY).status == 201
    assert exchange(port, head(path="/predictions/digits") + BODY).status == 201
    assert exchange(port, head(path="/predictions/digits", token="wrong") + BODY).status == 401  # the proxy's own
    assert exchange(port, head(path="/predictions/digits", length=2048)).status == 413
    assert exchange(port, head(path="/ping", token=None, length=None, method="GET")).status == 201  # not counted
    text = proxies[port].metrics.render()
    labelled = [
        (dict(key), value) for (name, key), value in samples(text).items() if name == "flownexus_edge_requests_total"
    ]
    assert all((labels["ModelVersion"], labels["Hostname"]) == ("2.0.0", "pod-0") for labels, _ in labelled)
    totals = {(labels["ModelName"], labels["code"]): value for labels, value in labelled}
    assert totals == {("slow", "2xx"): 1, ("digits", "2xx"): 1, ("digits", "4xx"): 2}
    slow = series(text, "flownexus_edge_request_duration_seconds_bucket", ModelName="slow")
    # The stand-in's 0.2 s are inside the measured time: not in the 0.15 s bucket, in the 0.25 s one.
    assert (slow["0.15"], slow["0.25"]) == (0, 1)
    fast = series(text, "flownexus_edge_request_duration_seconds_bucket", ModelName="digits", code="4xx")
    assert fast["0.1"] == 2


def test_busy_rejections_are_counted_apart(
    start_proxy: Callable[..., int], upstream: Upstream, proxies: dict[int, ProxyServer]
) -> None:
    port = start_proxy(max_inflight=1)
    client = threading.Thread(target=lambda: exchange(port, head(path="/block/x") + BODY, 5))
    client.start()
    assert upstream.arrived.acquire(timeout=5)
    assert exchange(port, head() + BODY, timeout=2).status == 503
    upstream.release.set()
    client.join(timeout=5)
    text = proxies[port].metrics.render()
    assert series(text, "flownexus_edge_busy_rejections_total") == {"": 1}
    assert series(text, "flownexus_edge_requests_total", code="2xx") == {"": 1}


class FakeTorchServeMetrics:
    """TorchServe's metrics listener: ``/metrics`` answers canned Prometheus text and records the paths asked."""

    TEXT = (
        "# HELP ts_inference_requests_total Total number of inference requests.\n"
        "# TYPE ts_inference_requests_total counter\n"
        'ts_inference_requests_total{model_name="digits",model_version="default",hostname="pod-0",} 3.0\n'
    )

    def __init__(self) -> None:
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.paths.append(self.path)
                data = fake.TEXT.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metrics_port(
    start_proxy: Callable[..., int], proxies: dict[int, ProxyServer]
) -> Iterator[Callable[[int | None], tuple[int, int]]]:
    """Starts a proxy (open mode) with TorchServe's metrics at ``upstream_metrics_port`` and its metrics listener;
    returns (inference port, metrics port)."""
    listeners: list[ProxyServer] = []

    def start(upstream_metrics_port: int | None) -> tuple[int, int]:
        port = start_proxy(open_mode=True, upstream_metrics_port=upstream_metrics_port)
        listener = serve_metrics(("127.0.0.1", 0), proxies[port])
        threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        listeners.append(listener)
        return port, listener.server_address[1]

    yield start
    for listener in listeners:
        listener.shutdown()
        listener.server_close()


def scrape(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def test_metrics_port_serves_torchserves_metrics_followed_by_the_edge_metrics(
    metrics_port: Callable[[int | None], tuple[int, int]], upstream: Upstream
) -> None:
    torchserve = FakeTorchServeMetrics()
    try:
        port, metrics = metrics_port(torchserve.port)
        for _ in range(3):
            assert exchange(port, head(token=None) + BODY).status == 201
        status, content_type, text = scrape(metrics)
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert text.startswith(FakeTorchServeMetrics.TEXT)  # TorchServe's text as it was, then the proxy's
        assert series(text, "flownexus_edge_request_duration_seconds_count", ModelName="digits") == {"": 3}
        assert series(text, "flownexus_edge_upstream_metrics_up") == {"": 1}
        assert series(text, "ts_inference_requests_total") == {"": 3.0}
        assert scrape(metrics, "/metrics?name[]=ts_inference_requests_total")[0] == 200
        assert torchserve.paths == ["/metrics", "/metrics?name[]=ts_inference_requests_total"]
        # The metrics listener serves /metrics only, and scrapes are not inference requests.
        assert scrape(metrics, "/predictions/digits")[0] == 404
        assert scrape(metrics, "/metrics", "POST")[0] == 405
        assert series(scrape(metrics)[2], "flownexus_edge_requests_total") == {"": 3}
        assert upstream.contacts() == 3  # nothing on the metrics port reached the inference upstream
    finally:
        torchserve.stop()


def test_without_torchserves_metrics_the_scrape_has_the_edge_metrics_and_up_0(
    metrics_port: Callable[[int | None], tuple[int, int]], upstream: Upstream
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    port, metrics = metrics_port(closed)
    assert exchange(port, head(token=None) + BODY).status == 201
    status, _, text = scrape(metrics)
    assert status == 200
    assert text.startswith("# HELP flownexus_edge_request_duration_seconds ")
    assert series(text, "flownexus_edge_upstream_metrics_up") == {"": 0}
    assert series(text, "flownexus_edge_requests_total", code="2xx") == {"": 1}
