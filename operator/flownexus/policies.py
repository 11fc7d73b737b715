"""The admission policy that keeps a trainer's status writes to its progress fields.

A TrainingJob's trainer pods run as the ServiceAccount ``<job>-trainer``, whose Role may patch that one
job's ``status`` (rank 0 reports live progress). RBAC cannot narrow a write to fields, so without this
policy a trainer image could write ``Validated=True`` or any archive path and the ModelDeployment would
trust it. The policy, evaluated by the API server itself for every status write of a trainer account:

- the account may write only the TrainingJob it belongs to (``<job>-trainer`` → ``<job>``);
- the token must be bound to rank 0's pod (``<job>-a<attempt>-0-<suffix>``, the Indexed Job's pod of
  completion index 0): the other ranks' tokens cannot write at all;
- every status field other than ``progress``, ``bestMetrics`` and ``latestCheckpoint`` must stay as it was.

A second policy (:func:`token_policy`) keeps the token out of the other ranks' pods altogether.

Generated from the API types (``make crds`` writes ``policies/``; the chart ships the same file).
Run ``python -m flownexus.policies --out policies``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from . import GROUP
from .api.trainingjob import TrainingJobStatus

POLICY_NAME = "flownexus-trainer-status"
TRAINER_WRITABLE = ("progress", "bestMetrics", "latestCheckpoint")
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"


def status_fields() -> list[str]:
    """Every status field by its wire name, in declaration order."""
    return [info.alias or name for name, info in TrainingJobStatus.model_fields.items()]


def _unchanged(field: str) -> str:
    new = f"(has(object.status) && has(object.status.{field}))"
    old = f"(has(oldObject.status) && has(oldObject.status.{field}))"
    return f"{new} == {old} && (!{new} || object.status.{field} == oldObject.status.{field})"


def policy() -> list[dict[str, Any]]:
    """The ValidatingAdmissionPolicy and its cluster-wide binding."""
    trainer = "'system:serviceaccount:' + object.metadata.namespace + ':' + object.metadata.name + '-trainer'"
    rank0 = (
        f"'{POD_NAME_EXTRA}' in request.userInfo.extra && request.userInfo.extra['{POD_NAME_EXTRA}']"
        ".exists(p, p.matches('^' + object.metadata.name + '-a[0-9]+-0-[a-z0-9]+$'))"
    )
    validations: list[dict[str, Any]] = [
        {
            "expression": rank0,
            "messageExpression": "'only rank 0 of TrainingJob ' + object.metadata.name + ' may write its status; "
            "this token belongs to pod ' + "
            f"(('{POD_NAME_EXTRA}' in request.userInfo.extra) ? request.userInfo.extra['{POD_NAME_EXTRA}'][0] "
            ": 'none')",
            "reason": "Forbidden",
        }
    ]
    validations += [
        {
            "expression": _unchanged(field),
            "message": f"a trainer may write only status.{', status.'.join(TRAINER_WRITABLE)}; "
            f"status.{field} is the operator's",
            "reason": "Forbidden",
        }
        for field in status_fields()
        if field not in TRAINER_WRITABLE
    ]
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": POLICY_NAME},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [GROUP],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": ["trainingjobs/status"],
                        }
                    ]
                },
                # Only the job's own trainer account: the operator and people are not constrained here.
                "matchConditions": [{"name": "own-trainer", "expression": f"request.userInfo.username == {trainer}"}],
                "validations": validations,
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": POLICY_NAME},
            "spec": {"policyName": POLICY_NAME, "validationActions": ["Deny"]},
        },
    ]


TOKEN_POLICY_NAME = "flownexus-trainer-token"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the Job controller's label on Indexed pods
TOKEN_VOLUME_PREFIX = "kube-api-access-"  # the projected token volume the ServiceAccount admission adds
MAX_CONTAINERS = 2


def token_policy() -> list[dict[str, Any]]:
    """A MutatingAdmissionPolicy that takes the ServiceAccount token away from every worker pod but rank 0's.

    The API server's ServiceAccount admission (which adds the token volume) runs before mutating admission
    policies, so the policy removes that volume and its mounts and sets ``automountServiceAccountToken:
    false``. Where the cluster has no MutatingAdmissionPolicy (before Kubernetes 1.36), the other ranks keep
    a token that the trainer-status policy refuses for every write.
    """
    worker = (
        "has(object.metadata.labels) && object.metadata.labels.exists(k, k == 'flownexus.io/trainingjob') && "
        "object.metadata.labels.exists(k, k == 'flownexus.io/role') && "
        "object.metadata.labels['flownexus.io/role'] == 'worker' && "
        f"object.metadata.labels.exists(k, k == '{COMPLETION_INDEX}') && "
        f"object.metadata.labels['{COMPLETION_INDEX}'] != '0'"
    )
    keep = f"!v.name.startsWith('{TOKEN_VOLUME_PREFIX}')"
    patches = [
        "[JSONPatch{op: 'add', path: '/spec/automountServiceAccountToken', value: false}]",
        f"(has(object.spec.volumes) ? [JSONPatch{{op: 'replace', path: '/spec/volumes', "
        f"value: object.spec.volumes.filter(v, {keep})}}] : [])",
    ]
    for i in range(MAX_CONTAINERS):
        c = f"object.spec.containers[{i}]"
        patches.append(
            f"(size(object.spec.containers) > {i} && has({c}.volumeMounts) ? [JSONPatch{{op: 'replace', "
            f"path: '/spec/containers/{i}/volumeMounts', value: {c}.volumeMounts.filter(v, {keep})}}] : [])"
        )
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": TOKEN_POLICY_NAME},
            "spec": {
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "matchConstraints": {
                    "resourceRules": [
                        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}
                    ]
                },
                "matchConditions": [{"name": "worker-other-than-rank-0", "expression": worker}],
                "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": " + ".join(patches)}}],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicyBinding",
            "metadata": {"name": TOKEN_POLICY_NAME},
            "spec": {"policyName": TOKEN_POLICY_NAME},
        },
    ]


def render() -> str:
    header = "# Generated by `make crds` (python -m flownexus.policies) from the API types. Do not edit.\n"
    return header + yaml.safe_dump_all([*policy(), *token_policy()], sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("policies"), help="directory to write into")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "trainer-status.yaml"
    path.write_text(render())
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
