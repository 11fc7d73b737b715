"""Flow Nexus inference auth proxy: admits requests bearing the Secret's token, forwards them to TorchServe
on loopback with the pod's own TorchServe inference key. /ping stays open for the liveness probe.

Hardened against clients it has not authenticated yet:

- the token is checked on the request headers, before any body byte is read (401 with
  ``WWW-Authenticate: Bearer``, constant-time compare); an ``Expect: 100-continue`` is answered only after it;
- the token file (a Secret volume) is re-read when the file it resolves to changes (kubelet swaps the
  ``..data`` symlink: new inode) and at least every ``FLOWNEXUS_PROXY_TOKEN_REFRESH_S``; a missing, empty or
  unreadable file denies every request (fail closed); the token is never logged;
- request bodies are capped (``FLOWNEXUS_PROXY_MAX_BODY_BYTES``, 10 MiB): 413 when Content-Length says more,
  or when a chunked body grows past it; 411 for a POST/PUT/PATCH with neither; bodies are streamed to
  TorchServe in 64 KiB pieces, never held whole (nor are responses);
- at most ``FLOWNEXUS_PROXY_MAX_INFLIGHT`` connections (64) are served at once, one thread each; the next one
  is answered 503 with ``Retry-After`` from the accepting thread, without starting a thread;
- a connection gets ``FLOWNEXUS_PROXY_HEADER_TIMEOUT_S`` (10 s) to deliver its request line and headers (also
  the keep-alive idle time; at most 64 KiB of them) and ``FLOWNEXUS_PROXY_CLIENT_TIMEOUT_S`` (60 s) to deliver
  its body, as deadlines, so that a client trickling bytes cannot hold a slot; the same timeout bounds each
  write to the client;
- connections are closed gracefully off the request threads (half-close, discard what the client still
  sends for a short while), so that a client still sending its body reads the 401/413/503 instead of a reset.

Standard library only: the server image's Python runs it as a plain file (``python auth_proxy.py``).
"""

from __future__ import annotations

import contextlib
import hmac
import http
import http.client
import http.server
import io
import json
import logging
import math
import os
import re
import selectors
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger("flownexus.auth_proxy")

MIB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 10 * MIB
DEFAULT_MAX_INFLIGHT = 64
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_CLIENT_TIMEOUT_S = 60.0
DEFAULT_TOKEN_REFRESH_S = 5.0
UPSTREAM_TIMEOUT_S = 300.0  # TorchServe answers within its own response timeout (120 s)
MAX_HEADER_BYTES = 64 * 1024  # request line + headers of one request
MAX_TOKEN_BYTES = 4096
LINGER_S = 2.0  # how long a closed connection's late input is discarded before the socket is closed
CHUNK = 64 * 1024
MAX_CHUNK_LINE = 4096
MAX_TRAILER_LINES = 64

ENV_MAX_BODY_BYTES = "FLOWNEXUS_PROXY_MAX_BODY_BYTES"
ENV_MAX_INFLIGHT = "FLOWNEXUS_PROXY_MAX_INFLIGHT"
ENV_HEADER_TIMEOUT_S = "FLOWNEXUS_PROXY_HEADER_TIMEOUT_S"
ENV_CLIENT_TIMEOUT_S = "FLOWNEXUS_PROXY_CLIENT_TIMEOUT_S"
ENV_TOKEN_REFRESH_S = "FLOWNEXUS_PROXY_TOKEN_REFRESH_S"

