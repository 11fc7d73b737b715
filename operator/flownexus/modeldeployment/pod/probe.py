"""Flow Nexus readiness: the model is registered and at least one worker is READY (describe-model)."""

import json
import os
import sys
import urllib.request


def main() -> None:
    name, port = os.environ["FLOWNEXUS_MODEL_NAME"], os.environ["FLOWNEXUS_MANAGEMENT_PORT"]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/models/{name}")
    key_file = os.path.join(os.environ["FLOWNEXUS_RUN_DIR"], "key_file.json")
    if os.path.exists(key_file):
        with open(key_file, encoding="utf-8") as f:
            request.add_header("Authorization", "Bearer " + json.load(f)["management"]["key"])
    try:
        with urllib.request.urlopen(request, timeout=3) as resp:
            models = json.load(resp)
    except Exception as exc:
        sys.exit(f"describe-model failed: {exc}")
    workers = [w for m in models for w in m.get("workers", [])]
    if not any(w.get("status") == "READY" for w in workers):
        sys.exit(f"model {name} has no READY worker: {workers}")


if __name__ == "__main__":
    main()
