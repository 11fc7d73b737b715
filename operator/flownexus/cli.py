"""`kubectl flownexus`: status, history and manual control of ModelDeployments and TrainingJobs, and a prediction
through a ModelDeployment (installed as the `kubectl-flownexus` console script, which kubectl finds on PATH).

Every write is a JSON merge patch of the spec with field manager ``kubectl-flownexus``: the same fields a GitOps
manifest sets (``spec.rollout.paused``, ``spec.rollout.action``, ``spec.runPolicy.suspend``), so Git, Argo CD's
resource actions and this plugin all speak to the operator the same way. The pure parts (tables, patches, the
choice of pod, the request body) come first; the API calls are in :class:`Kube`; the commands last.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import random
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import quote, urlencode

from pydantic import ValidationError

from . import __version__
from .api.modeldeployment import HandledAction, ModelDeploymentSpec, ModelDeploymentStatus
from .meta import parse_time
from .runtime.client import ApiError as RestError
from .runtime.client import Client, path

FIELD_MANAGER = "kubectl-flownexus"
USER_AGENT = f"kubectl-flownexus/{__version__}"
GROUP, VERSION = "flownexus.io", "v1alpha1"
Manifest = dict[str, Any]
Kind = Literal["ModelDeployment", "TrainingJob"]
PLURAL: dict[str, str] = {"ModelDeployment": "modeldeployments", "TrainingJob": "trainingjobs"}
KIND_NAMES: dict[str, Kind] = {
    "modeldeployment": "ModelDeployment",
    "modeldeployments": "ModelDeployment",
    "mdep": "ModelDeployment",
    f"modeldeployments.{GROUP}": "ModelDeployment",
    "trainingjob": "TrainingJob",
    "trainingjobs": "TrainingJob",
    "tj": "TrainingJob",
    f"trainingjobs.{GROUP}": "TrainingJob",
}
INFERENCE_PORT = 8080  # the Service's port and the serving pods' (the auth proxy's when a token is required)
TOKEN_KEY = "key"  # the key of spec.serving.inferenceTokenSecret that holds the bearer token
ACTION_WAIT_S = 30.0


class UsageError(Exception):
    """Bad input or an object that does not exist: the message names it; exit status 1."""


# ---- targets -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    kind: Kind
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def parse_target(arg: str) -> Target:
    """``mdep/digits``, ``tj/digits``, ``modeldeployment/digits`` ...; a bare name is a ModelDeployment."""
    kind_part, slash, name = arg.partition("/")
    if not slash:
        kind_part, name = "mdep", arg
    kind = KIND_NAMES.get(kind_part.lower())
    if kind is None:
        raise UsageError(f"{arg!r}: unknown kind {kind_part!r}; use mdep/NAME or tj/NAME")
    if not name:
        raise UsageError(f"{arg!r}: no name after {kind_part}/")
    return Target(kind, name)


def require_kind(target: Target, kinds: tuple[Kind, ...], command: str) -> None:
    if target.kind not in kinds:
        raise UsageError(f"{command} does not apply to a {target.kind} ({target}); it takes a {' or '.join(kinds)}")


# ---- patches ---------------------------------------------------------------------------------------------


def new_action_id(now: datetime, suffix: str | None = None) -> str:
    """A fresh id for spec.rollout.action: time and a random suffix (letters and digits, '-'; 63 at most)."""
    return f"kubectl-{now.astimezone(UTC).strftime('%Y%m%dt%H%M%Sz')}-{suffix or secrets.token_hex(3)}"


def action_patch(name: str, action_id: str) -> Manifest:
    return {"spec": {"rollout": {"action": {"name": name, "id": action_id}}}}


def paused_patch(paused: bool) -> Manifest:
    return {"spec": {"rollout": {"paused": paused}}}


def suspend_patch(suspend: bool) -> Manifest:
    return {"spec": {"runPolicy": {"suspend": suspend}}}


def pause_patch(kind: Kind, pause: bool) -> Manifest:
    """pause/resume: a ModelDeployment's rollout (spec.rollout.paused), a TrainingJob's pods (runPolicy.suspend)."""
    return paused_patch(pause) if kind == "ModelDeployment" else suspend_patch(pause)


def handled(obj: Manifest, action_id: str) -> HandledAction | None:
    """The operator's record of the action with this id, once it has handled it."""
    for entry in (obj.get("status") or {}).get("actions") or []:
        if isinstance(entry, dict) and entry.get("id") == action_id:
            try:
                return HandledAction.model_validate(entry)
            except ValidationError:  # a record this plugin cannot read (a newer operator's) is still a record
                result = "Applied" if entry.get("result") == "Applied" else "Ignored"
                return HandledAction(
                    name=str(entry.get("name")), id=action_id, handled_at="?", result=result, message=str(entry)
                )
    return None


