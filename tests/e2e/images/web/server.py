"""HTTP server used by the e2e tests: `/` names the pod, `/burn?ms=N` spins the CPU for N milliseconds."""

import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/burn":
            deadline = time.monotonic() + int(parse_qs(url.query).get("ms", ["100"])[0]) / 1000
            while time.monotonic() < deadline:
                pass
        body = f"hello from {os.environ.get('HOSTNAME', 'unknown')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown the pod log under load


if __name__ == "__main__":
    ThreadingHTTPServer(("", 8080), Handler).serve_forever()
