"""The generation engine in-process, on a real exported model: a tiny byte GPT trained for a few seconds on the
text_gpt corpus (so its next-token choices are clear, not near-ties), exported and published by the job's own code,
loaded by the server's own loader. The torch model is the reference the engine must reproduce."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("torch")

from gpt_support import publish_tiny_gpt, reference  # noqa: E402

from service.errors import InvalidArgument, Unavailable  # noqa: E402
from service.generation import Finished, Generator  # noqa: E402

CONTEXT = 64
PROMPTS = ["Hello", "What is your name?\n", "Tell me a joke.\n", "Do you", "I", "Who are you?\n", "Good morning",
           "What is AI?\n", "Do you like music?\n", "hi", "How are you?\n", "Can you", "What", "Are you a robot?\n",
           "Yes", "I like"]


@pytest.fixture(scope="session")
def published(tmp_path_factory):
    """(model folder, torch model): version 1 of a tiny text_gpt published into a temp repository."""
    return publish_tiny_gpt(tmp_path_factory.mktemp("gen") / "models", CONTEXT)


@pytest.fixture(scope="session")
def loaded(published):
    """The version as the server loads it (config checked against the graph, warm-up run)."""
    from prometheus_client import CollectorRegistry

    from service.config import read_config
    from service.metrics import Metrics
    from service.models import load_version

    folder, _ = published
    config = read_config(folder, (folder / "config.pbtxt").read_bytes())
    return load_version(folder, 1, config, True, Metrics(CollectorRegistry()))


def engine_for(loaded, **overrides: str) -> Generator:
    config = type(loaded.config)()
    config.CopyFrom(loaded.config)
    for key, value in overrides.items():
        config.parameters[key].string_value = value
    return Generator(loaded.name, config, loaded.instances[0])


async def collect(engine: Generator, prompt, params: dict) -> tuple[str, Finished]:
    chunks, last = [], None
    async for item in engine.generate(prompt, params):
        if isinstance(item, Finished):
            last = item
        else:
            assert isinstance(item, str) and item
            chunks.append(item)
    assert last is not None
    return "".join(chunks), last


def run(coro_fn, engine: Generator):
    async def main():
        engine.start()
        try:
            return await coro_fn()
        finally:
            await engine.stop()
    return asyncio.run(main())


def test_greedy_equals_the_torch_decode(published, loaded):
    _, model = published
    engine = engine_for(loaded)
    long_prompt = "Tell me about the history of computers and "  # 44 bytes: the context ends the generation
    cases = [(p, 40) for p in PROMPTS[:6]] + [(long_prompt, 40), ("Hi", 1)]

    async def body():
        return [await collect(engine, p, {"max_tokens": n, "temperature": 0}) for p, n in cases]

    results = run(body, engine)
    reasons = set()
    for (prompt, n), (text, fin) in zip(cases, results, strict=True):
        want_text, want_tokens, want_reason = reference(model, prompt, n)
        assert (text, fin.tokens, fin.reason) == (want_text, want_tokens, want_reason), prompt
        reasons.add(fin.reason)
    assert "context_length" in reasons and "max_tokens" in reasons
    assert engine.tokens_generated == sum(f.tokens for _, f in results)
    assert engine.time_to_first_token.count == len(cases)
    assert engine.inter_token.count == engine.tokens_generated - len(cases)


def test_a_seed_gives_the_same_sampled_text_twice(loaded):
    engine = engine_for(loaded)
    params = {"max_tokens": 40, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "seed": 7}

    async def body():
        return [await collect(engine, "Hello", params) for _ in range(2)]

    first, second = run(body, engine)
    assert first == second and first[1].tokens >= 1


def test_sixteen_concurrent_generations_equal_each_alone(loaded):
    engine = engine_for(loaded)
    jobs = [(p, {"max_tokens": 30, "temperature": 0} if i % 2 else
             {"max_tokens": 30, "temperature": 0.8, "top_k": 20, "seed": i}) for i, p in enumerate(PROMPTS)]

    async def body():
        alone = [await collect(engine, p, params) for p, params in jobs]
        assert max(engine.decode_batches) == 1  # one at a time: every decode step a batch of one
        together = await asyncio.gather(*(collect(engine, p, params) for p, params in jobs))
        return alone, list(together)

    alone, together = run(body, engine)
    assert together == alone
    assert max(engine.decode_batches) > 1
    assert sum(size * n for size, n in engine.decode_batches.items()) == engine.tokens_generated - 2 * len(jobs)


def test_closing_a_stream_frees_its_slot(loaded):
    engine = engine_for(loaded, max_generations="1", generation_max_queue="1")

    async def body():
        stream = engine.generate("Hello", {"max_tokens": 60, "temperature": 0})
        first = await anext(stream)
        assert isinstance(first, str) and engine.active == 1
        await stream.aclose()  # the consumer goes away mid-stream
        assert engine.active == 0 and not engine.waiting
        text, fin = await collect(engine, "Hi", {"max_tokens": 5})
        # A consumer task cancelled mid-stream frees the slot too.
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate("What", {"max_tokens": 60, "temperature": 0}):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert engine.active == 0
        return fin, await collect(engine, "Yes", {"max_tokens": 3})

    fin, (_, after) = run(body, engine)
    assert fin.tokens == 5 or fin.reason == "end_token"
    assert after.tokens == 3 or after.reason == "end_token"


def test_a_full_queue_is_unavailable(loaded):
    engine = engine_for(loaded, max_generations="1", generation_max_queue="1")

    async def body():
        a = engine.generate("Hello", {"max_tokens": 60})
        b = engine.generate("Hi", {"max_tokens": 60})
        await anext(a)  # running
        waiting = asyncio.create_task(anext(b))  # queued behind it
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="1 generations running and 1 waiting"):
            await anext(engine.generate("Yes", {}))
        await a.aclose()
        await waiting
        await b.aclose()
        return engine.active, len(engine.waiting)

    assert run(body, engine) == (0, 0)


BAD = [
    ("Hello", {"temperature": -0.5}, "parameter 'temperature' expected a number >= 0 (0 = greedy), got -0.5"),
    ("Hello", {"top_p": 0}, "parameter 'top_p' expected a number in (0, 1], got 0"),
    ("Hello", {"top_p": 1.5}, "parameter 'top_p' expected a number in (0, 1], got 1.5"),
    ("Hello", {"top_k": -1}, "parameter 'top_k' expected an integer >= 0 (0 = off), got -1"),
    ("Hello", {"max_tokens": 0}, f"parameter 'max_tokens' expected an integer in [1, {CONTEXT - 1}], got 0"),
    ("Hello", {"max_tokens": 10_000}, f"parameter 'max_tokens' expected an integer in [1, {CONTEXT - 1}], got 10000"),
    ("Hello", {"max_tokens": "5"}, "parameter 'max_tokens' expected an integer, got '5'"),
    ("Hello", {"stop": 5}, "parameter 'stop' expected a non-empty string or a list of them, got 5"),
    ("Hello", {"beam_width": 4}, "unknown parameter(s) ['beam_width']; expected any of max_tokens, temperature, "
     "top_k, top_p, seed, stop"),
    ("x" * CONTEXT, {}, f"the prompt is {CONTEXT} bytes; the context holds {CONTEXT} tokens, so at most "
     f"{CONTEXT - 2} for the prompt"),
    (b"caf\xc3(", {}, "the prompt is not valid UTF-8 (byte 3: b'\\xc3')"),
]


@pytest.mark.parametrize(("prompt", "params", "message"), BAD, ids=[m.split(" expected")[0][:40] for *_, m in BAD])
def test_bad_input_is_invalid_argument(loaded, prompt, params, message):
    engine = engine_for(loaded)

    async def body():
        with pytest.raises(InvalidArgument) as info:
            await anext(engine.generate(prompt, params))
        assert str(info.value) == f"model 'tiny_gpt': {message}"
        assert engine.active == 0 and not engine.waiting  # nothing leaks
        return await collect(engine, "Hello", {"max_tokens": 2})  # and the engine goes on

    _, fin = run(body, engine)
    assert fin.tokens == 2 or fin.reason == "end_token"


def test_stop_strings_end_the_text_before_them(published, loaded):
    _, model = published
    full, _, _ = reference(model, "Hello", 40)
    assert len(full) > 4
    stop = full[2:4]
    engine = engine_for(loaded)

    async def body():
        return await collect(engine, "Hello", {"max_tokens": 40, "stop": ["\x00never", stop]})

    text, fin = run(body, engine)
    assert (text, fin.reason) == (full[:full.find(stop)], "stop")


def test_the_published_config_declares_the_loop(published):
    from google.protobuf import text_format

    from service._proto import model_config_pb2

    folder, model = published
    cfg = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["generation_cache_inputs"] == "past_key_0,past_value_0,past_key_1,past_value_1"
    assert params["generation_context_length"] == str(CONTEXT) and params["generation_end_token"] == "0"
    assert [list(i.dims) for i in cfg.input if i.name.startswith("past_")] == [[2, -1, 24]] * 4
    assert Path(folder / "1" / "model.onnx").stat().st_size > 0
