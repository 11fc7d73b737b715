"""Flow Nexus serving pod's edge: every inference request reaches TorchServe (on loopback) through this proxy.

With a token file (``spec.serving.inferenceTokenSecret``) it admits only requests bearing the Secret's token and
forwards them with the pod's own TorchServe inference key; without one it admits every request (TorchServe's
token authorization is then off). /ping stays open for the liveness probe.

It measures what a client sees: ``flownexus_edge_request_duration_seconds`` (a histogram, from the end of a
request's headers to the last byte of its response: TorchServe's queue and batching delay, the handler, and the
proxy) and ``flownexus_edge_requests_total``, labelled ``ModelName`` (from ``/predictions/<model>``),
``ModelVersion``, ``Hostname`` (the pod) and ``code`` (``2xx``, ``4xx``, ``5xx``, the proxy's own answers
included). On the metrics port it serves ``/metrics``: TorchServe's metrics (fetched from its loopback metrics
listener per scrape) followed by its own, so that the pod is scraped on one port as before.

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
import signal
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
STOP_GRACE_S = 20.0  # after SIGTERM and the drain, how long requests in flight may still take
LINGER_S = 2.0  # how long a closed connection's late input is discarded before the socket is closed
CHUNK = 64 * 1024
MAX_CHUNK_LINE = 4096
MAX_TRAILER_LINES = 64

ENV_MAX_BODY_BYTES = "FLOWNEXUS_PROXY_MAX_BODY_BYTES"
ENV_MAX_INFLIGHT = "FLOWNEXUS_PROXY_MAX_INFLIGHT"
ENV_HEADER_TIMEOUT_S = "FLOWNEXUS_PROXY_HEADER_TIMEOUT_S"
ENV_CLIENT_TIMEOUT_S = "FLOWNEXUS_PROXY_CLIENT_TIMEOUT_S"
ENV_TOKEN_REFRESH_S = "FLOWNEXUS_PROXY_TOKEN_REFRESH_S"
ENV_MODEL_VERSION = "FLOWNEXUS_MODEL_VERSION"
ENV_CONF_FILE = "FLOWNEXUS_CONF_FILE"  # config.properties with the init container's models= line
ENV_UPSTREAM_METRICS_PORT = "FLOWNEXUS_UPSTREAM_METRICS_PORT"
ENV_DRAIN_S = "FLOWNEXUS_PROXY_DRAIN_S"
UPSTREAM_METRICS_TIMEOUT_S = 3.0  # per scrape; Prometheus' own scrape timeout is 10 s by default
MAX_UPSTREAM_METRICS_BYTES = 32 * MIB
METRICS_MAX_INFLIGHT = 4  # scrapes served at once on the metrics port (its own slots, apart from inference)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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
    token_file: str | None = None  # None: every request is admitted (no inferenceTokenSecret)
    run_dir: str | None = None  # where TorchServe's key_file.json is; needed with a token file
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S
    token_refresh_s: float = DEFAULT_TOKEN_REFRESH_S
    upstream_timeout_s: float = UPSTREAM_TIMEOUT_S
    upstream_metrics_port: int | None = None  # TorchServe's metrics listener on loopback, when there is one
    model_version: str = ""  # the ModelVersion label: the served archive's version
    hostname: str = ""  # the Hostname label: the pod's name
    model_name: str = ""  # the model the pod serves: always its own ModelName, whatever other URLs clients try

    def __post_init__(self) -> None:
        if self.max_body_bytes < 0 or self.max_inflight < 1:
            raise ValueError("the body cap must be >= 0 and the in-flight cap >= 1")
        if self.token_file is not None and not self.run_dir:
            raise ValueError("a token file needs the run dir (TorchServe's inference key)")
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

        token_file = env.get("FLOWNEXUS_TOKEN_FILE", "").strip() or None
        metrics_port = env.get(ENV_UPSTREAM_METRICS_PORT, "").strip()
        version = env.get(ENV_MODEL_VERSION, "").strip()
        if not version and env.get(ENV_CONF_FILE, "").strip():
            version = served_version(env[ENV_CONF_FILE].strip())
        return cls(
            upstream_port=int(env["FLOWNEXUS_UPSTREAM_PORT"]),
            token_file=token_file,
            run_dir=env["FLOWNEXUS_RUN_DIR"] if token_file is not None else env.get("FLOWNEXUS_RUN_DIR") or None,
            max_body_bytes=number(ENV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES, int),
            max_inflight=number(ENV_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT, int),
            header_timeout_s=number(ENV_HEADER_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, float),
            client_timeout_s=number(ENV_CLIENT_TIMEOUT_S, DEFAULT_CLIENT_TIMEOUT_S, float),
            token_refresh_s=number(ENV_TOKEN_REFRESH_S, DEFAULT_TOKEN_REFRESH_S, float),
            upstream_metrics_port=int(metrics_port) if metrics_port else None,
            model_version=version,
            hostname=env.get("HOSTNAME", "").strip() or socket.gethostname(),
            model_name=env.get("FLOWNEXUS_MODEL_NAME", "").strip(),
        )


def served_version(config_file: str) -> str:
    """The archive's own version from the ``models={name: {version: ...}}`` line the init container appended to
    config.properties (the version TorchServe labels its model metrics with); "" when it cannot be read."""
    try:
        with open(config_file, encoding="utf-8") as f:
            lines = [line for line in f if line.startswith("models=")]
        models = json.loads(lines[-1].removeprefix("models="))
        versions = {str(v) for per_model in models.values() for v in per_model}
    except (OSError, IndexError, ValueError, AttributeError, TypeError) as exc:
        log.warning("no model version in %s (%s): ModelVersion is empty", config_file, type(exc).__name__)
        return ""
    return versions.pop() if len(versions) == 1 else ""


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


# ---- the edge metrics ------------------------------------------------------------------------------------------

DURATION = "flownexus_edge_request_duration_seconds"
REQUESTS = "flownexus_edge_requests_total"
BUSY_REJECTIONS = "flownexus_edge_busy_rejections_total"
UPSTREAM_METRICS_UP = "flownexus_edge_upstream_metrics_up"
# Seconds, suited to model serving: sub-millisecond proxying up to TorchServe's response timeout's range.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_MODEL_NAMES = 16  # distinct other ModelName values; further ones are recorded as "" (clients choose the URL)
_PREDICTIONS = re.compile(r"/predictions/([^/?#]+)(?:/[^/?#]*)?(?:[?#].*)?")


def model_name(path: str) -> str:
    """The model a request names: ``/predictions/<model>[/<version>]``; "" for any other path."""
    match = _PREDICTIONS.fullmatch(path)
    return match.group(1) if match else ""


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value))


class EdgeMetrics:
    """The proxy's request histogram and counters, thread-safe, written in Prometheus' text format (0.0.4)."""

    def __init__(
        self, model_version: str, hostname: str, served_model: str = "", buckets: tuple[float, ...] = BUCKETS
    ) -> None:
        self.model_version = model_version
        self.hostname = hostname
        self.served_model = served_model  # never crowded out by the bound on other names
        self.buckets = buckets
        self._lock = threading.Lock()
        # (ModelName, code) -> per-bucket counts (not cumulative; the last one is +Inf), sum, count
        self._series: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        self._models: set[str] = set()
        self._busy = 0

    def observe(self, model: str, status: int, seconds: float) -> None:
        seconds = max(0.0, seconds)
        index = next((i for i, bound in enumerate(self.buckets) if seconds <= bound), len(self.buckets))
        with self._lock:
            if model != self.served_model and model not in self._models:
                if len(self._models) >= MAX_MODEL_NAMES:
                    model = ""
                else:
                    self._models.add(model)
            counts, total = self._series.setdefault(
                (model, status_class(status)), ([0] * (len(self.buckets) + 1), [0.0])
            )
            counts[index] += 1
            total[0] += seconds

    def busy(self) -> None:
        """A connection answered 503 before its request was read (the in-flight cap)."""
        with self._lock:
            self._busy += 1

    def render(self, upstream_up: bool | None = None) -> str:
        """The exposition text; ``upstream_up`` adds the gauge saying whether TorchServe's metrics came along."""
        with self._lock:
            series = sorted((key, list(counts), total[0]) for key, (counts, total) in self._series.items())
            busy = self._busy
        lines = [
            f"# HELP {DURATION} Time from the end of a request's headers to the last byte of its response at the "
            "serving pod's edge (TorchServe's queue, batching delay and handler, and the proxy).",
            f"# TYPE {DURATION} histogram",
        ]
        counters = []
        for (model, code), counts, total in series:
            labels = (
                f'ModelName="{_label_value(model)}",ModelVersion="{_label_value(self.model_version)}",'
                f'Hostname="{_label_value(self.hostname)}",code="{code}"'
            )
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                lines.append(f'{DURATION}_bucket{{{labels},le="{_number(bound)}"}} {cumulative}')
            lines.append(f"{DURATION}_sum{{{labels}}} {_number(total)}")
            lines.append(f"{DURATION}_count{{{labels}}} {cumulative}")
            counters.append(f"{REQUESTS}{{{labels}}} {cumulative}")
        lines += [
            f"# HELP {REQUESTS} Requests answered at the serving pod's edge (the proxy's own 401/413/503 included).",
            f"# TYPE {REQUESTS} counter",
            *counters,
            f"# HELP {BUSY_REJECTIONS} Connections answered 503 at the in-flight cap before their request was read.",
            f"# TYPE {BUSY_REJECTIONS} counter",
            f"{BUSY_REJECTIONS} {busy}",
        ]
        if upstream_up is not None:
            lines += [
                f"# HELP {UPSTREAM_METRICS_UP} Whether TorchServe's metrics could be read for this scrape.",
                f"# TYPE {UPSTREAM_METRICS_UP} gauge",
                f"{UPSTREAM_METRICS_UP} {int(upstream_up)}",
            ]
        return "\n".join(lines) + "\n"


