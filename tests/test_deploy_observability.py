"""The compose stack and the Grafana dashboard: every metric and label a query uses is exported by a running
server."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import support
from deploy_support import (
    BIN,
    DEPLOY,
    HTTP_METRICS,
    METRICS,
    SAMPLE_SUFFIXES,
    check_flag,
    clean_env,
    deployment_args,
    env_flag,
    exported,
    infer,
    metric_names,
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
    http_port = int(env.get("DEEPSERVE_HTTP_PORT", serve_options["--http-port"]["default"]))
    grpc_port = int(env.get("DEEPSERVE_GRPC_PORT", serve_options["--grpc-port"]["default"]))
    metrics_port = int(env.get("DEEPSERVE_METRICS_PORT", serve_options["--metrics-port"]["default"]))
    assert {int(p.split(":")[1]) for p in server["ports"]} == {http_port, grpc_port, metrics_port}
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


def wanted_labels(expr: str, legend: str) -> set[str]:
    """Every label a query groups by, filters on or puts in its legend."""
    wanted = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        wanted |= {w.strip() for w in group.split(",") if w.strip()}
    return wanted | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def samples_of(contract: dict[str, tuple[str, set[str]]]) -> set[str]:
    return {family + s for family, (kind, _) in contract.items() for s in SAMPLE_SUFFIXES[kind]}


def check_contract(contract, names: dict[str, str], labels: dict[str, set[str]], used: dict[str, str]) -> None:
    """Each metric of the contract exported with its type and labels, and shown on the dashboard."""
    for family, (kind, want) in contract.items():
        samples = [family + s for s in SAMPLE_SUFFIXES[kind]]
        assert all(names.get(s) == kind for s in samples), f"{family} is not exported as a {kind}"
        assert any(s in used for s in samples), f"no dashboard panel shows {family}"
        for s in samples:
            if s in labels:  # labelled metrics with no child yet (load failures) have no samples to look at
                assert labels[s] - {"le"} == want, f"{s} has labels {labels[s]}, the contract says {want}"


def check_query_labels(queries, labels: dict[str, set[str]], only: set[str] | None = None) -> None:
    """Every label a query wants is on the metrics it reads (job and instance are added by Prometheus, le is on
    histogram buckets)."""
    for title, expr, legend in queries:
        if expr.startswith("label_values"):
            continue
        wanted = wanted_labels(expr, legend)
        for name in metric_names(expr):
            if name in labels and (only is None or name in only):
                have = labels[name] | {"job", "instance"} | ({"le"} if name.endswith("_bucket") else set())
                assert wanted <= have, (title, name, wanted - have)


@pytest.mark.slow
def test_every_metric_a_dashboard_query_uses_is_exported_by_a_running_server(tmp_path):
    """Over gRPC: every metric but the HTTP front end's own (the next test covers those)."""
    queries = dashboard_queries()
    used = {name: title for title, expr, _ in queries for name in metric_names(expr)}
    repo = tiny_repository(tmp_path)
    grpc_port, metrics_port, http_port = support.free_port(), support.free_port(), support.free_port()
    cmd = [str(BIN / "deepserve"), "serve", *deployment_args(repo, grpc_port, metrics_port, http_port)]
    with running(cmd, clean_env(), tmp_path / "serve.log", grpc_port):
        x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
        np.testing.assert_array_equal(infer(grpc_port, x), np.maximum(x, 0))
        assert infer(grpc_port, x, input_name="not_an_input") == grpc.StatusCode.INVALID_ARGUMENT
        names, labels = exported(scrape(metrics_port))

    http_only = samples_of(HTTP_METRICS)
    missing = {name: title for name, title in used.items() if name not in names and name not in http_only}
    assert not missing, f"dashboard queries use metrics the server does not export: {missing}"
    check_contract(METRICS, names, labels, used)
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= used.keys()
    # The error panels have something to show: the bad request was counted under its status code.
    assert "deepserve_requests_total" in labels
    check_query_labels(queries, labels)


