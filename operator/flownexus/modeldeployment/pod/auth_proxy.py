"""Flow Nexus inference auth proxy: admits requests bearing the Secret's token, forwards them to TorchServe
on loopback with the pod's own TorchServe inference key. /ping stays open for the liveness probe."""

import hmac
import http.client
import http.server
import json
import os
from typing import Any

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-authorization", "authorization",
       "content-length", "host"}  # fmt: skip


def torchserve_key() -> str:
    with open(os.path.join(os.environ["FLOWNEXUS_RUN_DIR"], "key_file.json"), encoding="utf-8") as f:
        return str(json.load(f)["inference"]["key"])


def expected_token() -> bytes:
    with open(os.environ["FLOWNEXUS_TOKEN_FILE"], "rb") as f:
        return b"Bearer " + f.read().strip()


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    expected = b""
    upstream = 0

    def forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        given = (self.headers.get("Authorization") or "").encode()
        if self.path != "/ping" and not hmac.compare_digest(given, self.expected):
            self.reply(401, b'{"code": 401, "message": "missing or wrong bearer token"}', "application/json")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        try:
            headers["Authorization"] = "Bearer " + torchserve_key()
            conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=300)
            conn.request(self.command, self.path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
        except Exception as exc:
            message = json.dumps({"code": 503, "message": f"TorchServe unavailable: {exc}"}).encode()
            self.reply(503, message, "application/json")
            return
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    def reply(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    Proxy.expected = expected_token()
    Proxy.upstream = int(os.environ["FLOWNEXUS_UPSTREAM_PORT"])
    http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["FLOWNEXUS_PROXY_PORT"])), Proxy).serve_forever()


if __name__ == "__main__":
    main()