def upstream_metrics(port: int, path: str, timeout_s: float) -> str | None:
    """TorchServe's metrics text from its loopback listener, or None (unreachable, not 200, too large)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Accept": "text/plain"})
        response = conn.getresponse()
        data = response.read(MAX_UPSTREAM_METRICS_BYTES + 1)
        if response.status != 200 or len(data) > MAX_UPSTREAM_METRICS_BYTES:
            log.warning("TorchServe's metrics: HTTP %d, %d bytes", response.status, len(data))
            return None
        text = data.decode("utf-8")
    except (OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
        log.warning("TorchServe's metrics unavailable: %r", exc)
        return None
    finally:
        conn.close()
    return text if not text or text.endswith("\n") else text + "\n"


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
    """One thread per connection, at most ``max_inflight`` of them; the rest are answered 503 right away.

    The inference listener by default; with ``handler=MetricsHandler`` (and its own small ``max_inflight``) the
    metrics listener, sharing the inference listener's ``metrics``."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        settings: Settings,
        metrics: EdgeMetrics | None = None,
        handler: type[ProxyHandler] | None = None,
        max_inflight: int | None = None,
    ) -> None:
        self.settings = settings
        self.token = None if settings.token_file is None else TokenFile(settings.token_file, settings.token_refresh_s)
        self.metrics = metrics or EdgeMetrics(settings.model_version, settings.hostname, settings.model_name)
        slots = max_inflight or settings.max_inflight
        self.slots = threading.BoundedSemaphore(slots)
        self.linger = _Linger(LINGER_S, capacity=4 * slots + 16)
        try:
            super().__init__(address, handler or ProxyHandler)
        except BaseException:
            self.linger.stop()
            raise

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            if self.RequestHandlerClass is ProxyHandler:
                self.metrics.busy()
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
    _status: int | None = None  # the final status sent for the current request (for the edge metrics)

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
        """One request, its headers read: checked, forwarded, answered; timed unless it is /ping."""
        started = time.monotonic()
        self._status = None
        try:
            self._admit_and_forward()
        finally:
            if self._status is not None and not self._is_ping():
                self.proxy.metrics.observe(model_name(self.path), self._status, time.monotonic() - started)

    def _admit_and_forward(self) -> None:
        token = self.proxy.token
        try:
            if token is not None and not self._is_ping() and not token.matches(self._credential()):
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
        key: str | None = None
        if self.proxy.token is not None:  # TorchServe's token authorization is on: the pod's key goes along
            try:
                key = torchserve_key(settings.run_dir or "")
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
                if key is not None:
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
        self._status = response.status
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
        self._status = reject.status
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


