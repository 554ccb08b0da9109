"""Autoscaling on load (deploy/k8s/autoscaling/): the HPA on requests pending per pod through the Prometheus
Adapter, the adapter's rules, and KEDA's ScaledObject; validated where a schema exists, checked for structure where
it does not (KEDA's and the adapter's own formats), and every metric their queries read scraped from a real server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import kubernetes_validate
import numpy as np
import pytest
import support
import yaml
from deploy_support import (
    BIN,
    DEPLOY,
    K8S_VERSIONS,
    SCRAPE_LABELS,
    clean_env,
    deployment_args,
    exported,
    infer,
    k8s_objects,
    metric_names,
    one,
    running,
    scrape,
    server_container,
    tiny_repository,
    yaml_docs,
)
from prometheus_client.parser import text_string_to_metric_families

AUTOSCALING = DEPLOY / "k8s" / "autoscaling"
# What KEDA's ScaledObject CRD (keda.sh/v1alpha1) accepts in spec and in a trigger.
KEDA_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
             "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
KEDA_TRIGGER = {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}


def base_hpa() -> dict:
    return one(k8s_objects(), "HorizontalPodAutoscaler")


def pending_hpa() -> dict:
    return one(yaml_docs(AUTOSCALING / "pending-requests" / "hpa.yaml"), "HorizontalPodAutoscaler")


def scaled_object() -> dict:
    return one(yaml_docs(AUTOSCALING / "keda" / "scaledobject.yaml"), "ScaledObject")


def adapter_rules() -> list[dict]:
    configmap = one(yaml_docs(AUTOSCALING / "prometheus-adapter" / "rules.yaml"), "ConfigMap")
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


def series_name(series_query: str) -> str:
    m = re.fullmatch(r"([A-Za-z_:][\w:]*)\{[^}]*\}", series_query.strip())
    assert m, f"a seriesQuery names one metric: {series_query!r}"
    return m.group(1)


def adapter_query(rule: dict) -> str:
    """The rule's metricsQuery as the adapter sends it for one pod (its templates filled in)."""
    return (rule["metricsQuery"].replace("<<.Series>>", series_name(rule["seriesQuery"]))
            .replace("<<.LabelMatchers>>", 'namespace="ns",pod="p"').replace("<<.GroupBy>>", "pod"))


def labels_used(expr: str) -> set[str]:
    found = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*[\"']", expr))
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        found |= {w.strip() for w in group.split(",") if w.strip()}
    return found


def keda_prometheus_trigger() -> dict:
    triggers = [t for t in scaled_object()["spec"]["triggers"] if t["type"] == "prometheus"]
    assert len(triggers) == 1
    return triggers[0]


