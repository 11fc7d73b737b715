"""Flow Nexus smoke traffic: POST one JSON body to the canary at a fixed rate for a fixed time, and count.

Runs in the smoke Job of a canary step as ``python -c <this file>`` (the server image's Python, standard library
only). It is synthetic traffic for the canary analysis to measure, never a judge: every answer and every
failure to connect is counted, the counts are logged every few seconds and at the end, and the exit status is
0 whatever the answers were (a bad canary is the analysis' verdict, not the Job's). Only a configuration it
cannot use exits non-zero.

Environment: FLOWNEXUS_SMOKE_URL, FLOWNEXUS_SMOKE_RPS, FLOWNEXUS_SMOKE_DURATION_S, FLOWNEXUS_SMOKE_BODY,
FLOWNEXUS_SMOKE_EXPECT_STATUS, and FLOWNEXUS_TOKEN_FILE (a bearer token, when the inference API needs one).
"""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

REPORT_EVERY_S = 10.0
TIMEOUT_S = 10.0  # per request
MAX_IN_FLIGHT = 64  # requests waiting for an answer; beyond it a tick is skipped (counted), not queued


class Counts:
    """Answers by HTTP status (``"200"``), failures by kind (``"error:ConnectionRefusedError"``), skipped ticks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by: dict[str, int] = {}
        self.in_flight = 0

    def add(self, key: str) -> None:
        with self.lock:
            self.by[key] = self.by.get(key, 0) + 1

    def start(self) -> bool:
        with self.lock:
            if self.in_flight >= MAX_IN_FLIGHT:
                return False
            self.in_flight += 1
            return True

    def done(self, key: str) -> None:
        with self.lock:
            self.in_flight -= 1
            self.by[key] = self.by.get(key, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(sorted(self.by.items()))


def send(url: str, body: bytes, headers: dict[str, str], counts: Counts) -> None:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            response.read()
            key = str(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        key = str(exc.code)
    except urllib.error.URLError as exc:
        reason = exc.reason
        key = f"error:{type(reason).__name__ if isinstance(reason, BaseException) else 'URLError'}"
    except (OSError, ValueError) as exc:  # a reset, a timeout while reading, a malformed answer
        key = f"error:{type(exc).__name__}"
    counts.done(key)


def report(counts: Counts, sent: int, expect: int, final: bool) -> None:
    answers = counts.snapshot()
    line = {
        "final": final,
        "sent": sent,
        "expectStatus": expect,
        "expected": answers.get(str(expect), 0),
        "answers": answers,
    }
    print(json.dumps(line, sort_keys=True), flush=True)


def main() -> int:
    try:
        url = os.environ["FLOWNEXUS_SMOKE_URL"]
        rate = float(os.environ["FLOWNEXUS_SMOKE_RPS"])
        duration = float(os.environ["FLOWNEXUS_SMOKE_DURATION_S"])
        expect = int(os.environ.get("FLOWNEXUS_SMOKE_EXPECT_STATUS", "200"))
        body = os.environ["FLOWNEXUS_SMOKE_BODY"].encode("utf-8")
    except (KeyError, ValueError) as exc:
        print(f"smoke traffic: bad configuration: {exc!r}", file=sys.stderr)
        return 2
    if rate <= 0 or duration <= 0:
        print(f"smoke traffic: rate {rate} and duration {duration} must be > 0", file=sys.stderr)
        return 2
    headers = {"Content-Type": "application/json", "User-Agent": "flownexus-smoke-traffic"}
    token_file = os.environ.get("FLOWNEXUS_TOKEN_FILE")
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            headers["Authorization"] = f"Bearer {f.read().strip()}"
    total = max(1, round(rate * duration))
    counts = Counts()
    print(f"smoke traffic: {total} POSTs to {url} at {rate:g}/s over {duration:g}s", flush=True)
    start = time.monotonic()
    next_report = start + REPORT_EVERY_S
    sent = 0
    with ThreadPoolExecutor(max_workers=min(MAX_IN_FLIGHT, max(4, int(rate * 2)))) as pool:
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if counts.start():
                pool.submit(send, url, body, headers, counts)
                sent += 1
            else:
                counts.add("skipped:in-flight-limit")
            if time.monotonic() >= next_report:
                report(counts, sent, expect, final=False)
                next_report += REPORT_EVERY_S
    report(counts, sent, expect, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