# Hop-by-hop headers (plus the ones the proxy sets itself): never forwarded either way.
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "proxy-authenticate", "authorization", "content-length", "host", "expect"}  # fmt: skip
BODY_METHODS = {"POST", "PUT", "PATCH"}
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True)
class Settings:
    """Where to forward, where the token is, and the limits; read once at start."""

    upstream_port: int
    token_file: str
    run_dir: str
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S
    token_refresh_s: float = DEFAULT_TOKEN_REFRESH_S
    upstream_timeout_s: float = UPSTREAM_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_body_bytes < 0 or self.max_inflight < 1:
            raise ValueError("the body cap must be >= 0 and the in-flight cap >= 1")
        timeouts = (self.header_timeout_s, self.client_timeout_s, self.token_refresh_s, self.upstream_timeout_s)
        if not all(math.isfinite(t) and t > 0 for t in timeouts):
            raise ValueError("timeouts and the token refresh interval must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """The settings from the container's environment; ValueError/KeyError name what is wrong."""

        def number(name: str, default: float, kind: type[int] | type[float]) -> Any:
            raw = env.get(name, "").strip()
            try:
                return kind(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None

        return cls(
            upstream_port=int(env["FLOWNEXUS_UPSTREAM_PORT"]),
            token_file=env["FLOWNEXUS_TOKEN_FILE"],
            run_dir=env["FLOWNEXUS_RUN_DIR"],
            max_body_bytes=number(ENV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES, int),
            max_inflight=number(ENV_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT, int),
            header_timeout_s=number(ENV_HEADER_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, float),
            client_timeout_s=number(ENV_CLIENT_TIMEOUT_S, DEFAULT_CLIENT_TIMEOUT_S, float),
            token_refresh_s=number(ENV_TOKEN_REFRESH_S, DEFAULT_TOKEN_REFRESH_S, float),
        )


def torchserve_key(run_dir: str) -> str:
    """The pod's TorchServe inference key (TorchServe rewrites the file: read it per request)."""
    with open(os.path.join(run_dir, "key_file.json"), encoding="utf-8") as f:
        return str(json.load(f)["inference"]["key"])


# ---- the token --------------------------------------------------------------------------------------------


class TokenFile:
    """The expected bearer token, re-read when the file the path resolves to changes, and every ``refresh_s``.

    kubelet updates a Secret volume by writing a new timestamped directory and renaming the ``..data`` symlink
    over the old one; ``key`` -> ``..data/key`` then resolves to a new inode, which a stat (following links) on
    each request notices. ``None`` (missing, empty, unreadable, oversized file) denies everything.
    """

    def __init__(self, path: str, refresh_s: float) -> None:
        self.path = path
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int, int] | None = None
        self._token: bytes | None = None
        self._read_at = -math.inf
        self._state = ""

    def current(self) -> bytes | None:
        signature = _signature(self.path)
        now = time.monotonic()
        with self._lock:
            if signature != self._signature or now - self._read_at >= self._refresh_s:
                self._reload(now)
            return self._token

    def matches(self, credential: bytes | None) -> bool:
        token = self.current()
        if token is None or credential is None:
            return False
        return hmac.compare_digest(credential, token)

    def _reload(self, now: float) -> None:
        token: bytes | None = None
        signature: tuple[int, int, int, int] | None = None
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
                raw = f.read(MAX_TOKEN_BYTES + 1)
        except FileNotFoundError:
            state = "missing"
        except OSError as exc:
            state = f"unreadable ({exc.strerror})"
        else:
            token = raw.strip() or None
            state = "loaded" if token else "empty"
            if len(raw) > MAX_TOKEN_BYTES:
                token, state = None, f"larger than {MAX_TOKEN_BYTES} bytes"
        changed = (state, signature) != (self._state, self._signature)
        self._token, self._signature, self._read_at = token, signature, now
        if changed:
            if token is None:
                log.warning("inference token file %s is %s: denying every request", self.path, state)
            else:
                log.info("inference token %s from %s", "loaded" if self._state != "loaded" else "reloaded", self.path)
        self._state = state


def _signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


# ---- sockets: deadlines, graceful close ----------------------------------------------------------------------


class _HeadersTooLarge(Exception):
    pass


class _DeadlineReader(io.RawIOBase):
    """The client socket, read against an overall deadline (not a per-recv timeout) and a byte budget."""

    def __init__(self, sock: socket.socket, io_timeout_s: float) -> None:
        super().__init__()
        self._sock = sock
        self._io_timeout_s = io_timeout_s
        self.deadline = math.inf
        self.budget: float = math.inf

    def phase(self, timeout_s: float, budget: float = math.inf) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self.budget <= 0:
            raise _HeadersTooLarge
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("client deadline passed")
        self._sock.settimeout(min(remaining, self._io_timeout_s))
        with memoryview(buffer) as view:
            limit = view.nbytes if self.budget == math.inf else min(view.nbytes, int(self.budget))
            n = self._sock.recv_into(view[:limit])
        self.budget -= n
        return n


class _Writer(io.BufferedIOBase):
    """The client socket, written with a timeout on each whole write."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        super().__init__()
        self._sock = sock
        self._timeout_s = timeout_s

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        self._sock.settimeout(self._timeout_s)
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes


class _Linger:
    """Closes client sockets for the request threads: half-close, discard what the client still sends until it
    closes too or ``grace_s`` passes, then close. A plain close with unread input would reset the connection,
    and a client still writing its body would lose the response. Bounded: beyond ``capacity`` sockets, close."""

    def __init__(self, grace_s: float, capacity: int) -> None:
        self._grace_s = grace_s
        self._capacity = capacity
        self._lock = threading.Lock()
        self._incoming: list[socket.socket] = []
        self._owned = 0
        self._stopping = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="auth-proxy-linger", daemon=True)
        self._thread.start()

    def close(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        with self._lock:
            taken = not self._stopping and self._owned < self._capacity
            if taken:
                self._incoming.append(sock)
                self._owned += 1
        if not taken:
            sock.close()
            return
        with contextlib.suppress(OSError):  # a full wake-up pipe: the thread is awake anyway
            self._wake_w.send(b"\0")

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(timeout=5)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        deadlines: dict[socket.socket, float] = {}
        try:
            while True:
                with self._lock:
                    incoming, self._incoming = self._incoming, []
                    stopping = self._stopping
                deadlines.update((s, time.monotonic() + self._grace_s) for s in incoming)
                for s in incoming:
                    self._selector.register(s, selectors.EVENT_READ, s)
                if stopping:
                    return
                timeout = max(0.0, min(deadlines.values()) - time.monotonic()) if deadlines else None
                for key, _ in self._selector.select(timeout):
                    sock = key.data
                    if sock is None:
                        self._drain_wake()
                    elif not _discard(sock):
                        self._drop(sock, deadlines)
                now = time.monotonic()
                for sock in [s for s, d in deadlines.items() if d <= now]:
                    self._drop(sock, deadlines)
        finally:
            for sock in list(deadlines):
                self._drop(sock, deadlines)
            with self._lock:
                leftover, self._incoming = self._incoming, []
            for sock in leftover:
                sock.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _drop(self, sock: socket.socket, deadlines: dict[socket.socket, float]) -> None:
        deadlines.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()
        with self._lock:
            self._owned -= 1


def _discard(sock: socket.socket) -> bool:
    """Read and drop what is there; False once the client has closed (or the socket failed)."""
    try:
        return bool(sock.recv(CHUNK))
    except BlockingIOError:
        return True
    except OSError:
        return False


def _raw_response(status: int, message: str, headers: Mapping[str, str]) -> bytes:
    body = json.dumps({"code": status, "message": message}).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


BUSY = _raw_response(503, "too many requests in flight, retry shortly", {"Retry-After": "1"})
HEADERS_TOO_LARGE = _raw_response(431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes", {})


# ---- the server -----------------------------------------------------------------------------------------------


class ProxyServer(http.server.ThreadingHTTPServer):
    """One thread per connection, at most ``max_inflight`` of them; the rest are answered 503 right away."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], settings: Settings) -> None:
        self.settings = settings
        self.token = TokenFile(settings.token_file, settings.token_refresh_s)
        self.slots = threading.BoundedSemaphore(settings.max_inflight)
        self.linger = _Linger(LINGER_S, capacity=4 * settings.max_inflight + 16)
        try:
            super().__init__(address, ProxyHandler)
        except BaseException:
            self.linger.stop()
            raise

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            if isinstance(request, socket.socket):
                try:
                    request.setblocking(False)
                    request.send(BUSY)  # a fresh socket's send buffer takes it whole; never blocks this thread
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            # Free the slot before the client can see the connection end.
            self.slots.release()
            self.shutdown_request(request)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        if isinstance(request, socket.socket):
            self.linger.close(request)
        else:
            super().shutdown_request(request)

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("connection from %s ended: %r", client_address, exc)
        else:
            log.warning("request from %s failed: %r", client_address, exc)

    def server_close(self) -> None:
        try:
            super().server_close()
        finally:
            self.linger.stop()


class _Reject(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class _ClientGone(Exception):
    pass


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    _expect_continue = False

    @property
    def proxy(self) -> ProxyServer:
        assert isinstance(self.server, ProxyServer)
        return self.server

    def setup(self) -> None:
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        settings = self.proxy.settings
        self._reader = _DeadlineReader(self.connection, settings.client_timeout_s)
        self.rfile = io.BufferedReader(self._reader, CHUNK)
        self.wfile = _Writer(self.connection, settings.client_timeout_s)

    def handle(self) -> None:
        self.close_connection = True
        while True:
            # The request line and headers (after keep-alive idling) must arrive by a deadline, within a budget.
            self._reader.phase(self.proxy.settings.header_timeout_s, MAX_HEADER_BYTES)
            self._expect_continue = False
            try:
                self.handle_one_request()
            except _HeadersTooLarge:
                self.wfile.write(HEADERS_TOO_LARGE)
                self.close_connection = True
            if self.close_connection:
                return

    def handle_expect_100(self) -> bool:
        # Not before the token and the size are checked: a rejected client must not be invited to send its body.
        self._expect_continue = True
        return True

    def forward(self) -> None:
        try:
            if not self._is_ping() and not self.proxy.token.matches(self._credential()):
                raise _Reject(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            length = self._body_length()
        except _Reject as reject:
            self._reject(reject)
            return
        if self._expect_continue and length != 0:
            self.send_response_only(http.HTTPStatus.CONTINUE)
            self.end_headers()
        self._reader.phase(self.proxy.settings.client_timeout_s)
        self._forward(length)

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = forward

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ---- checks on the headers ----

    def _is_ping(self) -> bool:
        return self.path == "/ping" or self.path.startswith("/ping?")

    def _credential(self) -> bytes | None:
        values = self.headers.get_all("Authorization") or []
        if len(values) != 1:
            return None
        scheme, _, credential = str(values[0]).strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return credential.strip().encode("latin-1", "replace")

    def _header_list(self, name: str) -> list[str]:
        """The comma-separated elements of every ``name`` header, stripped."""
        parts = (part.strip() for value in self.headers.get_all(name) or [] for part in str(value).split(","))
        return [part for part in parts if part]

    def _body_length(self) -> int | None:
        """The body's length from Content-Length, None for chunked; rejects what cannot or must not be read."""
        codings = [c.lower() for c in self._header_list("Transfer-Encoding")]
        lengths = set(self._header_list("Content-Length"))
        limit = self.proxy.settings.max_body_bytes
        if codings:
            if lengths:
                raise _Reject(400, "both Transfer-Encoding and Content-Length")
            if codings != ["chunked"]:
                raise _Reject(501, "only the chunked transfer coding is supported")
            if self.request_version == "HTTP/1.0":
                raise _Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
            return None
        if lengths:
            (value, *others) = sorted(lengths)
            if others or not _DIGITS.fullmatch(value):
                raise _Reject(400, "invalid Content-Length")
            if int(value) > limit:
                raise _Reject(413, f"request body larger than {limit} bytes")
            return int(value)
        if self.command in BODY_METHODS:
            raise _Reject(411, "Content-Length or Transfer-Encoding: chunked required")
        return 0

    # ---- forwarding ----

    def _upstream_headers(self) -> Iterator[tuple[str, str]]:
        named = {t.lower() for t in self._header_list("Connection")}
        for key, value in self.headers.items():
            if key.lower() not in HOP and key.lower() not in named:
                yield key, str(value)

    def _forward(self, length: int | None) -> None:
        settings = self.proxy.settings
        try:
            key = torchserve_key(settings.run_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._reject(_Reject(503, f"TorchServe key unavailable: {type(exc).__name__}"))
            return
        conn = http.client.HTTPConnection("127.0.0.1", settings.upstream_port, timeout=settings.upstream_timeout_s)
        response: http.client.HTTPResponse | None = None
        try:
            try:
                conn.putrequest(self.command, self.path, skip_accept_encoding=True)
                for k, v in self._upstream_headers():
                    conn.putheader(k, v)
                conn.putheader("Authorization", "Bearer " + key)
                if length is None:
                    conn.putheader("Transfer-Encoding", "chunked")
                elif length or self.headers.get("Content-Length") is not None:
                    conn.putheader("Content-Length", str(length))
            except ValueError:
                raise _Reject(400, "malformed request target or header") from None
            try:
                conn.endheaders()
            except OSError as exc:
                raise _Reject(503, f"TorchServe unavailable: {exc}") from None
            upstream_ok = self._copy_body(conn, length)
            if not upstream_ok:
                self.close_connection = True  # the rest of the body was not read
            try:
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise _Reject(503, f"TorchServe unavailable: {exc}") from None
            self._relay(response)
        except _Reject as reject:
            self._reject(reject)
        except _ClientGone:
            self.close_connection = True
        finally:
            if response is not None:
                response.close()
            conn.close()

    def _read(self, size: int) -> bytes:
        try:
            data = self.rfile.read(size)
        except TimeoutError:
            raise _Reject(408, "request body not received in time") from None
        except OSError:
            raise _ClientGone from None
        if not data:
            raise _ClientGone
        return data

    def _readline(self) -> bytes:
        try:
            line = self.rfile.readline(MAX_CHUNK_LINE + 1)
        except TimeoutError:
            raise _Reject(408, "request body not received in time") from None
        except OSError:
            raise _ClientGone from None
        if not line:
            raise _ClientGone
        if len(line) > MAX_CHUNK_LINE or not line.endswith(b"\n"):
            raise _Reject(400, "malformed chunked body")
        return line

    def _copy_body(self, conn: http.client.HTTPConnection, length: int | None) -> bool:
        """Streams the client's body to TorchServe; False when TorchServe stopped taking it (the rest unread)."""

        def send(data: bytes) -> bool:
            try:
                conn.send(data)
            except OSError:
                return False
            return True

        if length is not None:
            remaining = length
            while remaining:
                data = self._read(min(CHUNK, remaining))
                remaining -= len(data)
                if not send(data):
                    return False
            return True
        limit, total = self.proxy.settings.max_body_bytes, 0
        while True:
            size_field = self._readline().split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_field):
                raise _Reject(400, "malformed chunked body")
            size = int(size_field, 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise _Reject(413, f"request body larger than {limit} bytes")
            if not send(b"%X\r\n" % size):
                return False
            remaining = size
            while remaining:
                data = self._read(min(CHUNK, remaining))
                remaining -= len(data)
                if not send(data):
                    return False
            if self._readline().strip():
                raise _Reject(400, "malformed chunked body")
            if not send(b"\r\n"):
                return False
        for _ in range(MAX_TRAILER_LINES):  # trailers are read and dropped
            if not self._readline().strip():
                return send(b"0\r\n\r\n")
        raise _Reject(400, "too many trailer lines")

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """Streams TorchServe's response back: its length when it gave one, else chunked (or until close)."""
        named = {t.strip().lower() for t in (response.getheader("Connection") or "").split(",")}
        self.send_response_only(response.status, response.reason)
        for k, v in response.getheaders():
            if k.lower() not in HOP and k.lower() not in named:
                self.send_header(k, v)
        length = response.length
        if self.command == "HEAD" or response.status in (204, 304) or response.status < 200:
            mode = "none"
            if self.command == "HEAD" and response.getheader("Content-Length"):
                self.send_header("Content-Length", response.getheader("Content-Length") or "0")
        elif length is not None:
            mode = "length"
            self.send_header("Content-Length", str(length))
        elif self.request_version != "HTTP/1.0":
            mode = "chunked"
            self.send_header("Transfer-Encoding", "chunked")
        else:
            mode = "close"
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if mode == "none":
            return
        sent = 0
        try:
            while data := response.read1(CHUNK):
                sent += len(data)
                self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if mode == "chunked" else data)
        except (OSError, http.client.HTTPException):
            self.close_connection = True  # the client sees a cut-short response
            return
        if mode == "length" and sent != length:
            self.close_connection = True
        elif mode == "chunked":
            self.wfile.write(b"0\r\n\r\n")

    def _reject(self, reject: _Reject) -> None:
        """A final error response, then the connection closes (an unread body may follow the headers)."""
        data = json.dumps({"code": reject.status, "message": reject.message}).encode()
        try:
            self.send_response_only(reject.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in reject.headers.items():
                self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass
        self.close_connection = True


def serve(address: tuple[str, int], settings: Settings) -> ProxyServer:
    """A bound, listening proxy; call ``serve_forever`` (and ``shutdown``/``server_close``) on it."""
    return ProxyServer(address, settings)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s auth-proxy: %(message)s")
    try:
        settings = Settings.from_env(os.environ)
        port = int(os.environ["FLOWNEXUS_PROXY_PORT"])
    except KeyError as exc:
        sys.exit(f"auth proxy: {exc.args[0]} is not set")
    except ValueError as exc:
        sys.exit(f"auth proxy: {exc}")
    server = serve(("0.0.0.0", port), settings)
    log.info(
        "listening on :%d for 127.0.0.1:%d; body <= %d bytes, <= %d in flight, headers within %gs, body within %gs",
        port, settings.upstream_port, settings.max_body_bytes, settings.max_inflight, settings.header_timeout_s,
        settings.client_timeout_s,
    )  # fmt: skip
    server.token.current()  # logs whether a token is there, never the token
    server.serve_forever()


if __name__ == "__main__":
    main()