def autoscaling_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query that autoscaling sends to Prometheus."""
    found = [(f"adapter rule {r['name']['as']} seriesQuery", r["seriesQuery"]) for r in adapter_rules()]
    found += [(f"adapter rule {r['name']['as']} metricsQuery", adapter_query(r)) for r in adapter_rules()]
    return [*found, ("KEDA prometheus trigger", keda_prometheus_trigger()["metadata"]["query"])]


# ------------------------------------------------------------------------------------------------ static checks


def test_components_list_their_files():
    for component in ("pending-requests", "keda"):
        folder = AUTOSCALING / component
        kustomization = yaml_docs(folder / "kustomization.yaml")[0]
        assert (kustomization["apiVersion"], kustomization["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
        listed = set(kustomization.get("resources", [])) | {p["path"] for p in kustomization["patches"] if "path" in p}
        assert listed == {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}, component
    # The KEDA component deletes the base HPA: KEDA makes its own, and two HPAs on one Deployment fight.
    deletes = [yaml.safe_load(p["patch"]) for p in yaml_docs(AUTOSCALING / "keda" / "kustomization.yaml")[0]["patches"]
               if "patch" in p]
    hpa = base_hpa()
    assert deletes == [{"$patch": "delete", "apiVersion": hpa["apiVersion"], "kind": hpa["kind"],
                        "metadata": {"name": hpa["metadata"]["name"]}}]


def test_pending_requests_hpa_is_valid_and_replaces_the_base_one_whole():
    hpa, base = pending_hpa(), base_hpa()
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)
    # A strategic-merge patch keeps what it does not name: the patch names every field the base has.
    assert hpa["metadata"] == base["metadata"]
    assert hpa["spec"].keys() == base["spec"].keys()
    for key in ("scaleTargetRef", "minReplicas", "maxReplicas", "behavior"):
        assert hpa["spec"][key] == base["spec"][key], key
    metrics = hpa["spec"]["metrics"]
    assert [m for m in metrics if m["type"] == "Resource"] == base["spec"]["metrics"], "CPU as in the base"
    pods = [m["pods"] for m in metrics if m["type"] == "Pods"]
    assert pods == [{"metric": {"name": "deepserve_pending_requests"},
                     "target": {"type": "AverageValue", "averageValue": pods[0]["target"]["averageValue"]}}]
    assert float(pods[0]["target"]["averageValue"]) > 0


def test_prometheus_adapter_rules_publish_what_the_hpa_reads():
    configmap = one(yaml_docs(AUTOSCALING / "prometheus-adapter" / "rules.yaml"), "ConfigMap")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(configmap, version, strict=True)
    rules = adapter_rules()
    published = {}
    for rule in rules:
        assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}, rule
        # Series to Kubernetes objects: the labels the PodMonitor's scrape adds.
        assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"},
                                                   "pod": {"resource": "pod"}}}
        name = series_name(rule["seriesQuery"])
        assert re.search(r'namespace!=""', rule["seriesQuery"]) and re.search(r'pod!=""', rule["seriesQuery"])
        assert re.fullmatch(rule["name"]["matches"], name), (rule["name"], name)
        # One value per pod: the adapter's label matchers filtered in, the result grouped by its GroupBy.
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]
        published[rule["name"]["as"]] = rule
    assert len(published) == len(rules)
    for metric in (m["pods"]["metric"]["name"] for m in pending_hpa()["spec"]["metrics"] if m["type"] == "Pods"):
        assert metric in published, f"the HPA reads {metric}, which no adapter rule publishes"
    pending = published["deepserve_pending_requests"]
    assert adapter_query(pending) == 'sum by (pod) (deepserve_pending_requests{namespace="ns",pod="p"})', \
        "the gauge per model and version, summed per pod"
    assert {"deepserve_queue_duration_seconds_sum", "deepserve_queue_duration_seconds_count"} == \
        metric_names(adapter_query(published["deepserve_queue_duration_seconds_mean"]))


def test_keda_scaled_object_mirrors_the_hpa():
    obj, hpa = scaled_object(), pending_hpa()
    assert (obj["apiVersion"], obj["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert obj["metadata"]["labels"] == hpa["metadata"]["labels"]
    spec = obj["spec"]
    assert spec.keys() <= KEDA_SPEC, spec.keys() - KEDA_SPEC
    assert spec["scaleTargetRef"] == hpa["spec"]["scaleTargetRef"]
    one(k8s_objects(), "Deployment", spec["scaleTargetRef"]["name"])
    replicas = (spec["minReplicaCount"], spec["maxReplicaCount"])
    assert replicas == (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    # The behavior KEDA puts on the HPA it makes: the validated HPA's own.
    assert spec["advanced"] == {"horizontalPodAutoscalerConfig": {"behavior": hpa["spec"]["behavior"]}}
    pdb = one(k8s_objects(), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] < spec["minReplicaCount"], "a drain leaves a replica serving"

    for trigger in spec["triggers"]:
        assert trigger.keys() <= KEDA_TRIGGER, trigger.keys() - KEDA_TRIGGER
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA's metadata is string to string"
    assert sorted(t["type"] for t in spec["triggers"]) == ["cpu", "prometheus"]
    prom = keda_prometheus_trigger()["metadata"]
    assert re.fullmatch(r"https?://[\w.-]+(:\d+)?/?", prom["serverAddress"]), prom["serverAddress"]
    pending_target = next(m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    assert float(prom["threshold"]) == float(pending_target), "the same requests pending per pod as the HPA"
    # The query sums the Deployment's pods: one value (KEDA divides it by the threshold), filtered on the labels
    # the PodMonitor's scrape adds, naming this Deployment's container.
    query = prom["query"]
    assert query.startswith("sum(") and metric_names(query) == {"deepserve_pending_requests"}
    matchers = dict(re.findall(r'(\w+)="([^"]*)"', query))
    assert matchers.keys() == {"namespace", "container"} and matchers["container"] == server_container()["name"]
    cpu = next(t for t in spec["triggers"] if t["type"] == "cpu")
    base_cpu = next(m["resource"] for m in base_hpa()["spec"]["metrics"] if m["type"] == "Resource")
    want = ("Utilization", base_cpu["target"]["averageUtilization"])
    assert (cpu["metricType"], int(cpu["metadata"]["value"])) == want
    assert "cpu" in server_container()["resources"]["requests"], "a CPU target needs a CPU request"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_each_component_builds_with_kustomize_into_one_autoscaler(tmp_path):
    """`kubectl kustomize` on an overlay of the base with each component, as a user's overlay would take them."""
    for component, kind in (("pending-requests", "HorizontalPodAutoscaler"), ("keda", "ScaledObject")):
        overlay = tmp_path / component
        overlay.mkdir()
        rel = os.path.relpath(DEPLOY / "k8s", overlay)
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [rel], "components": [f"{rel}/autoscaling/{component}"]}))
        out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        built = [d for d in yaml.safe_load_all(out.stdout) if d]
        scalers = [d for d in built if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
        assert [d["kind"] for d in scalers] == [kind], component
        want = pending_hpa() if kind == "HorizontalPodAutoscaler" else scaled_object()
        assert scalers[0] == want, component
        assert sorted(d["kind"] for d in built if d not in scalers) == \
            sorted(o["kind"] for o in k8s_objects() if o["kind"] not in ("Kustomization", "HorizontalPodAutoscaler"))


# ------------------------------------------------------------------------------------------------ a real server


@pytest.mark.slow
def test_every_metric_an_autoscaling_query_reads_is_exported_by_a_running_server(tmp_path):
    repo = tiny_repository(tmp_path)
    grpc_port, metrics_port, http_port = support.free_port(), support.free_port(), support.free_port()
    cmd = [str(BIN / "deepserve"), "serve", *deployment_args(repo, grpc_port, metrics_port, http_port)]
    with running(cmd, clean_env(), tmp_path / "serve.log", grpc_port):
        x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
        np.testing.assert_array_equal(infer(grpc_port, x), np.maximum(x, 0))
        text = scrape(metrics_port)
    names, labels = exported(text)
    queries = autoscaling_queries()
    assert len(queries) == 2 * len(adapter_rules()) + 1
    for where, expr in queries:
        read = metric_names(expr)
        assert read, where
        missing = read - names.keys()
        assert not missing, f"{where} reads {missing}, which the server does not export"
        for name in read:
            have = labels.get(name, set()) | SCRAPE_LABELS
            assert labels_used(expr) <= have, (where, name, labels_used(expr) - have)
    # The gauge the HPA and KEDA sum per pod: one child per loaded model version, at 0 once every request is answered.
    pending = [s for f in text_string_to_metric_families(text) if f.name == "deepserve_pending_requests"
               for s in f.samples]
    assert names["deepserve_pending_requests"] == "gauge"
    assert [(s.labels, s.value) for s in pending] == [({"model": "tiny", "version": "1"}, 0.0)]
