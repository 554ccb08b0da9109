"""Raw UTF-8 text in: the encoding declared in a model's config runs in the server."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from protocols import connect, raw, typed
from support import ROOT, Server, save, seq_model

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc

TEXT_CONFIG = """
max_batch_size: 8
dynamic_batching { }
parameters [ { key: "text_input" value { string_value: "tokens" } },
             { key: "text_encoding" value { string_value: "utf8_bytes" } },
             { key: "text_offset" value { string_value: "1" } },
             { key: "text_pad_id" value { string_value: "0" } },
             { key: "text_max_length" value { string_value: "4" } },
             { key: "text_overflow" value { string_value: "%s" } } ]
"""


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("text") / "models"
    save(seq_model(), repo, "bytesum", config=TEXT_CONFIG % "truncate")
    save(seq_model(), repo, "strict", config=TEXT_CONFIG % "error")
    save(seq_model(), repo, "badenc", config=TEXT_CONFIG.replace("utf8_bytes", "sentencepiece") % "error")
    s = Server(repo, "--no-strict-readiness")
    yield s
    s.stop()


def expected(text: bytes) -> float:
    return float(sum(b + 1 for b in text[:4]))


def test_text_is_encoded_padded_and_truncated(text_server):
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(text_server.channel())
    md = stub.ModelMetadata(pb.ModelMetadataRequest(name="bytesum"))
    assert ("text", "BYTES", [-1, 1]) in [(t.name, t.datatype, list(t.shape)) for t in md.inputs]


def test_raw_text_over_both_protocols(text_server, protocol):
    client = connect(text_server, protocol)
    texts = [b"ab", "\u00e9t\u00e9".encode(), b"", b"abcdefgh"]
    try:
        for shape in ((4,), (4, 1)):
            got = client.infer("bytesum", [raw("text", np.array(texts, dtype=object).reshape(shape))])
            assert got.outputs["total"][:, 0].tolist() == [expected(t) for t in texts], got
        typed_text = client.infer("bytesum", [typed("text", np.array([b"ab"], dtype=object))])  # JSON data on HTTP
        assert typed_text.outputs["total"][0, 0] == expected(b"ab")
        # the token input still works on its own
        tok = client.infer("bytesum", [raw("tokens", np.array([[98, 99]], np.int64))])
        assert tok.outputs["total"][0, 0] == 197.0

        def details(model: str, inputs) -> str:
            answer = client.infer(model, inputs)
            assert answer.status == client.status_of("INVALID_ARGUMENT"), answer
            return answer.message

        assert "not valid UTF-8" in details("bytesum", [raw("text", np.array([b"\xff\xfe"], dtype=object))])
        assert "over the model's 4" in details("strict", [raw("text", np.array([b"abcdefgh"], dtype=object))])
        assert "[batch] or [batch,1]" in details("bytesum", [raw("text", np.array([[b"a", b"b"]], dtype=object))])
        assert "not both" in details("bytesum", [raw("text", np.array([b"a"], dtype=object)),
                                                 raw("tokens", np.ones((1, 1), np.int64))])
    finally:
        client.close()


def test_bad_text_encoding_is_a_load_error(text_server):
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(text_server.channel())
    reasons = {m.name: m.reason for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert "text_encoding 'sentencepiece'" in reasons["badenc"]


def test_infer_cli_text(text_server):
    r = subprocess.run([sys.executable, "-m", "service.cli", "infer", "bytesum", "--url", text_server.url,
                        "--text", "ab", "--text", "abcdefgh"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "[197. ]" in r.stdout.replace("\n", "") or "197." in r.stdout