class MetricsHandler(ProxyHandler):
    """The metrics listener: ``GET /metrics`` is TorchServe's metrics text followed by the proxy's own."""

    def scrape(self) -> None:
        self._status = None
        try:
            if self.command != "GET":
                raise _Reject(405, "only GET", {"Allow": "GET"})
            if self.path.partition("?")[0] != "/metrics":
                raise _Reject(404, "only /metrics is served here")
            if self._body_length() != 0:
                raise _Reject(400, "a scrape has no body")
        except _Reject as reject:
            self._reject(reject)
            return
        settings, upstream_up, text = self.proxy.settings, None, ""
        if settings.upstream_metrics_port is not None:
            # The query string (e.g. TorchServe's name[] filter) goes along; the proxy's own metrics always follow.
            fetched = upstream_metrics(settings.upstream_metrics_port, self.path, UPSTREAM_METRICS_TIMEOUT_S)
            upstream_up, text = fetched is not None, fetched or ""
        data = (text + self.proxy.metrics.render(upstream_up)).encode("utf-8")
        self.send_response_only(200)
        self.send_header("Content-Type", METRICS_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = scrape


def serve(address: tuple[str, int], settings: Settings) -> ProxyServer:
    """A bound, listening proxy; call ``serve_forever`` (and ``shutdown``/``server_close``) on it."""
    return ProxyServer(address, settings)


def serve_metrics(address: tuple[str, int], proxy: ProxyServer) -> ProxyServer:
    """The metrics listener of ``proxy`` (its own slots: a scrape never waits for an inference slot)."""
    return ProxyServer(address, proxy.settings, proxy.metrics, MetricsHandler, METRICS_MAX_INFLIGHT)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s auth-proxy: %(message)s")
    try:
        settings = Settings.from_env(os.environ)
        port = int(os.environ["FLOWNEXUS_PROXY_PORT"])
        metrics_port = int(os.environ.get("FLOWNEXUS_METRICS_PORT") or 0)
        drain_s = float(os.environ.get(ENV_DRAIN_S) or 0)
    except KeyError as exc:
        sys.exit(f"auth proxy: {exc.args[0]} is not set")
    except ValueError as exc:
        sys.exit(f"auth proxy: {exc}")
    server = serve(("0.0.0.0", port), settings)
    servers = [server]
    if metrics_port:
        servers.append(serve_metrics(("0.0.0.0", metrics_port), server))
        threading.Thread(target=servers[1].serve_forever, name="metrics", daemon=True).start()
    log.info(
        "listening on :%d for 127.0.0.1:%d (%s); body <= %d bytes, <= %d in flight, headers within %gs, body within "
        "%gs; metrics on :%s; ModelVersion %r",
        port, settings.upstream_port, "token required" if server.token else "no token", settings.max_body_bytes,
        settings.max_inflight, settings.header_timeout_s, settings.client_timeout_s, metrics_port or "-",
        settings.model_version,
    )  # fmt: skip
    if server.token is not None:
        server.token.current()  # logs whether a token is there, never the token

    def stop() -> None:
        time.sleep(drain_s)  # keep answering while the pod's endpoint is removed
        for s in servers:
            s.shutdown()

    def on_sigterm(signum: int, frame: Any) -> None:
        log.info("SIGTERM: serving %gs more, then finishing what is in flight", drain_s)
        threading.Thread(target=stop, name="stop", daemon=True).start()

    # As PID 1 without a handler, SIGTERM would be ignored and the pod would wait for SIGKILL.
    signal.signal(signal.SIGTERM, on_sigterm)
    server.serve_forever()
    deadline = time.monotonic() + STOP_GRACE_S
    for _ in range(settings.max_inflight):  # every slot free again: nothing in flight
        if not server.slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            break
    for s in servers:
        s.server_close()


if __name__ == "__main__":
    main()
