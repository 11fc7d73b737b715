"""The one place that talks to the Kubernetes API server.

Writes are server-side apply with one field manager (one request per child, no create/409/patch dance),
deletes carry a uid precondition (we delete only the object we saw), and status is replaced with a
resourceVersion precondition, so a pass that read a stale object gets :class:`Conflict` instead of
overwriting a newer status.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from prometheus_client import Counter

from .. import __version__

log = logging.getLogger(__name__)
Manifest = dict[str, Any]
Manifests = list[Manifest]  # (a method named list shadows the builtin inside Client)
FIELD_MANAGER = "flownexus-operator"
USER_AGENT = f"flownexus-operator/{__version__}"
TIMEOUT_S = 30.0
RETRIES = 3

API_REQUESTS = Counter(
    "flownexus_api_requests_total", "Requests the operator sent to the API server, by verb and kind.", ["verb", "kind"]
)
API_RESPONSES = Counter(
    "flownexus_api_responses_total",
    "Answers the operator received from the API server (each try of a retried request), by verb, kind and HTTP "
    'status code; code "error" when no answer came (connection refused or reset, timeout).',
    ["verb", "kind", "code"],
)

# Every kind the operator reads or writes, with its plural (no discovery round trips at start).
PLURALS: dict[str, tuple[str, str]] = {
    "Service": ("v1", "services"),
    "ConfigMap": ("v1", "configmaps"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "Pod": ("v1", "pods"),
    "Event": ("v1", "events"),
    "Job": ("batch/v1", "jobs"),
    "Deployment": ("apps/v1", "deployments"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles"),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "NeuralCluster": ("flownexus.io/v1alpha1", "neuralclusters"),
    "TrainingJob": ("flownexus.io/v1alpha1", "trainingjobs"),
    "ModelDeployment": ("flownexus.io/v1alpha1", "modeldeployments"),
    # Optional: served only where KEDA is installed. Never listed or watched (a missing CRD must not break the
    # operator's start); read with get where it is served (:meth:`Client.serves`).
    "ScaledObject": ("keda.sh/v1alpha1", "scaledobjects"),
}


class ApiError(RuntimeError):
    """The API server refused a request; ``status`` is the HTTP code, the message is the server's."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class Conflict(ApiError):
    """409: the object changed since it was read (or already exists). Re-read and decide again."""


class NotFound(ApiError):
    """404."""