def http_json(url: str, body: dict | None = None) -> tuple[int, dict | None]:
    """(status, JSON body or None) of a GET, or of a POST when there is a body."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, json.loads(raw) if raw else None


@pytest.mark.slow
def test_http_metrics_a_dashboard_query_uses_are_exported_after_http_requests(tmp_path):
    """Over HTTP, on the Deployment's args with the HTTP port moved: the HTTP panels' metrics are exported with the
    contract's types and labels, and the bad request is counted under a 4xx status."""
    queries = dashboard_queries()
    used = {name: title for title, expr, _ in queries for name in metric_names(expr)}
    repo = tiny_repository(tmp_path)
    grpc_port, metrics_port, http_port = support.free_port(), support.free_port(), support.free_port()
    cmd = [str(BIN / "deepserve"), "serve", *deployment_args(repo, grpc_port, metrics_port, http_port)]
    base = f"http://127.0.0.1:{http_port}"
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [-1.0, 2.0, -3.0, 4.0]}
    with running(cmd, clean_env(), tmp_path / "serve.log", grpc_port):
        assert http_json(f"{base}/v2/health/ready")[0] == 200
        assert http_json(f"{base}/v2/models/tiny/ready")[0] == 200
        status, reply = http_json(f"{base}/v2/models/tiny/infer", {"inputs": [tensor]})
        assert status == 200, reply
        assert [(o["name"], o["shape"], o["data"]) for o in reply["outputs"]] == [("y", [1, 4], [0, 2, 0, 4])]
        status, reply = http_json(f"{base}/v2/models/tiny/infer", {"inputs": [tensor | {"name": "not_an_input"}]})
        assert status == 400 and "error" in reply, (status, reply)
        text = scrape(metrics_port)
    names, labels = exported(text)
    check_contract(HTTP_METRICS, names, labels, used)
    check_query_labels(queries, labels, only=samples_of(HTTP_METRICS))
    codes = {s.labels["code"] for f in text_string_to_metric_families(text) if f.name == "deepserve_http_requests"
             for s in f.samples if s.name == "deepserve_http_requests_total"}
    assert "200" in codes and any(c.startswith("4") for c in codes), codes


def test_dashboard_http_panels_read_the_http_contract():
    """Statically, until the HTTP front end exports them: the HTTP panels read only the contract's HTTP metrics, by
    endpoint, with labels the contract has."""
    queries = dashboard_queries()
    http_names = samples_of(HTTP_METRICS)
    http_queries = [(t, e, lg) for t, e, lg in queries if any(n.startswith("deepserve_http_") for n in metric_names(e))]
    assert {n for _, e, _ in http_queries for n in metric_names(e)} == {"deepserve_http_requests_total",
                                                                        "deepserve_http_request_duration_seconds_bucket"}
    assert all(metric_names(e) <= http_names for _, e, _ in http_queries)
    contract = {family + s: want for family, (kind, want) in HTTP_METRICS.items() for s in SAMPLE_SUFFIXES[kind]}
    check_query_labels(http_queries, contract)
    exprs = [e for _, e, _ in http_queries]
    assert any("deepserve_http_requests_total" in e and re.search(r"by \(endpoint, code\)", e) for e in exprs)
    for q in ("0.5", "0.99"):
        assert any(f"histogram_quantile({q}," in e and "by (le, endpoint)" in e for e in exprs), f"HTTP p{q}"


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
    # Per model and version: every per-model query follows the dashboard's model and version selectors (the
    # per-protocol figures, gRPC's by method and HTTP's by endpoint, have no model label).
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    assert {"datasource", "job", "model", "version"} <= variables
    for title, expr, _ in queries:
        if any(n.startswith("deepserve_") and not n.startswith(("deepserve_grpc_", "deepserve_http_"))
               for n in metric_names(expr)) \
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
