"""OpenTelemetry traces and Triton's trace and log settings, end to end: real `deepserve serve` processes export
over OTLP/HTTP to a collector inside the test (an HTTP server decoding the export with opentelemetry-proto), and
tritonclient (its own process) drives the trace and logging extensions."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import support
from conftest import ADD_SUB_CONFIG
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from service._proto import inference_pb2, inference_pb2_grpc
from service.trace_settings import TraceConfig, parse_config

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
ERROR = trace_pb2.Status.STATUS_CODE_ERROR


class Collector:
    """An OTLP/HTTP trace receiver: every exported span, with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict, trace_pb2.Span]] = []
        lock = self.lock = threading.Lock()
        spans = self.spans

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                export = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                with lock:
                    for rs in export.resource_spans:
                        resource = attributes(rs.resource)
                        spans.extend((resource, s) for ss in rs.scope_spans for s in ss.spans)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/traces"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait(self, predicate, timeout: float = 30.0) -> list[tuple[dict, trace_pb2.Span]]:
        """Poll until predicate(spans) holds; the spans then."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"collector never saw what was awaited; it has {[s.name for _, s in spans]}")
            time.sleep(0.05)

    def close(self) -> None:
        self.httpd.shutdown()


def attributes(item) -> dict:
    out = {}
    for kv in item.attributes:
        kind = kv.value.WhichOneof("value")
        value = getattr(kv.value, kind)
        out[kv.key] = [getattr(v, v.WhichOneof("value")) for v in value.values] if kind == "array_value" else value
    return out


def servers_spans(spans, **attrs) -> list[trace_pb2.Span]:
    return [s for _, s in spans if s.name == "ModelInfer" and all(attributes(s).get(k) == v for k, v in attrs.items())]


def infer(stub, request_id: str, rows: int = 1, traceparent: str = "", tracestate: str = "", **inputs):
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    req = support.request("add_sub", **(inputs or {"x": x, "y": x}))
    req.id = request_id
    metadata = [("traceparent", traceparent)] if traceparent else []
    metadata += [("tracestate", tracestate)] if tracestate else []
    return stub.ModelInfer(req, metadata=metadata, timeout=30)


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("tracing") / "models"
    support.save(support.add_sub_model(), repo, "add_sub", config=ADD_SUB_CONFIG)
    (repo / "add_sub" / "labels.txt").write_text("a\nb\nc\nd\n")
    return repo


def start(repo, *flags: str, env: dict | None = None) -> support.Server:
    return support.Server(repo, *flags, env=env)


@pytest.fixture(scope="module")
def traced_server(repo, collector):
    """Every request traced; exporter and resource from flags and OTEL_* variables together."""
    s = start(repo, "--trace-config", "mode=opentelemetry", "--trace-config", "rate=1",
              "--trace-config", f"opentelemetry,url={collector.url}",
              "--trace-config", "opentelemetry,bsp_schedule_delay=50",
              env={"OTEL_SERVICE_NAME": "deepserve-test", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def traced(traced_server):
    with traced_server.channel() as ch:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(ch)


def test_spans_continue_the_callers_trace(traced, collector):
    infer(traced, "traced-1", rows=3, traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01", tracestate="vendor=abc")
    spans = collector.wait(lambda ss: len([s for _, s in ss if s.trace_id.hex() == TRACE_ID]) == 4)
    ours = [(r, s) for r, s in spans if s.trace_id.hex() == TRACE_ID]
    [(resource, server)] = [(r, s) for r, s in ours if s.name == "ModelInfer"]
    assert server.parent_span_id.hex() == PARENT_ID and server.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert server.trace_state == "vendor=abc"
    assert attributes(server) == {"model_name": "add_sub", "model_version": "1", "protocol": "grpc",
                                  "request_id": "traced-1", "batch_size": 3, "status": "OK"}
    assert server.status.code != ERROR
    children = {s.name: s for _, s in ours if s.name != "ModelInfer"}
    assert sorted(children) == ["compute", "encode", "queue"]
    assert {s.parent_span_id for s in children.values()} == {server.span_id}
    compute = attributes(children["compute"])
    assert compute["batch_size"] == 3 and compute["batch_requests"] == 1
    assert compute["compute_infer_ns"] > 0
    q, c = children["queue"], children["compute"]
    assert server.start_time_unix_nano <= q.start_time_unix_nano <= q.end_time_unix_nano <= c.start_time_unix_nano
    assert c.end_time_unix_nano <= children["encode"].start_time_unix_nano <= server.end_time_unix_nano
    assert resource["service.name"] == "deepserve-test" and resource["deployment.environment"] == "ci"


def test_http_requests_continue_the_callers_trace_too(traced_server, collector):
    """The same spans over HTTP/REST: the traceparent header continues the caller's trace, protocol says http,
    and a malformed body fails the span with the front end's own error."""
    import http.client
    import json

    trace_id, bad_id = "5bf92f3577b34da6a3ce929d0e0e4736", "6bf92f3577b34da6a3ce929d0e0e4736"
    conn = http.client.HTTPConnection("127.0.0.1", traced_server.http_port, timeout=30)
    body = {"id": "http-1", "inputs": [{"name": n, "datatype": "FP32", "shape": [2, 4], "data": [0.5] * 8}
                                       for n in ("x", "y")]}
    conn.request("POST", "/v2/models/add_sub/infer", json.dumps(body),
                 {"traceparent": f"00-{trace_id}-{PARENT_ID}-01", "Content-Type": "application/json"})
    assert conn.getresponse().read() and True
    conn.request("POST", "/v2/models/add_sub/infer", b"{not json", {"traceparent": f"00-{bad_id}-{PARENT_ID}-01"})
    assert conn.getresponse().status == 400
    conn.close()
    spans = collector.wait(lambda ss: len([s for _, s in ss if s.trace_id.hex() == trace_id]) == 4
                           and any(s.trace_id.hex() == bad_id for _, s in ss))
    [server] = [s for _, s in spans if s.trace_id.hex() == trace_id and s.name == "ModelInfer"]
    assert server.parent_span_id.hex() == PARENT_ID
    assert attributes(server) == {"model_name": "add_sub", "model_version": "1", "protocol": "http",
                                  "request_id": "http-1", "batch_size": 2, "status": "OK"}
    assert sorted(s.name for _, s in spans if s.trace_id.hex() == trace_id) == ["ModelInfer", "compute", "encode",
                                                                                 "queue"]
    [failed] = [s for _, s in spans if s.trace_id.hex() == bad_id]
    assert failed.status.code == ERROR and "not valid JSON" in failed.status.message


