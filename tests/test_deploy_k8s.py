"""Kubernetes and KServe manifests: strict schema validation, and every flag, port, probe and shutdown timing
checked against the real server."""

from __future__ import annotations

import json
import signal
import time

import kubernetes_validate
import numpy as np
import pytest
import support
from deploy_support import (
    BIN,
    DEPLOY,
    GRPC_PORT,
    HTTP_PORT,
    K8S_VERSIONS,
    KSERVE_GRPC_PORT,
    KSERVE_HTTP_PORT,
    METRICS_PORT,
    check_flag,
    clean_env,
    deployment_args,
    effective,
    env_flag,
    flag_values,
    health,
    infer,
    k8s_objects,
    kserve_runtime,
    one,
    running,
    server_container,
    tiny_repository,
    yaml_docs,
)

# ----------------------------------------------------------------------------------------- Kubernetes, KServe


def test_core_objects_pass_strict_kubernetes_validation():
    core = [o for o in k8s_objects() if o["kind"] not in ("Kustomization", "PodMonitor")]
    assert {o["kind"] for o in core} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                          "PersistentVolumeClaim", "ServiceAccount"}
    # The KServe runtime's container is a core v1 Container: validated inside a Pod, alone and with the ports each
    # InferenceService adds to it.
    runtime_pods = []
    for isvc in [{}, *yaml_docs(DEPLOY / "kserve" / "inferenceservice.yaml")]:
        container = kserve_runtime()["spec"]["containers"][0]
        ports = isvc.get("spec", {}).get("predictor", {}).get("model", {}).get("ports")
        runtime_pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-runtime"},
                             "spec": {"containers": [container | ({"ports": ports} if ports else {})]}})
    for version in K8S_VERSIONS:
        for obj in [*core, *runtime_pods]:
            kubernetes_validate.validate(obj, version, strict=True)
    # The validator is strict: a misspelt field fails.
    broken = json.loads(json.dumps(one(core, "Deployment")))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml_docs(DEPLOY / "k8s" / "kustomization.yaml")[0]
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_manifests_use_real_flags_and_agree_on_ports_probes_and_shutdown(serve_options):
    objects = k8s_objects()
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = pod["containers"][0]
    args = flag_values(container["args"])
    for flag, value in args.items():
        check_flag(serve_options, flag, value, "Deployment args")
    for var in container.get("env", []):
        check_flag(serve_options, env_flag(var["name"]), var.get("value"), "Deployment env", env=True)
    http_port = int(effective(serve_options, args, "--http-port"))
    grpc_port = int(effective(serve_options, args, "--grpc-port"))
    metrics_port = int(effective(serve_options, args, "--metrics-port"))
    assert (http_port, grpc_port, metrics_port) == (HTTP_PORT, GRPC_PORT, METRICS_PORT)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}

    # Probes: gRPC health on the gRPC port; liveness on the service that stays up while the process runs.
    assert container["livenessProbe"]["grpc"] == {"port": grpc_port, "service": "liveness"}
    assert container["readinessProbe"]["grpc"]["port"] == grpc_port
    assert container["readinessProbe"]["grpc"].get("service", "") == ""

    # Shutdown: grace period > the server's accept-grace + drain (+ any preStop sleep).
    shutdown = float(effective(serve_options, args, "--shutdown-grace-secs"))
    drain = float(effective(serve_options, args, "--drain-secs"))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > shutdown + drain + pre_stop

    # The repository: the --repository folder is a read-only mount of the PVC.
    repository = effective(serve_options, args, "--repository")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == repository)
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])

    assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), "the HPA's CPU target needs a request"
    assert "memory" in container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]

    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for p in service["spec"]["ports"]:
            assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]], p
    service_ports = {p["name"]: p for p in one(objects, "Service", "deepserve")["spec"]["ports"]}
    assert set(service_ports) == {"http", "grpc", "metrics"}
    assert (service_ports["http"]["appProtocol"], service_ports["grpc"]["appProtocol"]) == ("http", "kubernetes.io/h2c")

    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"], "a drain leaves a replica serving"

    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e.get("path", "/metrics")) for e in endpoints] == [("metrics", "/metrics")]


