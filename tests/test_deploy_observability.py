"""The compose stack and the Grafana dashboard: every metric and label a query uses is exported by a running
server."""

from __future__ import annotations

import json
import re

import grpc
import numpy as np
import pytest
import support
from deploy_support import (
    BIN,
    DEPLOY,
    METRICS,
    SAMPLE_SUFFIXES,
    check_flag,
    clean_env,
    deployment_args,
    env_flag,
    infer,
    running,
    scrape,
    tiny_repository,
    yaml_docs,
)
from prometheus_client.parser import text_string_to_metric_families

# ------------------------------------------------------------------------------------------ compose, dashboard


def test_compose_stack_parses_and_its_files_exist(serve_options):
    compose = yaml_docs(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert set(services) == {"deepserve", "prometheus", "grafana"}
    for name, svc in services.items():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image!r})"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if name == "deepserve" and source == "../models":
                continue  # the repository `make models` writes; in a fresh clone only models/README.md
            assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    server = services["deepserve"]
    build = server["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert build["args"]["MODELS"] in ("train", "context")
    env = server.get("environment", {})
    for key, value in env.items():
        check_flag(serve_options, env_flag(key), str(value), "compose environment", env=True)
    grpc_port = int(env.get("DEEPSERVE_GRPC_PORT", serve_options["--grpc-port"]["default"]))
    metrics_port = int(env.get("DEEPSERVE_METRICS_PORT", serve_options["--metrics-port"]["default"]))
    assert {int(p.split(":")[1]) for p in server["ports"]} == {grpc_port, metrics_port}
    drain = float(env.get("DEEPSERVE_DRAIN_SECS", serve_options["--drain-secs"]["default"]))
    shutdown = float(env.get("DEEPSERVE_SHUTDOWN_GRACE_SECS", serve_options["--shutdown-grace-secs"]["default"]))
    assert float(server["stop_grace_period"].rstrip("s")) > drain + shutdown

    prometheus = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"deepserve:{metrics_port}"]
    datasource = yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")[0]
    prometheus_port = services["prometheus"]["ports"][0].split(":")[1]
    assert [d["url"] for d in datasource["datasources"]] == [f"http://prometheus:{prometheus_port}"]

    # The dashboard provider reads the folder compose mounts the dashboard JSON into.
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "deepserve.yaml")[0]
    path = provider["providers"][0]["options"]["path"]
    host_dir = next(DEPLOY / src for src, dst in mounts.items() if dst == path)
    assert (host_dir / "deepserve.json").is_file()
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/deepserve.json"


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana label_values() variable query)."""
    expr = expr.strip()
    lv = re.fullmatch(r"label_values\((.*)\)", expr, re.S)
    if lv:  # label_values(metric{...}, label) or label_values(label)
        inner = lv.group(1)
        return metric_names(inner.rsplit(",", 1)[0]) if "," in inner else set()
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings hold label values, not names
    s = re.sub(r"'(?:\\.|[^'\\])*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(\()?", s):
        if not m.group(2) and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "deepserve.json").read_text())


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, expression, legend) for every panel target and every query variable."""
    found = []

    def walk(panels):
        for p in panels:
            found.extend((p["title"], t["expr"], t.get("legendFormat", "")) for t in p.get("targets", []))
            walk(p.get("panels", []))

    d = dashboard()
    walk(d["panels"])
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f"variable {var['name']}", q, ""))
    return found


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.99, sum by (le, model) (rate(a_seconds_bucket{code!="OK", '
                        'x=~"rate(b)"}[$__rate_interval] offset 5m)))') == {"a_seconds_bucket"}
    assert metric_names("sum without (instance) (c_total) / on (model) group_left (version) d_info or "
                        "vector(0) > bool 1e3") == {"c_total", "d_info"}
    assert metric_names('label_values(m_info{job=~"$job"}, model)') == {"m_info"}
    assert metric_names("label_values(job)") == set()


def exported(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """From a /metrics page: every sample name it exports or declares (family + its type's suffixes) -> family
    type, and the labels seen on each sample name."""
    names: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SAMPLE_SUFFIXES[family.type]:
            names[family.name + suffix] = family.type
        for sample in family.samples:
            names.setdefault(sample.name, family.type)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


@pytest.mark.slow
def test_every_metric_a_dashboard_query_uses_is_exported_by_a_running_server(tmp_path):
    queries = dashboard_queries()
    used = {name: title for title, expr, _ in queries for name in metric_names(expr)}
    repo = tiny_repository(tmp_path)
    grpc_port, metrics_port = support.free_port(), support.free_port()
    cmd = [str(BIN / "deepserve"), "serve", *deployment_args(repo, grpc_port, metrics_port)]
    with running(cmd, clean_env(), tmp_path / "serve.log", grpc_port):
        x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
        np.testing.assert_array_equal(infer(grpc_port, x), np.maximum(x, 0))
        assert infer(grpc_port, x, input_name="not_an_input") == grpc.StatusCode.INVALID_ARGUMENT
        names, labels = exported(scrape(metrics_port))

    missing = {name: title for name, title in used.items() if name not in names}
    assert not missing, f"dashboard queries use metrics the server does not export: {missing}"
    # The contract the dashboard is built on: each metric exported with its type and labels, and on the dashboard.
    for family, (kind, want) in METRICS.items():
        samples = [family + s for s in SAMPLE_SUFFIXES[kind]]
        assert all(names.get(s) == kind for s in samples), f"{family} is not exported as a {kind}"
        assert any(s in used for s in samples), f"no dashboard panel shows {family}"
        for s in samples:
            if s in labels:  # labelled metrics with no child yet (load failures) have no samples to look at
                assert labels[s] - {"le"} == want, f"{s} has labels {labels[s]}, the contract says {want}"
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= used.keys()
    # The error panels have something to show: the bad request was counted under its status code.
    assert "deepserve_requests_total" in labels
    # Every label a query groups by, filters on or puts in a legend is on the metrics it reads
    # (job and instance are added by Prometheus, le is on histogram buckets).
    for title, expr, legend in queries:
        if expr.startswith("label_values"):
            continue
        wanted = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            wanted |= {w.strip() for w in group.split(",") if w.strip()}
        wanted |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        for name in metric_names(expr):
            have = labels.get(name, set()) | {"job", "instance"}
            if name in labels:
                assert wanted <= have | ({"le"} if name.endswith("_bucket") else set()), (title, name, wanted - have)


def test_dashboard_covers_what_operators_look_at():
    queries = dashboard_queries()
    exprs = [e for _, e, _ in queries]
    assert any("deepserve_requests_total" in e and "code" in e for e in exprs), "requests and errors by code"
    for q in ("0.5", "0.99"):
        assert any(f"histogram_quantile({q}," in e and "deepserve_request_duration_seconds_bucket" in e
                   for e in exprs), f"p{q} latency"
    for metric in ("deepserve_queue_duration_seconds", "deepserve_compute_duration_seconds",
                   "deepserve_batch_size", "deepserve_pending_requests"):
        assert any(metric in e for e in exprs), metric
    # Per model and version: every per-model query follows the dashboard's model and version selectors.
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    assert {"datasource", "job", "model", "version"} <= variables
    for title, expr, _ in queries:
        if any(n.startswith("deepserve_") and not n.startswith("deepserve_grpc_") for n in metric_names(expr)) \
                and not title.startswith("variable") and "load failures" not in title.lower():
            assert 'model=~"$model"' in expr and 'version=~"$version"' in expr, title
    ids = []

    def walk(panels):
        for p in panels:
            ids.append(p["id"])
            assert p["type"] == "row" or p["datasource"]["uid"] == "${datasource}", p["title"]
            walk(p.get("panels", []))

    walk(dashboard()["panels"])
    assert len(ids) == len(set(ids)), "panel ids are unique"
