"""The generation benchmark end to end on a tiny GPT: the real server, the in-process ceiling and the capped
server, at concurrency 1 and 2 with a few tokens. No assertion about speed (that is what `make bench-generate`
reports): only that the report has its rows and every way generated exactly the tokens it asked for."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from bench import generation  # noqa: E402


def test_generation_bench_reports_every_way_and_counts_the_tokens_asked(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{generation.README_START}\nold\n{generation.README_END}\nafter\n")
    run = generation.main(["--size", "tiny", "--concurrency", "1,2", "--max-tokens", "5", "--rounds", "2",
                           "--min-tokens", "0", "--out", str(tmp_path / "out"), "--readme", str(readme)])
    assert sorted((p.way, p.concurrency) for p in run.points) == [
        ("ceiling", 1), ("ceiling", 2), ("one-at-a-time", 1), ("one-at-a-time", 2), ("raw", 1), ("raw", 2),
        ("server", 1), ("server", 2)]
    for p in run.points:
        assert p.requests == p.concurrency * 2
        assert p.tokens == p.asked == p.concurrency * 2 * 5
        assert len(p.ttft_ms) == p.requests  # a first event per stream
        assert p.seconds > 0
    md = (tmp_path / "out" / "generation.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and rows[0].endswith("| 40 / 40 |") and rows[1].endswith("| 80 / 80 |")
    assert "load average" in md and "inside onnxruntime runs" in md
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{generation.README_END}\nafter\n")
    assert "#### Generation: tokens/s" in text
    points = json.loads((tmp_path / "out" / "generation.json").read_text())["points"]
    assert len(points) == 8 and all(p["tokens"] == p["asked"] for p in points)
