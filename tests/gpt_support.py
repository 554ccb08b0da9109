"""A tiny byte GPT, trained for a few seconds on the text_gpt corpus (so its next-token choices are clear, not
near-ties), exported and published by the job's own code: shared by the engine tests and the serving tests."""

from __future__ import annotations

from pathlib import Path


def publish_tiny_gpt(repo: Path, context: int = 64, name: str = "tiny_gpt", serve: dict | None = None):
    """(model folder, torch model) of version 1 in `repo`."""
    import torch

    from training.gpt import GPT, GPTConfig
    from training.gpt_export import export_decoder, parity
    from training.gpt_job import generation_config, load_corpus, train
    from training.spec import resolve

    spec = resolve("text_gpt")
    corpus = load_corpus(spec["data"])
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same model on any machine; restored after, since the test process goes on
    try:
        model = GPT(GPTConfig(block_size=context, n_layer=2, n_head=2, n_embd=48, dropout=0.0))
        t = {"seed": 0, "lr": 3e-3, "weight_decay": 0.0, "epochs": 1, "steps_per_epoch": 60, "batch_size": 16,
             "warmup_steps": 5, "min_lr_fraction": 0.1, "clip_norm": 1.0}
        train(model, corpus, t, lambda line: None)
    finally:
        torch.set_num_threads(threads)  # a later in-process fit compared with a subprocess run needs the default
    model.eval()
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    export_decoder(model, folder / "1" / "model.onnx")
    assert parity(model, folder / "1" / "model.onnx", 1e-4)["passed"]
    serve = serve or {"max_generations": 16, "max_queue": 4, "default_max_tokens": 24}
    (folder / "config.pbtxt").write_text(generation_config(name, model.config, serve))
    return folder, model


def reference(model, prompt: str, max_tokens: int) -> tuple[str, int, str]:
    """The torch model's own greedy decode: text, tokens generated, why it stopped."""
    from training.gpt import greedy
    from training.gpt_job import END, decode, encode

    ids = [END, *encode(prompt)]
    out = greedy(model, ids, max_tokens, END)
    if out and out[-1] == END:
        reason = "end_token"
    elif len(out) == max_tokens:
        reason = "max_tokens"
    else:
        reason = "context_length"
    return decode([t for t in out if t != END]), len(out), reason
