"""The inference auth proxy, run for real on loopback in front of a stand-in for TorchServe.

Every request here is raw HTTP on a socket with a deadline: a proxy that waited for a body it should not read,
or held a connection it should have answered, fails the test on that deadline instead of hanging it.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from flownexus.modeldeployment.pod.auth_proxy import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_INFLIGHT, ProxyServer, Settings

TOKEN = "s3cret"
POD_KEY = "pod-key"
BODY = b'{"inputs": [1, 2]}'


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
def start_proxy(upstream: Upstream, tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Starts a proxy in front of ``upstream`` (token file ``tmp_path/token`` holding TOKEN unless given);
    returns its port. Every proxy started is stopped at the end."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "key_file.json").write_text(json.dumps({"inference": {"key": POD_KEY}, "management": {"key": "m"}}))
    started: list[tuple[ProxyServer, threading.Thread]] = []

    def start(token_file: Path | None = None, **limits: Any) -> int:
        if token_file is None:
            token_file = tmp_path / "token"
            token_file.write_text(TOKEN + "\n")
        settings = Settings(
            upstream_port=upstream.port,
            token_file=str(token_file),
            run_dir=str(run_dir),
            **{"header_timeout_s": 5.0, "client_timeout_s": 5.0, **limits},
        )
        server = ProxyServer(("127.0.0.1", 0), settings)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        port: int = server.server_address[1]
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