def path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    api_version, plural = PLURALS[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{quote(namespace)}")
    parts.append(plural)
    if name:
        parts.append(quote(name))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


@dataclass(frozen=True)
class Ref:
    """One object: kind, namespace, name (and uid when it is known)."""

    kind: str
    namespace: str
    name: str
    uid: str | None = None


class Client:
    """A thin, typed wrapper over the kubernetes package's REST client (it handles TLS, tokens, proxies)."""

    def __init__(self, api_client: Any, user_agent: str = USER_AGENT, impersonate: str | None = None) -> None:
        self._api = api_client
        self.user_agent = user_agent
        self.impersonate = impersonate  # tests: act as a ServiceAccount to prove its rights suffice

    @classmethod
    def from_environment(cls) -> Client:
        """The in-cluster service account, or the current kubeconfig."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = 32
        return cls(client.ApiClient(configuration))

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str, user_agent: str = USER_AGENT, impersonate: str | None = None) -> Client:
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        configuration.connection_pool_maxsize = 32
        return cls(client.ApiClient(configuration), user_agent, impersonate)

    # ---- raw ---------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url_path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        kind: str = "",
    ) -> Manifest:
        API_REQUESTS.labels(method, kind).inc()
        headers = {"Accept": "application/json", "Content-Type": content_type, "User-Agent": self.user_agent}
        if self.impersonate:
            headers["Impersonate-User"] = self.impersonate
        queries: list[tuple[str, str]] = list((query or {}).items())
        self._api.update_params_for_auth(headers, queries, ["BearerToken"], url_path, method, body)
        url = self._api.configuration.host + url_path + (f"?{urlencode(queries)}" if queries else "")
        payload = None if body is None else json.dumps(body)
        # urllib3 through the client's pool: it carries the kubeconfig's TLS settings and client certificate.
        for attempt in range(RETRIES + 1):
            try:
                response = self._api.rest_client.pool_manager.request(
                    method, url, body=payload, headers=headers, timeout=TIMEOUT_S, retries=False
                )
            except (OSError, urllib3.exceptions.HTTPError):
                API_RESPONSES.labels(method, kind, "error").inc()
                raise
            API_RESPONSES.labels(method, kind, str(response.status)).inc()
            # 429 (priority and fairness) and 503 with Retry-After ask the client to come back shortly.
            if response.status not in (429, 503) or attempt == RETRIES:
                break
            time.sleep(min(float(response.headers.get("Retry-After") or 1), 5.0))
        data = response.data
        if response.status >= 400:
            raise _error(response.status, data.decode(errors="replace"))
        if not data:
            return {}
        parsed: Manifest = json.loads(data)
        return parsed

    # ---- verbs -------------------------------------------------------------------------------------

    def serves(self, kind: str) -> bool:
        """Whether the API server serves ``kind`` now (discovery of its group version, which every
        authenticated user may read): False when the group version is unknown (404), e.g. a CRD not installed."""
        api_version, plural = PLURALS[kind]
        try:
            url_path = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
            found = self.request("GET", url_path, kind="discovery")
        except NotFound:
            return False
        return any(r.get("name") == plural for r in found.get("resources") or [])

    def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path(kind, namespace, name), kind=kind)
        except NotFound:
            return None

    def list(
        self, kind: str, namespace: str | None = None, label_selector: str = "", field_selector: str = ""
    ) -> Manifests:
        return self.list_at(kind, namespace, label_selector, field_selector)[0]

    def list_at(
        self, kind: str, namespace: str | None = None, label_selector: str = "", field_selector: str = ""
    ) -> tuple[Manifests, int]:
        """The objects and the resourceVersion the list was served at."""
        selectors = {"labelSelector": label_selector, "fieldSelector": field_selector}
        query = {k: v for k, v in selectors.items() if v} or None
        result = self.request("GET", path(kind, namespace), query=query, kind=kind)
        items: Manifests = result.get("items") or []
        api_version = PLURALS[kind][0]
        for item in items:  # list items come without apiVersion/kind
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items, int((result.get("metadata") or {}).get("resourceVersion") or 0)

    def apply(self, manifest: Manifest, field_manager: str = FIELD_MANAGER) -> Manifest:
        """Server-side apply: the manifest states every field ``field_manager`` owns on the object."""
        kind, meta = manifest["kind"], manifest["metadata"]
        return self.request(
            "PATCH",
            path(kind, meta["namespace"], meta["name"]),
            query={"fieldManager": field_manager, "force": "true"},
            body=manifest,
            content_type="application/apply-patch+yaml",
            kind=kind,
        )

    def merge_patch(
        self, kind: str, namespace: str, name: str, body: Manifest, subresource: str | None = None
    ) -> Manifest:
        """A JSON merge patch (``None`` values remove keys)."""
        return self.request(
            "PATCH", path(kind, namespace, name, subresource), body=body, content_type="application/merge-patch+json",
            kind=kind,
        )  # fmt: skip

    def delete(self, ref: Ref, propagation: str = "Background") -> bool:
        """Delete exactly the object ``ref`` names (uid precondition); False when it was already gone."""
        body: Manifest = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if ref.uid:
            body["preconditions"] = {"uid": ref.uid}
        try:
            self.request("DELETE", path(ref.kind, ref.namespace, ref.name), body=body, kind=ref.kind)
        except NotFound:
            return False
        except Conflict:  # the uid precondition failed: a new object of that name is not ours to delete
            return False
        return True

    def replace_status(self, obj: Manifest, status: Manifest) -> Manifest:
        """PUT the status subresource with the resourceVersion we read: Conflict when the object moved on."""
        meta = obj["metadata"]
        body = {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "resourceVersion": meta["resourceVersion"],
            },
            "spec": obj.get("spec"),
            "status": status,
        }
        return self.request(
            "PUT", path(obj["kind"], meta["namespace"], meta["name"], "status"), body=body, kind=obj["kind"]
        )

    def post_event(self, obj: Manifest, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on ``obj`` (what `kubectl describe` shows)."""
        meta = obj["metadata"]
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.request("POST", path("Event", meta["namespace"]), body=event, kind="Event")
        except ApiError as exc:  # an Event is a courtesy; never fail a pass for it
            log.warning("could not post Event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)


def _error(status: int, body: str) -> ApiError:
    message, reason = body, ""
    try:
        parsed = json.loads(body)
        message, reason = parsed.get("message", body), parsed.get("reason", "")
    except (json.JSONDecodeError, AttributeError):
        pass
    cls = {409: Conflict, 404: NotFound}.get(status, ApiError)
    return cls(status, str(message), str(reason))