def test_kserve_runtime_and_inference_services(serve_options):
    """The runtime offers the Open Inference Protocol over REST and gRPC and listens where KServe sends each (its own
    Triton runtime's ports); each InferenceService picks one protocol and the port that carries it."""
    runtime = kserve_runtime()
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert formats["onnx"].get("autoSelect") is True
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    container = spec["containers"][0]
    assert container["name"] == "kserve-container"
    args = flag_values(container["args"])
    for flag, value in args.items():
        check_flag(serve_options, flag, value, "ServingRuntime args")
    assert effective(serve_options, args, "--repository") == "/mnt/models", "KServe's storage initializer target"
    http_port = int(effective(serve_options, args, "--http-port"))
    grpc_port = int(effective(serve_options, args, "--grpc-port"))
    assert (http_port, grpc_port) == (KSERVE_HTTP_PORT, KSERVE_GRPC_PORT)
    # No port in the runtime: Knative takes one per container and the InferenceService's replaces it; without
    # one, KServe routes to its default port, which is where REST listens.
    assert "ports" not in container
    metrics_port = effective(serve_options, args, "--metrics-port")
    assert spec["annotations"]["prometheus.kserve.io/port"] == metrics_port
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"

    isvcs = yaml_docs(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert sorted(i["spec"]["predictor"]["model"]["protocolVersion"] for i in isvcs) == ["grpc-v2", "v2"]
    for isvc in isvcs:
        assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] in spec["protocolVersions"]
        ports = [(p["name"], p["containerPort"]) for p in model.get("ports", [])]
        # gRPC: one port named h2c (Knative carries HTTP/2 cleartext to it) on --grpc-port; REST: the default.
        assert ports == ([("h2c", grpc_port)] if model["protocolVersion"] == "grpc-v2" else []), isvc["metadata"]
        scheme, _, rest = model["storageUri"].partition("://")
        assert scheme == "pvc"
        one(k8s_objects(), "PersistentVolumeClaim", rest.split("/")[0])
    assert len({i["metadata"]["name"] for i in isvcs}) == len(isvcs)


@pytest.mark.slow
def test_deployment_args_serve_and_shut_down_as_the_probes_expect(tmp_path, serve_options):
    """The Deployment's own args on a real server: both probes pass; on SIGTERM readiness fails at once while
    liveness holds and requests are still answered for the accept-grace; then it exits 0 within the grace period."""
    container = server_container()
    args = flag_values(container["args"])
    shutdown = float(effective(serve_options, args, "--shutdown-grace-secs"))
    grace = one(k8s_objects(), "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    repo = tiny_repository(tmp_path)
    grpc_port, metrics_port, http_port = support.free_port(), support.free_port(), support.free_port()
    cmd = [str(BIN / "deepserve"), "serve", *deployment_args(repo, grpc_port, metrics_port, http_port)]
    liveness = container["livenessProbe"]["grpc"]["service"]
    readiness = container["readinessProbe"]["grpc"].get("service", "")
    with running(cmd, clean_env(), tmp_path / "serve.log", grpc_port, readiness) as proc:
        assert health(grpc_port, liveness) == "SERVING"
        assert health(grpc_port, "tiny") == "SERVING"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert health(grpc_port, readiness) == "NOT_SERVING"
        assert health(grpc_port, liveness) == "SERVING", "a draining pod is not restarted"
        x = np.array([[1.0, -1.0, 2.0, -2.0]], np.float32)
        np.testing.assert_array_equal(infer(grpc_port, x), np.maximum(x, 0))
        assert proc.wait(timeout=grace) == 0, (tmp_path / "serve.log").read_text()
        took = time.monotonic() - t0
    assert shutdown - 0.5 <= took < grace, took