# ---- tables --------------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    """kubectl's plain table: upper-case headers, columns three spaces apart, no trailing blanks."""
    cells = [headers, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(table_row(r, widths) for r in cells)


def table_row(cells: list[str], widths: list[int]) -> str:
    """One line of a table whose columns are ``widths`` wide (a longer value pushes the rest right)."""
    return "   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def age(timestamp: str | None, now: datetime) -> str:
    """kubectl's age (apimachinery's HumanDuration): 45s, 2m30s, 45m, 3h20m, 20h, 3d4h, 9d."""
    then = _time(timestamp)
    if then is None:
        return "<unknown>"
    seconds = max(0, int((now - then).total_seconds()))
    minutes, hours = seconds // 60, seconds // 3600
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    return f"{hours // 24}d"


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError:
        return None


def _md_status(obj: Manifest) -> ModelDeploymentStatus:
    try:
        return ModelDeploymentStatus.model_validate(obj.get("status") or {})
    except ValidationError:
        return ModelDeploymentStatus()


def _md_steps(obj: Manifest) -> int:
    steps = (((obj.get("spec") or {}).get("rollout") or {}).get("steps")) or None
    if isinstance(steps, list):
        return len(steps)
    try:
        return len(ModelDeploymentSpec.model_validate(obj.get("spec") or {}).rollout.steps)
    except ValidationError:
        return 0


def _dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _conditions(conds: list[Any]) -> str:
    pairs = []
    for c in conds:
        t, s = (c.get("type"), c.get("status")) if isinstance(c, dict) else (c.type, c.status)
        pairs.append(f"{t}={s}")
    return " ".join(pairs) or "-"


MD_HEADERS = ["NAME", "STABLE", "CANARY", "WEIGHT", "STEP", "PHASE", "REASON", "PAUSED", "AGE"]
TJ_HEADERS = ["NAME", "PHASE", "ATTEMPT", "EPOCH", "VAL-ACC", "VALIDATED", "REASON", "SUSPENDED", "AGE"]


def md_row(obj: Manifest, now: datetime) -> list[str]:
    st = _md_status(obj)
    canary = st.canary
    rollout = (obj.get("spec") or {}).get("rollout") or {}
    return [
        obj["metadata"]["name"],
        _dash((st.stable.revision or st.stable.version) if st.stable else None),
        _dash((canary.revision or canary.version) if canary else None),
        f"{canary.weight}%" if canary else "-",
        f"{canary.step + 1}/{_md_steps(obj)}" if canary else "-",
        _dash(st.phase),
        _dash(st.reason),
        "yes" if rollout.get("paused") else "no",
        age(obj["metadata"].get("creationTimestamp"), now),
    ]


def tj_row(obj: Manifest, now: datetime) -> list[str]:
    st = obj.get("status") or {}
    spec = obj.get("spec") or {}
    progress = st.get("progress") or {}
    epochs = progress.get("totalEpochs") or (spec.get("training") or {}).get("epochs")
    val_acc = progress.get("valAccuracy")
    validation = st.get("validation")
    verdict = "-" if not isinstance(validation, dict) else ("passed" if validation.get("passed") else "failed")
    return [
        obj["metadata"]["name"],
        _dash(st.get("phase")),
        _dash(st.get("attempt")),
        f"{progress.get('epoch', 0)}/{_dash(epochs)}" if progress else "-",
        f"{val_acc:.4f}" if isinstance(val_acc, int | float) else "-",
        verdict,
        _dash(st.get("reason")),
        "yes" if (spec.get("runPolicy") or {}).get("suspend") else "no",
        age(obj["metadata"].get("creationTimestamp"), now),
    ]


def row(kind: Kind, obj: Manifest, now: datetime) -> list[str]:
    return md_row(obj, now) if kind == "ModelDeployment" else tj_row(obj, now)


def headers(kind: Kind) -> list[str]:
    return MD_HEADERS if kind == "ModelDeployment" else TJ_HEADERS


def _fields(pairs: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs) + 2
    return "\n".join(f"{(k + ':').ljust(width)}{v}" for k, v in pairs)


def md_details(obj: Manifest) -> str:
    """`kubectl flownexus status mdep/NAME`: where the rollout is, in words."""
    meta, st = obj["metadata"], _md_status(obj)
    rollout = (obj.get("spec") or {}).get("rollout") or {}
    version = ((obj.get("spec") or {}).get("model") or {}).get("version")
    pairs = [
        ("ModelDeployment", f"{meta.get('namespace', '')}/{meta['name']}"),
        ("Wanted version", _dash(version)),
        ("Phase", f"{_dash(st.phase)} ({_dash(st.reason)})"),
        ("Message", _dash(st.message)),
        ("Generation", f"{meta.get('generation', '-')} (observed {_dash(st.observed_generation)})"),
    ]
    if st.stable is not None:
        s = st.stable
        pairs.append(
            ("Stable", f"{s.revision or s.version}{_from(s.training_job)}, {_ready(s.ready_replicas, s.replicas)}")
        )
    if st.canary is not None:
        c = st.canary
        achieved = f" (achieved {c.achieved_weight:g}%)" if c.achieved_weight is not None else ""
        limit = rollout.get("failedChecksBeforeRollback", 3)
        pairs.append(
            (
                "Canary",
                f"{c.revision or c.version}{_from(c.training_job)}, step {c.step + 1}/{_md_steps(obj)} at "
                f"{c.weight}%{achieved}, "
                f"{_ready(c.ready_replicas, c.replicas)}, failed checks {c.failed_checks}/{limit}",
            )
        )
        pairs.append(("Step started", _dash(c.step_started_at)))
        if c.paused_at:
            pairs.append(("Paused since", c.paused_at))
    pairs.append(("Paused", "yes (spec.rollout.paused)" if rollout.get("paused") else "no"))
    if st.last_analysis is not None:
        a = st.last_analysis
        pairs.append(("Last analysis", f"{a.outcome} at {a.time}: {_dash(a.message)}"))
    requested = rollout.get("action") or {}
    if requested.get("id") and handled(obj, str(requested["id"])) is None:
        pairs.append(("Requested", f"{requested.get('name')} (id {requested['id']}): not handled by the operator yet"))
    if st.actions:
        last = st.actions[-1]
        pairs.append(("Last action", f"{last.name} (id {last.id}) {last.result} at {last.handled_at}: {last.message}"))
    pairs += [("Conditions", _conditions(st.conditions)), ("Endpoint", _dash(st.endpoint))]
    return _fields(pairs)


def _from(training_job: str | None) -> str:
    return f" (TrainingJob {training_job})" if training_job else ""


def _ready(ready: int | None, replicas: int | None) -> str:
    return f"{ready or 0}/{_dash(replicas)} ready"


def tj_details(obj: Manifest) -> str:
    """`kubectl flownexus status tj/NAME`: phase, attempt, progress, the validation verdict, artifacts."""
    meta, st, spec = obj["metadata"], obj.get("status") or {}, obj.get("spec") or {}
    policy = spec.get("runPolicy") or {}
    progress = st.get("progress") or {}
    pairs = [
        ("TrainingJob", f"{meta.get('namespace', '')}/{meta['name']}"),
        ("Phase", f"{_dash(st.get('phase'))} ({_dash(st.get('reason'))})"),
        ("Message", _dash(st.get("message"))),
        ("Attempt", f"{st.get('attempt', 0)} (restarts allowed: {policy.get('maxRestarts', 3)})"),
        ("Suspended", "yes (spec.runPolicy.suspend)" if policy.get("suspend") else "no"),
    ]
    if st.get("queuePosition") is not None:
        pairs.append(("Queue position", str(st["queuePosition"])))
    if progress:
        pairs.append(("Progress", _metrics(progress, skip=("updatedAt",))))
    if st.get("bestMetrics"):
        pairs.append(("Best", _metrics(st["bestMetrics"], skip=("updatedAt",))))
    pairs.append(("Validation", validation_verdict(st.get("validation"))))
    checkpoint = st.get("latestCheckpoint") or {}
    if checkpoint:
        pairs.append(("Checkpoint", f"epoch {checkpoint.get('epoch')}: {checkpoint.get('path')}"))
    artifacts = st.get("artifacts") or {}
    if artifacts.get("modelArchive"):
        pairs.append(("Model archive", artifacts["modelArchive"]))
    pairs += [
        ("Started", _dash(st.get("startTime"))),
        ("Completed", _dash(st.get("completionTime"))),
        ("Conditions", _conditions(st.get("conditions") or [])),
    ]
    return _fields(pairs)


def _metrics(values: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    parts = []
    for key, value in values.items():
        if key in skip or value is None or isinstance(value, list | dict):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts) or "-"


def validation_verdict(validation: Any) -> str:
    """passed / FAILED with every failed threshold, then the measured values."""
    if not isinstance(validation, dict):
        return "not validated yet"
    failed = validation.get("failedThresholds") or []
    head = "passed" if validation.get("passed") else "FAILED" + (f" ({'; '.join(failed)})" if failed else "")
    measured = _metrics(validation, skip=("passed", "failedThresholds"))
    return f"{head}: {measured}" if measured != "-" else head


def md_history(obj: Manifest) -> str:
    """Every version's life (status.history) and the manual actions handled (status.actions)."""
    st = _md_status(obj)
    versions = table(
        ["VERSION", "TRAININGJOB", "OUTCOME", "AT", "METRICS", "REASON"],
        [
            [h.version, _dash(h.training_job), h.outcome, h.at, _metrics(h.metrics or {}), _dash(h.reason)]
            for h in st.history
        ],
    )
    out = versions if st.history else "No history yet."
    if st.actions:
        actions = table(
            ["ACTION", "ID", "RESULT", "HANDLED", "MESSAGE"],
            [[a.name, a.id, a.result, a.handled_at, _dash(a.message)] for a in st.actions],
        )
        out += "\n\n" + actions
    return out


def tj_history(obj: Manifest, events: list[Manifest]) -> str:
    """A TrainingJob's attempts and verdict: its condition transitions and Events, oldest first."""
    st = obj.get("status") or {}
    lines = [f"Attempts: {st.get('attempt', 0)}", f"Validation: {validation_verdict(st.get('validation'))}", ""]
    transitions = sorted(
        (c for c in st.get("conditions") or [] if isinstance(c, dict)), key=lambda c: c.get("lastTransitionTime", "")
    )
    lines.append(
        table(
            ["CONDITION", "STATUS", "SINCE", "REASON", "MESSAGE"],
            [
                [
                    _dash(c.get("type")),
                    _dash(c.get("status")),
                    _dash(c.get("lastTransitionTime")),
                    _dash(c.get("reason")),
                    _dash(c.get("message")),
                ]
                for c in transitions
            ],
        )
    )
    if events:
        lines += ["", events_table(events)]
    return "\n".join(lines)


def events_table(events: list[Manifest]) -> str:
    def when(e: Manifest) -> str:
        return str(e.get("lastTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp"))

    ordered = sorted(events, key=when)
    return table(
        ["LAST SEEN", "TYPE", "REASON", "COUNT", "MESSAGE"],
        [[when(e), _dash(e.get("type")), _dash(e.get("reason")), _dash(e.get("count")), _dash(e.get("message"))]
         for e in ordered],
    )  # fmt: skip


# ---- predict: the request and the pod --------------------------------------------------------------------


def prediction_body(text: str, source: str) -> bytes:
    """The request body: the file's JSON as it is (``{"inputs": [[...64 numbers...]]}`` for the digits model);
    a JSON error names the file, line and column."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source}: not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    if not isinstance(parsed, dict | list):
        raise UsageError(f'{source}: expected a JSON object such as {{"inputs": [[...]]}}, got {type(parsed).__name__}')
    return json.dumps(parsed).encode()


def prediction_headers(token: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def post_over(
    sock: Any, url_path: str, body: bytes, headers: dict[str, str], timeout_s: float = 60
) -> tuple[int, bytes]:
    """One HTTP POST over an open connection (a port-forward's socket): the status and the body."""
    sock.settimeout(timeout_s)
    conn = http.client.HTTPConnection("localhost")
    conn.sock = sock
    try:
        conn.request("POST", url_path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass(frozen=True)
class Endpoint:
    pod: str
    track: str | None


def ready_endpoints(slices: list[Manifest]) -> list[Endpoint]:
    """The Service's ready pods, from its EndpointSlices (what kube-proxy balances over)."""
    out = []
    for s in slices:
        for ep in s.get("endpoints") or []:
            ref = ep.get("targetRef") or {}
            ready = (ep.get("conditions") or {}).get("ready")
            if ref.get("kind") == "Pod" and ref.get("name") and ready is not False:
                out.append(Endpoint(ref["name"], None))
    return out


def pick_endpoint(
    endpoints: list[Endpoint], md: str, track: str | None, choose: Callable[[list[Endpoint]], Endpoint]
) -> Endpoint:
    """One ready pod, chosen as the Service would (at random: the canary answers its share); ``track``
    (stable or canary) narrows to that Deployment's pods (named ``<md>-<track>-``)."""
    if track is not None:
        endpoints = [e for e in endpoints if e.pod.startswith(f"{md}-{track}-")]
    if not endpoints:
        where = f" of track {track}" if track else ""
        raise UsageError(f"ModelDeployment {md}: Service {md} has no ready pod{where} (is it Available?)")
    chosen = choose(endpoints)
    for t in ("stable", "canary"):
        if chosen.pod.startswith(f"{md}-{t}-"):
            return Endpoint(chosen.pod, t)
    return chosen


# ---- the API server -------------------------------------------------------------------------------------


def api_error(what: str, status: int | None, reason: str | None, body: Any) -> UsageError:
    """The API server's refusal as one line naming the object: its message, else the HTTP reason."""
    detail = reason or ""
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        detail = json.loads(body).get("message") or detail
    if status == 404:
        return UsageError(f"{what}: not found")
    return UsageError(f"{what}: {status} {detail}".rstrip())


class Kube:
    """The calls the plugin makes: REST through the operator's own client (flownexus.runtime.client: the
    kubeconfig's TLS and credentials), a watch as a streamed GET, and the kubernetes client's port-forward."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None) -> None:
        from kubernetes import client, config

        configuration = client.Configuration()
        self.default_namespace = "default"  # as kubectl: the context's namespace, else default
        try:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c["name"] == context), None) if context else active
            self.default_namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
        except config.ConfigException as exc:
            if kubeconfig or context:
                raise UsageError(
                    f"kubeconfig {kubeconfig or '(default)'} context {context or '(current)'}: {exc}"
                ) from exc
            try:
                config.load_incluster_config(client_configuration=configuration)  # in a pod
            except config.ConfigException as again:
                raise UsageError(f"no kubeconfig ($KUBECONFIG, ~/.kube/config: {exc}) and not in a pod") from again
        self.api = client.ApiClient(configuration)
        self.rest = Client(self.api, user_agent=USER_AGENT)

    def _request(self, what: str, method: str, url_path: str, **kwargs: Any) -> Manifest:
        import urllib3

        try:
            return self.rest.request(method, url_path, **kwargs)
        except RestError as exc:  # its message is the API server's
            raise UsageError(f"{what}: not found" if exc.status == 404 else f"{what}: {exc.status} {exc}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise UsageError(f"{what}: the API server at {self.api.configuration.host} did not answer: {exc}") from exc

    def get(self, kind: Kind, namespace: str, name: str) -> Manifest:
        return self._request(f"{kind} {name} in namespace {namespace}", "GET", path(kind, namespace, name), kind=kind)

    def list_objects(self, kind: Kind, namespace: str) -> tuple[list[Manifest], str]:
        result = self._request(f"listing {PLURAL[kind]} in namespace {namespace}", "GET", path(kind, namespace))
        return list(result.get("items") or []), str((result.get("metadata") or {}).get("resourceVersion") or "")

    def patch(self, kind: Kind, namespace: str, name: str, body: Manifest) -> Manifest:
        """A JSON merge patch with our field manager."""
        return self._request(
            f"patching {kind} {name} in namespace {namespace}",
            "PATCH",
            path(kind, namespace, name),
            query={"fieldManager": FIELD_MANAGER},
            body=body,
            content_type="application/merge-patch+json",
            kind=kind,
        )

    def watch(
        self, kind: Kind, namespace: str, name: str | None, resource_version: str, timeout_s: float | None
    ) -> Iterator[tuple[str, Manifest]]:
        """Changes after ``resource_version`` (a watch, not polling); ends after ``timeout_s`` (None: when the
        API server closes it)."""
        import urllib3

        what = f"watching {kind} {name or '(all)'} in namespace {namespace}"
        query = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "false"}
        if name is not None:
            query["fieldSelector"] = f"metadata.name={name}"
        if timeout_s is not None:
            query["timeoutSeconds"] = str(max(1, int(timeout_s)))
        url_path = path(kind, namespace)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        queries = list(query.items())
        self.api.update_params_for_auth(headers, queries, ["BearerToken"], url_path, "GET", None)
        url = self.api.configuration.host + url_path + "?" + urlencode(queries)
        read = None if timeout_s is None else timeout_s + 30
        try:
            response = self.api.rest_client.pool_manager.request(
                "GET", url, headers=headers, preload_content=False, timeout=urllib3.Timeout(connect=30, read=read)
            )
        except urllib3.exceptions.HTTPError as exc:
            raise UsageError(f"{what}: the API server at {self.api.configuration.host} did not answer: {exc}") from exc
        try:
            if response.status >= 400:
                raise api_error(what, response.status, response.reason, response.data.decode(errors="replace"))
            buffer = b""
            for chunk in response.stream(None, decode_content=False):  # one chunk per event, as the client does
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":  # e.g. 410 Gone: the resourceVersion is too old
                        raise UsageError(f"{what}: {(event.get('object') or {}).get('message', event)}")
                    yield str(event["type"]), dict(event["object"])
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
            return  # the watch ended (a timeout, the server closed it): the caller opens the next one
        finally:
            response.release_conn()

    def events(self, namespace: str, kind: Kind, name: str) -> list[Manifest]:
        query = {"fieldSelector": f"involvedObject.kind={kind},involvedObject.name={name}"}
        result = self._request(f"listing the Events of {kind} {name}", "GET", path("Event", namespace), query=query)
        return list(result.get("items") or [])

    def endpoints(self, namespace: str, service: str) -> list[Endpoint]:
        result = self._request(
            f"listing the EndpointSlices of Service {service} in namespace {namespace}",
            "GET",
            f"/apis/discovery.k8s.io/v1/namespaces/{quote(namespace)}/endpointslices",
            query={"labelSelector": f"kubernetes.io/service-name={service}"},
        )
        return ready_endpoints(list(result.get("items") or []))

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        what = f"Secret {name} in namespace {namespace} (spec.serving.inferenceTokenSecret)"
        secret = self._request(what, "GET", f"/api/v1/namespaces/{quote(namespace)}/secrets/{quote(name)}")
        data = (secret.get("data") or {}).get(key)
        if data is None:
            raise UsageError(f"{what} has no key {key!r}")
        return base64.b64decode(data).decode().strip()

    def post_to_pod(
        self, namespace: str, pod: str, port: int, url_path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """POST through a port-forward of the API server to ``pod``: the connection starts inside the pod's
        network namespace, so the NetworkPolicy (which admits pods, not the API server) does not stand in
        the way, and the bearer token is checked as for any client."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from kubernetes.stream import portforward

        what = f"port-forward to pod {pod} port {port} in namespace {namespace}"
        try:
            forward = portforward(
                client.CoreV1Api(self.api).connect_get_namespaced_pod_portforward, pod, namespace, ports=str(port)
            )
        except ApiException as exc:
            raise api_error(what, exc.status, exc.reason, exc.body) from exc
        try:
            return post_over(forward.socket(port), url_path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            raise UsageError(f"{what}: {forward.error(port) or exc}") from exc
        finally:
            forward.close()


# ---- commands --------------------------------------------------------------------------------------------


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)


def cmd_status(
    kube: Kube, ns: str, target: Target | None, watch: bool, out: TextIO, timeout_s: float | None = None
) -> int:
    if target is None:
        shown = False
        for kind in ("ModelDeployment", "TrainingJob"):
            items, _ = kube.list_objects(kind, ns)
            if items:
                if shown:
                    print(file=out)
                print(f"{PLURAL[kind]}:", file=out)
                print(table(headers(kind), [row(kind, o, now_utc()) for o in items]), file=out)
                shown = True
        if not shown:
            print(f"No ModelDeployments or TrainingJobs in namespace {ns}.", file=out)
        if watch:
            print("(--watch needs an object: status --watch mdep/NAME)", file=sys.stderr)
        return 0
    obj = kube.get(target.kind, ns, target.name)
    if not watch:
        details = md_details(obj) if target.kind == "ModelDeployment" else tj_details(obj)
        print(details, file=out)
        return 0
    # Like kubectl get -w: the table header once, then a row (and the reason's message) on every change.
    first = row(target.kind, obj, now_utc())
    widths = [max(len(h), len(c)) for h, c in zip(headers(target.kind), first, strict=True)]
    print(table_row(headers(target.kind), widths), file=out)
    print(table_row(first, widths), file=out)
    print(f"  {_message(obj)}", file=out, flush=True)
    last = _watched(target.kind, obj)
    rv = obj["metadata"]["resourceVersion"]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while deadline is None or time.monotonic() < deadline:
        left = None if deadline is None else deadline - time.monotonic()
        for kind_, changed in kube.watch(target.kind, ns, target.name, rv, timeout_s=left):
            rv = changed["metadata"].get("resourceVersion", rv)
            if kind_ == "DELETED":
                print(f"{target} deleted", file=out, flush=True)
                return 0
            if _watched(target.kind, changed) != last:
                last = _watched(target.kind, changed)
                print(table_row(row(target.kind, changed, now_utc()), widths), file=out)
                print(f"  {_message(changed)}", file=out, flush=True)
    return 0


def _watched(kind: Kind, obj: Manifest) -> tuple[Any, ...]:
    """What a watch line shows (the row without its age, the message): other changes print nothing."""
    return (*row(kind, obj, EPOCH)[:-1], _message(obj))


def _message(obj: Manifest) -> str:
    st = obj.get("status") or {}
    return f"{_dash(st.get('reason'))}: {_dash(st.get('message'))}"


def cmd_history(kube: Kube, ns: str, target: Target, out: TextIO) -> int:
    obj = kube.get(target.kind, ns, target.name)
    if target.kind == "ModelDeployment":
        print(md_history(obj), file=out)
    else:
        print(tj_history(obj, kube.events(ns, target.kind, target.name)), file=out)
    return 0


def cmd_action(kube: Kube, ns: str, target: Target, name: str, wait_s: float, out: TextIO) -> int:
    """promote / abort / retry: write spec.rollout.action with a fresh id, then wait for the operator's record."""
    require_kind(target, ("ModelDeployment",), name)
    action_id = new_action_id(now_utc())
    obj = kube.patch(target.kind, ns, target.name, action_patch(name, action_id))
    print(f"{target}: {name} requested (spec.rollout.action id {action_id})", file=out, flush=True)
    if wait_s <= 0:
        return 0
    done = handled(obj, action_id)
    if done is None:
        for _, changed in kube.watch(target.kind, ns, target.name, obj["metadata"]["resourceVersion"], wait_s):
            done = handled(changed, action_id)
            if done is not None:
                break
    if done is None:
        print(f"{target}: the operator has not handled {name} {action_id} within {wait_s:.0f}s (is it running?); "
              "it applies it when it does", file=out)  # fmt: skip
        return 1
    print(f"{target}: {name} {done.result}: {done.message}", file=out)
    return 0 if done.result == "Applied" else 1


def cmd_pause(kube: Kube, ns: str, target: Target, pause: bool, out: TextIO) -> int:
    kube.patch(target.kind, ns, target.name, pause_patch(target.kind, pause))
    field = "spec.rollout.paused" if target.kind == "ModelDeployment" else "spec.runPolicy.suspend"
    verb = ("paused" if pause else "resumed") if target.kind == "ModelDeployment" else (
        "suspended" if pause else "resumed")  # fmt: skip
    print(f"{target} {verb} ({field}={str(pause).lower()})", file=out)
    return 0


def cmd_predict(
    kube: Kube, ns: str, target: Target, input_path: str, track: str | None, token: str | None, out: TextIO
) -> int:
    require_kind(target, ("ModelDeployment",), "predict")
    if input_path == "-":
        text, source = sys.stdin.read(), "stdin"
    else:
        try:
            text, source = Path(input_path).read_text(), input_path
        except OSError as exc:
            raise UsageError(f"-f {input_path}: {exc.strerror}") from exc
    body = prediction_body(text, source)
    obj = kube.get(target.kind, ns, target.name)
    secret = ((obj.get("spec") or {}).get("serving") or {}).get("inferenceTokenSecret")
    if token is None and secret:
        token = kube.secret_value(ns, secret, TOKEN_KEY)
    endpoint = pick_endpoint(kube.endpoints(ns, target.name), target.name, track, random.choice)
    status, answer = kube.post_to_pod(
        ns, endpoint.pod, INFERENCE_PORT, f"/predictions/{target.name}", body, prediction_headers(token)
    )
    print(f"answered by pod {endpoint.pod} ({endpoint.track or 'unknown'} track): HTTP {status}", file=sys.stderr)
    print(answer.decode(errors="replace"), file=out)
    return 0 if status < 400 else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubectl flownexus",
        description="Status, history and manual control of Flow Nexus ModelDeployments (mdep/NAME, or a bare "
        "NAME) and TrainingJobs (tj/NAME). Writes are merge patches of the spec (field manager "
        f"{FIELD_MANAGER}).",
    )
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="where a rollout or a training is; every object without a name")
    s.add_argument("target", nargs="?")
    s.add_argument("-w", "--watch", action="store_true", help="print a line on every change")
    s.add_argument("--timeout", type=float, help="with --watch: stop after this many seconds (default: never)")
    sub.add_parser("history", help="versions served and actions (mdep); attempts, verdict, Events (tj)").add_argument(
        "target"
    )
    for name, what in (
        ("promote", "skip the canary's remaining steps and promote it now"),
        ("abort", "roll the canary back now; stable keeps serving"),
        ("retry", "try a rolled-back version again from the first step"),
    ):
        a = sub.add_parser(name, help=what)
        a.add_argument("target")
        a.add_argument("--wait", type=float, default=ACTION_WAIT_S, help="seconds to wait for the operator (0: none)")
    sub.add_parser("pause", help="hold a rollout (mdep) or suspend a training (tj)").add_argument("target")
    sub.add_parser("suspend", help="the same as pause").add_argument("target")
    sub.add_parser("resume", help="resume a paused rollout or a suspended training").add_argument("target")
    pr = sub.add_parser("predict", help="send a prediction request to a ModelDeployment's serving pods")
    pr.add_argument("target")
    pr.add_argument("-f", "--filename", required=True, help='JSON request body, e.g. {"inputs": [[...]]}; - is stdin')
    pr.add_argument("--track", choices=("stable", "canary"), help="ask a pod of this track (default: as the Service)")
    pr.add_argument("--token", help="bearer token (default: read from spec.serving.inferenceTokenSecret)")
    return p


def run(argv: list[str], out: TextIO, kube_factory: Callable[[str | None, str | None], Kube] = Kube) -> int:
    args = parser().parse_args(argv)
    try:
        target = parse_target(args.target) if getattr(args, "target", None) else None
        kube = kube_factory(args.kubeconfig, args.context)
        ns = args.namespace or kube.default_namespace
        if args.command == "status":
            return cmd_status(kube, ns, target, args.watch, out, args.timeout)
        assert target is not None
        if args.command == "history":
            return cmd_history(kube, ns, target, out)
        if args.command in ("promote", "abort", "retry"):
            return cmd_action(kube, ns, target, args.command, args.wait, out)
        if args.command in ("pause", "suspend", "resume"):
            return cmd_pause(kube, ns, target, args.command != "resume", out)
        return cmd_predict(kube, ns, target, args.filename, args.track, args.token, out)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main() -> None:
    sys.exit(run(sys.argv[1:], sys.stdout))


if __name__ == "__main__":
    main()
