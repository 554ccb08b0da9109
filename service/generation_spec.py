"""What a generation model's config declares (DecodeSpec, read once at load) and what one request asks for
(Params, checked before anything is queued). The parameters themselves are documented in service/generation.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service._proto import model_config_pb2
from service.errors import InvalidArgument, ModelLoadError
from service.runtime import param

PARAMETERS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")


@dataclass(frozen=True)
class DecodeSpec:
    """The decode loop as the config declares it."""

    ids: str
    positions: str
    mask: str
    mask_dtype: type
    cache_in: tuple[str, ...]
    cache_out: tuple[str, ...]
    cache_dims: tuple[tuple[int, ...], ...]  # per cache tensor, after the batch axis, -1 at the past axis
    logits: str
    end_token: int | None
    prefix: tuple[int, ...]
    offset: int
    context: int
    max_tokens: int
    default_max_tokens: int
    max_generations: int
    max_queue: int

    @classmethod
    def from_config(cls, config: model_config_pb2.ModelConfig) -> DecodeSpec:
        where = f"model {config.name!r}"

        def need(key: str) -> str:
            value = param(config, key)
            if not value:
                raise ModelLoadError(f"{where}: a generation model needs the config parameter {key!r}")
            return value

        def number(key: str, default: str, low: int) -> int:
            text = param(config, key, default)
            try:
                value = int(text)
            except ValueError:
                raise ModelLoadError(f"{where}: parameter {key!r} = {text!r}, expected an integer") from None
            if value < low:
                raise ModelLoadError(f"{where}: parameter {key!r} = {value}, expected >= {low}")
            return value

        inputs = {i.name: i for i in config.input}
        outputs = {o.name: o for o in config.output}
        names = {k: need(f"generation_{k}") for k in ("ids_input", "positions_input", "mask_input",
                                                       "logits_output")}
        cache_in = tuple(need("generation_cache_inputs").split(","))
        cache_out = tuple(need("generation_cache_outputs").split(","))
        for n in (names["ids_input"], names["positions_input"], names["mask_input"], *cache_in):
            if n not in inputs:
                raise ModelLoadError(f"{where}: generation input {n!r} is not a config input ({sorted(inputs)})")
        for n in (names["logits_output"], *cache_out):
            if n not in outputs:
                raise ModelLoadError(f"{where}: generation output {n!r} is not a config output ({sorted(outputs)})")
        if len(cache_in) != len(cache_out):
            raise ModelLoadError(f"{where}: {len(cache_in)} generation_cache_inputs but {len(cache_out)} outputs")
        dims = tuple(tuple(inputs[n].dims) for n in cache_in)
        bad = [n for n, d in zip(cache_in, dims, strict=True) if list(d).count(-1) != 1]
        if bad:
            raise ModelLoadError(f"{where}: cache inputs {bad} need exactly one -1 (the past axis) in their dims")
        mask_type = inputs[names["mask_input"]].data_type
        if mask_type not in (model_config_pb2.TYPE_INT64, model_config_pb2.TYPE_BOOL):
            raise ModelLoadError(f"{where}: generation_mask_input must be INT64 or BOOL")
        if config.max_batch_size <= 0:
            raise ModelLoadError(f"{where}: a generation model needs max_batch_size > 0 (generations batch)")
        end = param(config, "generation_end_token")
        prefix = param(config, "generation_prefix_tokens")
        context = number("generation_context_length", "0", 2)
        limit = min(number("generation_max_tokens", str(context), 1), context)
        try:
            end_token = int(end) if end else None
            prefix_ids = tuple(int(t) for t in prefix.split(",")) if prefix else ()
        except ValueError:
            raise ModelLoadError(f"{where}: generation_end_token / generation_prefix_tokens must be integers "
                                 f"(got {end!r}, {prefix!r})") from None
        max_generations = min(number("max_generations", "8", 1), config.max_batch_size)
        return cls(names["ids_input"], names["positions_input"], names["mask_input"],
                   np.int64 if mask_type == model_config_pb2.TYPE_INT64 else np.bool_, cache_in, cache_out, dims,
                   names["logits_output"], end_token, prefix_ids, number("generation_token_offset", "0", 0),
                   context, limit, min(number("generation_default_max_tokens", "16", 1), limit), max_generations,
                   number("generation_max_queue", "64", 0))


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def parse_params(model: str, spec: DecodeSpec, params: dict[str, Any]) -> Params:
    """Request parameters checked one by one; each complaint names the model, the parameter, what it expects and
    what it got."""
    def bad(key: str, expected: str) -> InvalidArgument:
        return InvalidArgument(f"model {model!r}: parameter {key!r} expected {expected}, got {params[key]!r}")

    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise InvalidArgument(f"model {model!r}: unknown parameter(s) {unknown}; expected any of "
                              f"{', '.join(PARAMETERS)}")

    def integer(key: str, default: int | None) -> int | None:
        v = params.get(key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise bad(key, "an integer")
        return v

    def real(key: str, default: float) -> float:
        v = params.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
            raise bad(key, "a number")
        return float(v)

    max_tokens = integer("max_tokens", spec.default_max_tokens)
    assert max_tokens is not None
    if not 1 <= max_tokens <= spec.max_tokens:
        raise bad("max_tokens", f"an integer in [1, {spec.max_tokens}]")
    temperature = real("temperature", 0.0)
    if temperature < 0:
        raise bad("temperature", "a number >= 0 (0 = greedy)")
    top_k = integer("top_k", 0)
    assert top_k is not None
    if top_k < 0:
        raise bad("top_k", "an integer >= 0 (0 = off)")
    top_p = real("top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad("top_p", "a number in (0, 1]")
    seed = integer("seed", None)
    if seed is not None and seed < 0:
        raise bad("seed", "an integer >= 0")
    stop = params.get("stop", ())
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "a non-empty string or a list of them")
    return Params(max_tokens, temperature, top_k, top_p, seed, tuple(stops))