def test_without_traceparent_a_new_trace_starts(traced, collector):
    infer(traced, "fresh")
    spans = collector.wait(lambda ss: servers_spans(ss, request_id="fresh"))
    [server] = servers_spans(spans, request_id="fresh")
    assert server.parent_span_id == b"" and server.trace_id.hex() not in ("0" * 32, TRACE_ID)


def test_a_failed_request_records_its_status(traced, collector):
    bad_id = "0af7651916cd43dd8448eb211c80319c"
    with pytest.raises(grpc.RpcError) as err:
        infer(traced, "bad", traceparent=f"00-{bad_id}-{PARENT_ID}-01", z=np.zeros((1, 4), np.float32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    spans = collector.wait(lambda ss: any(s.trace_id.hex() == bad_id for _, s in ss))
    [server] = [s for _, s in spans if s.trace_id.hex() == bad_id]  # it failed before the queue: no child
    assert server.name == "ModelInfer" and server.status.code == ERROR
    assert server.status.message.startswith("INVALID_ARGUMENT: model 'add_sub': unknown input 'z'")
    assert attributes(server) == {"model_name": "add_sub", "protocol": "grpc", "request_id": "bad",
                                  "status": "INVALID_ARGUMENT"}


def test_each_request_on_a_stream_is_a_span_of_the_callers_trace(traced, collector):
    stream_id = "5" * 32
    x = np.ones((1, 4), np.float32)
    requests = [support.request("add_sub", x=x, y=x) for _ in range(2)]
    for i, r in enumerate(requests):
        r.id = f"stream-{i}"
    replies = list(traced.ModelStreamInfer(iter(requests), metadata=[("traceparent", f"00-{stream_id}-{PARENT_ID}-01")],
                                           timeout=30))
    assert [r.error_message for r in replies] == ["", ""]
    spans = collector.wait(lambda ss: len(servers_spans([(r, s) for r, s in ss if s.trace_id.hex() == stream_id])) == 2)
    servers = servers_spans([(r, s) for r, s in spans if s.trace_id.hex() == stream_id])
    assert sorted(attributes(s)["request_id"] for s in servers) == ["stream-0", "stream-1"]
    assert {s.parent_span_id.hex() for s in servers} == {PARENT_ID}


def test_health_and_metadata_are_not_traced(traced, collector):
    traced.ServerReady(inference_pb2.ServerReadyRequest())
    traced.ModelMetadata(inference_pb2.ModelMetadataRequest(name="add_sub"))
    infer(traced, "after-health")
    spans = collector.wait(lambda ss: servers_spans(ss, request_id="after-health"))
    assert {s.name for _, s in spans} == {"ModelInfer", "queue", "compute", "encode"}


def test_a_models_level_tensors_adds_its_tensors(traced, collector):
    def level(*values: str) -> list[str]:
        request = inference_pb2.TraceSettingRequest(model_name="add_sub")
        request.settings["trace_level"].value.extend(values)
        return list(traced.TraceSetting(request).settings["trace_level"].value)

    assert level("TENSORS", "TIMESTAMPS") == ["TIMESTAMPS", "TENSORS"]
    infer(traced, "tensors", rows=2)
    assert level() == ["TIMESTAMPS"]  # cleared: the global level again
    spans = collector.wait(lambda ss: servers_spans(ss, request_id="tensors"))
    [server] = servers_spans(spans, request_id="tensors")
    assert [(e.name, attributes(e)) for e in server.events] == [
        ("TENSOR_QUEUE_INPUT", {"name": "x", "datatype": "FP32", "shape": [2, 4]}),
        ("TENSOR_QUEUE_INPUT", {"name": "y", "datatype": "FP32", "shape": [2, 4]}),
        ("TENSOR_BACKEND_OUTPUT", {"name": "sum", "datatype": "FP32", "shape": [2, 4]}),
        ("TENSOR_BACKEND_OUTPUT", {"name": "diff", "datatype": "FP32", "shape": [2, 4]})]


def test_rate_samples_one_in_n_and_callers_decide_for_their_traces(repo, collector):
    """rate=3: the 3rd and 6th of six requests; a caller's sampled traceparent is traced whatever the rate, an
    unsampled one never; a rate changed over TraceSetting holds from the next request. Endpoint and batching from
    the OTEL_* variables alone."""
    s = start(repo, "--trace-config", "mode=opentelemetry", "--trace-config", "rate=3",
              env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "50"})
    with s.channel() as ch:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        for i in range(1, 7):
            infer(stub, f"rate-{i}")
        infer(stub, "rate-sampled", traceparent=f"00-{'1' * 32}-{PARENT_ID}-01")
        infer(stub, "rate-unsampled", traceparent=f"00-{'2' * 32}-{PARENT_ID}-00")
        reply = stub.TraceSetting(inference_pb2.TraceSettingRequest(settings={"trace_rate": {"value": ["1"]}}))
        assert list(reply.settings["trace_rate"].value) == ["1"]
        infer(stub, "rate-now")
    s.stop()
    spans = collector.wait(lambda ss: servers_spans(ss, request_id="rate-now"))
    got = {attributes(sp).get("request_id", "") for sp in servers_spans(spans)}
    got = {rid for rid in got if rid.startswith("rate")}
    assert got == {"rate-3", "rate-6", "rate-sampled", "rate-now"}


TRITON_SETTINGS = r"""
import json, sys
import tritonclient.grpc as tc
c = tc.InferenceServerClient(sys.argv[1])
out = {"ext": c.get_server_metadata(as_json=True)["extensions"]}
def refused(call, *args, **kw):
    try:
        call(*args, **kw)
    except tc.InferenceServerException as e:
        return [e.status(), e.message()]
    return "accepted"
out["start"] = c.get_trace_settings(as_json=True)["settings"]
out["on"] = c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}, as_json=True)
out["model"] = c.update_trace_settings("add_sub", {"trace_rate": "5"}, as_json=True)["settings"]
out["global"] = c.get_trace_settings(as_json=True)["settings"]
c.update_trace_settings(settings={"trace_count": "7"})
out["model_follows"] = c.get_trace_settings("add_sub", as_json=True)["settings"]
out["model_cleared"] = c.update_trace_settings("add_sub", {"trace_rate": None}, as_json=True)["settings"]
out["bad_rate"] = refused(c.update_trace_settings, settings={"trace_rate": "often"})
out["bad_level"] = refused(c.update_trace_settings, settings={"trace_level": ["LOUD"]})
out["bad_model"] = refused(c.update_trace_settings, "nope", {"trace_rate": "2"})
out["trace_file"] = refused(c.update_trace_settings, settings={"trace_file": "/tmp/t.json"})
out["after_refusals"] = c.get_trace_settings(as_json=True)["settings"]
out["log_start"] = c.get_log_settings(as_json=True)["settings"]
out["log_verbose"] = c.update_log_settings({"log_verbose_level": 1}, as_json=True)["settings"]
out["log_quiet"] = c.update_log_settings({"log_info": False, "log_verbose_level": 0}, as_json=True)["settings"]
out["bad_format"] = refused(c.update_log_settings, {"log_format": "loud"})
out["log_file"] = refused(c.update_log_settings, {"log_file": "/tmp/x.log"})
print(json.dumps(out))
"""


def test_tracing_off_exports_nothing_until_tritonclient_turns_it_on(repo, collector):
    s = start(repo, "--access-log", env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.url,
                                         "OTEL_BSP_SCHEDULE_DELAY": "50"})
    with s.channel() as ch:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        infer(stub, "off-1", traceparent=f"00-{'3' * 32}-{PARENT_ID}-01")
        infer(stub, "off-2")
        r = subprocess.run([sys.executable, "-c", TRITON_SETTINGS, s.url], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        infer(stub, "on-1")
    spans = collector.wait(lambda ss: servers_spans(ss, request_id="on-1"))
    assert not [sp for sp in servers_spans(spans) if attributes(sp).get("request_id", "").startswith("off")]
    # the log: two access lines from before log_info went off, none after
    assert s.log().count("deepserve.access: infer") == 2
    s.stop()

    def flat(settings: dict) -> dict:
        return {k: v["value"] for k, v in settings.items()}

    assert "trace" in got["ext"] and "logging" in got["ext"]
    assert flat(got["start"]) == {"trace_level": ["OFF"], "trace_rate": ["1000"], "trace_count": ["-1"],
                                  "trace_mode": ["opentelemetry"]}
    assert flat(got["on"]["settings"])["trace_level"] == ["TIMESTAMPS"]
    assert flat(got["model"]) == {"trace_level": ["TIMESTAMPS"], "trace_rate": ["5"], "trace_count": ["-1"],
                                  "trace_mode": ["opentelemetry"]}
    assert flat(got["global"])["trace_rate"] == ["1"]
    assert flat(got["model_follows"])["trace_count"] == ["7"] and flat(got["model_follows"])["trace_rate"] == ["5"]
    assert flat(got["model_cleared"])["trace_rate"] == ["1"]
    assert got["bad_rate"] == ["StatusCode.INVALID_ARGUMENT", "trace_rate: expected an integer, got 'often'"]
    assert got["bad_level"][0] == "StatusCode.INVALID_ARGUMENT" and "'LOUD'" in got["bad_level"][1]
    assert got["bad_model"] == ["StatusCode.INVALID_ARGUMENT",
                                "trace settings: unknown model 'nope' (no ready version)"]
    assert got["trace_file"][0] == "StatusCode.UNIMPLEMENTED"
    # refused requests changed nothing; on-1 took one of the 7
    assert flat(got["after_refusals"]) == {"trace_level": ["TIMESTAMPS"], "trace_rate": ["1"],
                                           "trace_count": ["7"], "trace_mode": ["opentelemetry"]}

    def values(settings: dict) -> dict:
        return {k: next(iter(v.values())) for k, v in settings.items()}

    assert values(got["log_start"]) == {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                                        "log_verbose_level": 0, "log_format": "default"}
    assert values(got["log_verbose"])["log_verbose_level"] == 1
    assert values(got["log_quiet"]) == {"log_file": "", "log_info": False, "log_warning": True, "log_error": True,
                                        "log_verbose_level": 0, "log_format": "default"}
    assert got["bad_format"] == ["StatusCode.INVALID_ARGUMENT",
                                 "log_format: expected one of default, ISO8601, json, got 'loud'"]
    assert got["log_file"][0] == "StatusCode.UNIMPLEMENTED"


def test_trace_config_flags_parse_as_triton_writes_them():
    whole = parse_config(["mode=opentelemetry", "opentelemetry,url=http://c:4318/v1/traces", "rate=10", "count=5",
                          "opentelemetry,resource=service.name=svc", "opentelemetry,bsp_schedule_delay=100"])
    assert whole == TraceConfig(level=("TIMESTAMPS",), rate=10, count=5,
                                otel={"url": "http://c:4318/v1/traces", "bsp_schedule_delay": "100"},
                                resource={"service.name": "svc"})
    # DEEPSERVE_TRACE_CONFIG is a comma-separated list: a flag split at its comma means the same
    assert parse_config(["mode=opentelemetry", "opentelemetry", "url=http://c:4318/v1/traces", "rate=10",
                         "count=5", "opentelemetry", "resource=service.name=svc", "opentelemetry",
                         "bsp_schedule_delay=100"]) == whole
    assert parse_config([]) == TraceConfig()  # off
    assert parse_config(["level=TENSORS", "level=TIMESTAMPS"]).level == ("TIMESTAMPS", "TENSORS")
    assert parse_config(["mode=opentelemetry", "level=OFF"]).level == ()
    for bad, message in [("mode=triton", "OpenTelemetry only"), ("triton,file=/tmp/t.json", "no Triton trace files"),
                         ("rate=-1", "rate: expected an integer in [0,"), ("level=LOUD", "unknown level 'LOUD'"),
                         ("url=http://c", "opentelemetry,url="), ("opentelemetry,colour=red", "unknown setting"),
                         ("opentelemetry,bsp_max_export_batch_size=9,opentelemetry,bsp_max_queue_size=8",
                          "must not exceed bsp_max_queue_size=8")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            parse_config([bad])


def test_bad_trace_config_is_a_usage_error(repo):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSERVE_")}
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--repository", str(repo), "--trace-config",
                        "rate=often"], cwd=support.ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "--trace-config: rate: expected an integer, got 'often'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--repository", str(repo)], cwd=support.ROOT,
                       capture_output=True, text=True, timeout=60, env={**env, "DEEPSERVE_TRACE_CONFIG": "mode=triton"})
    assert r.returncode == 2 and "deepserve traces with OpenTelemetry only" in r.stderr
