"""The checked-in generated code matches proto/, and every message and field we define exists in Triton's own
protocol (as tritonclient ships it) with the same number, type and label: wire compatibility, field by field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import ROOT

from service._proto import inference_pb2, model_config_pb2

DUMP = """
import json, sys
from google.protobuf.descriptor import FieldDescriptor
def fields(fd):
    out = {}
    def walk(m):
        for f in m.fields:
            kind = f.message_type.full_name if f.message_type else (f.enum_type.full_name if f.enum_type else f.type)
            out[f"{m.full_name}.{f.name}"] = [f.number, str(kind), f.is_repeated]
        for e in m.enum_types:
            for v in e.values:
                out[f"{e.full_name}.{v.name}"] = [v.number, "enum", False]
        for n in m.nested_types:
            walk(n)
    for m in fd.message_types_by_name.values():
        walk(m)
    for e in fd.enum_types_by_name.values():
        for v in e.values:
            out[f"{e.full_name}.{v.name}"] = [v.number, "enum", False]
    for s in fd.services_by_name.values():
        for meth in s.methods:
            out[f"{s.full_name}/{meth.name}"] = [meth.input_type.full_name, meth.output_type.full_name,
                                                meth.client_streaming, meth.server_streaming]
    return out
"""


def test_generated_code_matches_proto(tmp_path):
    out = tmp_path / "gen"
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(out)], check=True,
                   capture_output=True)
    checked_in = ROOT / "service" / "_proto"
    names = sorted(p.name for p in out.iterdir() if p.suffix in (".py", ".pyi"))
    assert names == sorted(p.name for p in checked_in.iterdir() if p.suffix in (".py", ".pyi"))
    stale = [n for n in names if (out / n).read_text() != (checked_in / n).read_text()]
    assert not stale, f"service/_proto is stale, run `make proto`: {stale}"


def test_every_field_matches_triton():
    ours: dict = {}
    exec(DUMP, ns := {})
    for fd in (inference_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR):
        ours.update(ns["fields"](fd))
    script = DUMP + """
from tritonclient.grpc import service_pb2, model_config_pb2
theirs = {}
for fd in (service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR):
    theirs.update(fields(fd))
print(json.dumps(theirs))
"""
    # tritonclient registers the same `inference.*` symbols as our modules: its own process.
    theirs = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                       text=True).stdout)
    theirs = {k: tuple(v) for k, v in theirs.items()}
    mismatched = {k: (tuple(v), theirs.get(k)) for k, v in ours.items() if theirs.get(k) != tuple(v)}
    assert not mismatched, json.dumps(mismatched, indent=1, default=str)
    assert len(ours) > 200  # the comparison really covered the protocol


def test_unsupported_config_field_is_named(tmp_path):
    from service.config import parse_text
    from service.errors import ModelLoadError

    try:
        parse_text('name: "m"\nensemble_scheduling { }\n', "m/config.pbtxt")
    except ModelLoadError as exc:
        assert "ensemble_scheduling" in str(exc) and "m/config.pbtxt" in str(exc)
    else:
        raise AssertionError("an unsupported field parsed")


def test_proto_sources_are_the_only_protocol_files():
    assert sorted(p.name for p in (ROOT / "proto").glob("*.proto")) == ["inference.proto", "model_config.proto"]
    assert Path(inference_pb2.__file__).parent == ROOT / "service" / "_proto"
