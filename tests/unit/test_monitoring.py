"""The dashboards and alerts of monitoring/: generated files up to date, every query accepted by a real
Prometheus, the rule file valid and its promtool unit tests passing, the chart's ConfigMaps and PrometheusRule.

promtool and prometheus come with Debian's `prometheus` package; without them these tests skip locally and fail
under CI=true (tests/prereq.py)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from monitoring import render

from tests.e2e.monitoring_check import QueryRejected, queries_without_data, query, skipped_queries, variables
from tests.prereq import missing
from tests.processes import stop

RULES = render.HERE / "rules" / "flownexus.rules.yaml"
RULE_TESTS = sorted((render.HERE / "rules" / "tests").glob("*.yaml"))


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (apt-get install prometheus)")
    return path


@pytest.fixture(scope="module")
def empty_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus on loopback with an empty TSDB and nothing to scrape; stopped by its pid."""
    exe = binary("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text("scrape_configs: []\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 (closed after the process)
    proc = subprocess.Popen(
        [exe, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"Prometheus did not get ready:\n{(work / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)
        log.close()


# ---- generated files -------------------------------------------------------------------------------------------


def test_generated_files_match_render_py() -> None:
    stale = render.stale(render.outputs())
    assert stale == [], f"run 'python monitoring/render.py': {[str(p.relative_to(render.ROOT)) for p in stale]}"


def test_render_check_fails_on_a_changed_file(tmp_path: Path) -> None:
    target = tmp_path / "operator.json"
    target.write_text("{}")
    assert render.stale({target: "{}"}) == []
    assert render.stale({target: '{"a": 1}'}) == [target]
    assert render.stale({tmp_path / "missing.json": "{}"}) == [tmp_path / "missing.json"]


def test_dashboard_json_has_every_panel_query_and_the_variables() -> None:
    for key, dash in render.DASHBOARDS.items():
        doc = json.loads((render.HERE / "dashboards" / f"{key}.json").read_text())
        exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
        assert exprs == [q.expr for p in dash.panels for q in p.queries]
        assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
        names = [v["name"] for v in doc["templating"]["list"]]
        assert names == ["datasource"] + [v.name for v in dash.variables]
    md = render.DASHBOARDS["modeldeployment"]
    assert [v.name for v in md.variables] == ["namespace", "modeldeployment"]


@pytest.mark.parametrize(
    ("expr", "values", "expected"),
    [
        ('up{namespace="$namespace"}', {"namespace": "team-a"}, 'up{namespace="team-a"}'),
        ('up{pod=~"${modeldeployment}-.+"}', {"modeldeployment": "digits"}, 'up{pod=~"digits-.+"}'),
        ('label_replace(up, "t", "$1", "pod", "(.*)")', {}, 'label_replace(up, "t", "$1", "pod", "(.*)")'),
    ],
)
def test_substitute_replaces_dashboard_variables_and_keeps_regex_groups(
    expr: str, values: dict[str, str], expected: str
) -> None:
    assert render.substitute(expr, values) == expected


def test_substitute_names_a_variable_without_value() -> None:
    with pytest.raises(KeyError, match=r"\$modeldeployment"):
        render.substitute('up{pod=~"$modeldeployment-.+"}', {"namespace": "x"})


def test_every_query_substitutes_to_plain_promql() -> None:
    for q in render.all_queries():
        expr = render.substitute(q.expr, variables("team-a", "digits"))
        assert "$namespace" not in expr and "$modeldeployment" not in expr and "${" not in expr, q


def test_skipped_queries_say_why() -> None:
    skipped = skipped_queries()
    assert skipped, "the canary/error-only panels are expected to be marked"
    assert all(reason.strip() for _, reason in skipped)
    # The panels the e2e check relies on are not skipped.
    where = {w for w, _ in skipped}
    assert not any("Requests/s by track" in w or "Latency p50" in w for w in where)


def test_trainingjob_and_api_panels_are_checked_in_e2e_and_only_finished_jobs_may_be_empty() -> None:
    """The phase gauge, queue depth and API responses always have series once the operator runs (every phase and
    every NeuralCluster at 0 included); finished jobs have none until a job finishes, which e2e need not wait for."""
    operator = {q.where: q for q in render.all_queries({"operator": render.OPERATOR})}
    by_series = {
        name: [q for q in operator.values() if name in q.expr]
        for name in ("flownexus_trainingjobs", "flownexus_trainingjob_queue_depth", "flownexus_api_responses_total",
                     "flownexus_trainingjob_finished_total")
    }  # fmt: skip
    assert all(by_series.values()), {k: len(v) for k, v in by_series.items()}
    for name in ("flownexus_trainingjobs", "flownexus_trainingjob_queue_depth", "flownexus_api_responses_total"):
        assert all(q.empty_reason is None for q in by_series[name]), name
    assert all(q.empty_reason for q in by_series["flownexus_trainingjob_finished_total"])


def test_monitoring_doc_names_every_operator_series_the_queries_use() -> None:
    doc = (render.ROOT / "docs" / "MONITORING.md").read_text()
    exprs = [q.expr for q in render.all_queries({"operator": render.OPERATOR})] + [
        r["expr"] for r in render.alert_rules()
    ]
    series = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"flownexus_[a-z_]+", e)}
    series.discard("flownexus_inference_latency_seconds")  # the handler's, listed with the serving series
    series.discard("flownexus_edge_request_duration_seconds")  # the serving pod's proxy's, likewise
    assert {"flownexus_trainingjobs", "flownexus_api_responses_total"} <= series
    assert [s for s in sorted(series) if f"`{s}" not in doc] == []


# ---- against a real Prometheus ---------------------------------------------------------------------------------


def test_every_dashboard_query_parses_in_prometheus(empty_prometheus: str) -> None:
    values = variables("team-a", "digits")
    rejected = []
    for q in render.all_queries():
        try:
            query(empty_prometheus, render.substitute(q.expr, values))
        except QueryRejected as exc:
            rejected.append(f"{q.dashboard} {q.where}: {exc}")
    assert rejected == []


def test_a_broken_query_is_rejected_by_prometheus(empty_prometheus: str) -> None:
    with pytest.raises(QueryRejected, match="parse error"):
        query(empty_prometheus, "sum by (le (rate(x[5m]))")


def test_empty_prometheus_reports_every_checked_query_without_data(empty_prometheus: str) -> None:
    """The e2e check can fail: with nothing scraped, every query it checks comes back empty."""
    empty = queries_without_data(empty_prometheus, "team-a", "digits")
    checked = [q for q in render.all_queries() if q.empty_reason is None]
    assert len(empty) == len(checked)
    assert any('namespace="team-a"' in e and "digits-(stable|canary)" in e for e in empty)


# ---- rules -----------------------------------------------------------------------------------------------------


def test_rule_file_passes_promtool_check() -> None:
    done = subprocess.run([binary("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(list(render.alert_rules()))} rules found" in done.stdout


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[p.name for p in RULE_TESTS])
def test_rule_unit_tests_pass_promtool(test_file: Path) -> None:
    done = subprocess.run(
        [binary("promtool"), "test", "rules", test_file.name],
        cwd=test_file.parent, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in render.alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"


def test_every_alert_has_for_severity_summary_and_description() -> None:
    for rule in render.alert_rules():
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule["alert"].startswith("FlowNexus"), rule["alert"]


def test_modeldeployment_alerts_name_the_object() -> None:
    for rule in render.alert_rules():
        if "ModelDeployment" in rule["alert"]:
            assert "{{ $labels.namespace }}/{{ $labels.modeldeployment }}" in rule["annotations"]["summary"]


# ---- the chart ---------------------------------------------------------------------------------------------------


def test_chart_renders_no_monitoring_objects_by_default() -> None:
    from tests.chart import render_chart

    kinds = [(d["kind"], d["metadata"]["name"]) for d in render_chart("flownexus-system")]
    assert not [k for k in kinds if k[0] == "PrometheusRule" or "dashboard" in k[1]]


def test_chart_ships_dashboards_and_rules_behind_flags() -> None:
    from tests.chart import render_chart

    docs = render_chart(
        "flownexus-system",
        "monitoring.dashboards.enabled=true",
        "monitoring.prometheusRule.enabled=true",
        "monitoring.prometheusRule.labels.release=kube-prometheus-stack",
    )
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"]}
    assert sorted(maps) == ["flownexus-operator-dashboard-modeldeployment", "flownexus-operator-dashboard-operator"]
    for key in render.DASHBOARDS:
        cm = maps[f"flownexus-operator-dashboard-{key}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"][f"flownexus-{key}.json"]) == render.dashboard_json(render.DASHBOARDS[key])
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_monitoring_doc_names_every_alert_and_dashboard() -> None:
    doc = (render.ROOT / "docs" / "MONITORING.md").read_text()
    for rule in render.alert_rules():
        assert f"`{rule['alert']}`" in doc, rule["alert"]
    for key in render.DASHBOARDS:
        assert f"monitoring/dashboards/{key}.json" in doc, key
