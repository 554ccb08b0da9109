"""The OpenAPI 3 document of the HTTP/REST API, built from http_api.ROUTES so that it lists exactly what is served.
Schemas follow KServe's V2 REST protocol and Triton's extensions; tensor `data` is described loosely (numbers,
strings or booleans, flat or nested), since a schema cannot tie its length to `shape` anyway."""

from __future__ import annotations

import re

from service import __version__

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_PARAMS = {"type": "object", "additionalProperties": {"oneOf": [{"type": "boolean"}, {"type": "number"},
                                                                {"type": "string"}]}}
_SCALAR = {"oneOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}]}
_DATA = {"type": "array", "items": {"oneOf": [_SCALAR, {"type": "array"}]}}
_TENSOR_META = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer"}}}}
_INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"}, "parameters": _PARAMS,
    "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                                "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "parameters": _PARAMS, "data": _DATA}}},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "parameters": _PARAMS}}}}}
_INFER_RESPONSE = {"type": "object", "required": ["model_name", "outputs"], "properties": {
    "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
    "parameters": _PARAMS,
    "outputs": {"type": "array", "items": {**_TENSOR_META, "properties": {
        **_TENSOR_META["properties"], "parameters": _PARAMS, "data": _DATA}}}}}
_METADATA = {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"], "properties": {
    "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
    "platform": {"type": "string"}, "inputs": {"type": "array", "items": _TENSOR_META},
    "outputs": {"type": "array", "items": _TENSOR_META}}}
_OBJECT = {"type": "object"}
_GENERATE = {"type": "object", "required": ["text_input"], "properties": {"text_input": {"type": "string"},
                                                                          "parameters": _PARAMS}}
_READY = {"type": "object", "required": ["ready"], "properties": {"name": {"type": "string"},
                                                                  "ready": {"type": "boolean"}}}
_LIVE = {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}}
_BODIES = {  # endpoint prefix -> (request body schema or None, 200 reply schema or None)
    "infer": (_INFER_REQUEST, _INFER_RESPONSE),
    "model_metadata": (None, _METADATA),
    "server_metadata": (None, {"type": "object", "required": ["name", "version", "extensions"], "properties": {
        "name": {"type": "string"}, "version": {"type": "string"},
        "extensions": {"type": "array", "items": {"type": "string"}}}}),
    "repository_index": ({"type": "object", "properties": {"ready": {"type": "boolean"}}},
                         {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                             "name": {"type": "string"}, "version": {"type": "string"},
                             "state": {"type": "string"}, "reason": {"type": "string"}}}}),
    "repository_load": ({"type": "object", "properties": {"parameters": {"type": "object"}}}, None),
    "repository_unload": ({"type": "object", "properties": {"parameters": _PARAMS}}, None),
    "shm_status": (None, {"type": "array", "items": {"type": "object"}}),
    "cuda_shm_status": (None, {"type": "array", "items": {"type": "object"}}),
    "shm_register": ({"type": "object", "required": ["key", "byte_size"], "properties": {
        "key": {"type": "string"}, "offset": {"type": "integer", "minimum": 0},
        "byte_size": {"type": "integer", "minimum": 0}}}, None),
    "cuda_shm_register": ({"type": "object", "properties": {"device_id": {"type": "integer"},
                                                            "byte_size": {"type": "integer"}}}, None),
    "shm_unregister": (None, None),
    "cuda_shm_unregister": (None, None),
    "trace_setting_get": (None, _OBJECT),
    "trace_setting_update": (_OBJECT, _OBJECT),
    "model_trace_setting_get": (None, _OBJECT),
    "model_trace_setting_update": (_OBJECT, _OBJECT),
    "logging_get": (None, _OBJECT),
    "logging_update": (_OBJECT, _OBJECT),
    "generate_stream": (_GENERATE, "events"),
    "generate": (_GENERATE, {"type": "object", "required": ["model_name", "text_output"], "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "text_output": {"type": "string"}}}),
    "health_live": (None, _LIVE),
    "health_ready": (None, _READY),
    "model_ready": (None, _READY),
}
_NOT_READY = ("health_", "model_ready")  # these answer 400 with their own body ({"ready": false}), not an error


def document(routes) -> dict:
    """routes: http_api.ROUTES (method, path, endpoint, summary)."""
    paths: dict[str, dict] = {}
    for r in routes:
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                  for p in re.findall(r"{(\w+)}", r.path)]
        body, reply = next((v for k, v in _BODIES.items() if r.endpoint.startswith(k)), (None, _OBJECT))
        ok = {"text/event-stream": {"schema": {"type": "string"}}} if reply == "events" else \
            {"application/json": {"schema": reply}} if reply else None
        responses = {"200": {"description": "OK", **({"content": ok} if ok else {})},
                     "400": {"description": "Not ready", "content": {"application/json": {"schema": reply}}}
                     if r.endpoint.startswith(_NOT_READY) else
                     {"description": "Bad request or not ready", "content": {"application/json": {"schema": _ERROR}}},
                     "401": {"description": "Missing or invalid bearer token (--auth-token-file)",
                             "content": {"application/json": {"schema": _ERROR}}},
                     "404": {"description": "Unknown model, version or endpoint",
                             "content": {"application/json": {"schema": _ERROR}}},
                     "503": {"description": "Unavailable: not ready, busy or shutting down",
                             "content": {"application/json": {"schema": _ERROR}}}}
        if body is not None:
            responses["413"] = {"description": "Body over --max-message-bytes",
                                "content": {"application/json": {"schema": _ERROR}}}
        if r.endpoint.startswith("cuda_shm_register"):
            responses["501"] = {"description": "CUDA shared memory is not supported (no GPU)",
                                "content": {"application/json": {"schema": _ERROR}}}
        if r.endpoint.startswith(("infer", "generate")):
            responses["500"] = {"description": "The model failed at run time (the message has the request id)",
                                "content": {"application/json": {"schema": _ERROR}}}
        op = {"operationId": r.endpoint, "summary": r.summary, "parameters": params, "responses": responses}
        if body is not None:
            op["requestBody"] = {"required": r.endpoint.startswith("infer"),
                                 "content": {"application/json": {"schema": body}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {"openapi": "3.0.3",
            "info": {"title": "deepserve HTTP/REST API (KServe V2 / Triton)", "version": __version__,
                     "description": "The Open Inference Protocol over HTTP/REST, as NVIDIA Triton defines it: JSON "
                                    "tensors and the binary tensor data extension (Inference-Header-Content-Length)."},
            "paths": paths}
