"""Triton's trace settings, with Triton's names and meanings, so `--trace-config` and the trace extension
(tritonclient's get_trace_settings / update_trace_settings, gRPC TraceSetting, HTTP /v2[/models/m]/trace/setting)
behave as they do against Triton. Plain Python and no OpenTelemetry import: service.tracing owns the spans.

- trace_level: OFF, or TIMESTAMPS and/or TENSORS. trace_rate: one request in N is traced (the N-th, 2N-th, ...;
  0: only requests whose caller sent a sampled traceparent). trace_count: how many more traces to take (-1: no
  limit); it counts down. log_frequency is accepted and reported as in Triton's OpenTelemetry mode: not at all
  (it is about Triton's trace files). trace_file is refused, as Triton refuses it over the network; trace_mode is
  always opentelemetry, the only mode deepserve has.
- Global and per-model settings: a model's setting keeps only the fields set for it and takes the rest from the
  global one, also after the global one changes; a field sent with no value (gRPC) or null (HTTP) is cleared (a
  model falls back to the global value, the global one to its start-up value); a model with no field left set
  follows the global setting again. A setting that changes starts counting afresh, as in Triton.

One deviation, on purpose: `--trace-config mode=opentelemetry` without a level means level TIMESTAMPS (Triton
would trace nothing until a level is given; a mode chosen with nothing to trace is not what anyone means)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from service.errors import InvalidArgument, Unimplemented

MODE = "opentelemetry"
LEVELS = ("TIMESTAMPS", "TENSORS")  # canonical order; no level at all is OFF
DEFAULTS = {"level": (), "rate": 1000, "count": -1, "log_frequency": 0}  # Triton's
OTEL_KEYS = ("url", "resource", "bsp_max_queue_size", "bsp_schedule_delay", "bsp_max_export_batch_size")
UINT32, INT32 = 2**32 - 1, 2**31 - 1
_WIRE = {"trace_level": "level", "trace_rate": "rate", "trace_count": "count", "log_frequency": "log_frequency"}
_CLEAR = object()


@dataclass
class TraceConfig:
    """What `--trace-config` said: the start-up global setting and the OpenTelemetry exporter's options."""

    level: tuple[str, ...] = ()
    rate: int = DEFAULTS["rate"]
    count: int = DEFAULTS["count"]
    otel: dict[str, str] = field(default_factory=dict)  # url, bsp_* as given
    resource: dict[str, str] = field(default_factory=dict)  # opentelemetry,resource=key=value (repeatable)


def parse_config(items: list[str]) -> TraceConfig:
    """Triton's `--trace-config` syntax: `<setting>=<value>` for the global settings (level, rate, count, mode) and
    `<mode>,<setting>=<value>` for a mode's own. Each flag may also arrive split at its comma (DEEPSERVE_TRACE_CONFIG
    is a comma-separated list), so a bare mode name applies to the setting after it. Raises ValueError."""
    config, levels, mode, prefix = TraceConfig(), [], "", ""
    for token in ",".join(items).split(","):
        token = token.strip()
        if not token:
            continue
        if token in (MODE, "triton"):
            prefix = token
            continue
        key, eq, value = token.partition("=")
        key, value = key.strip(), value.strip()
        if not eq:
            raise ValueError(f"{token!r}: expected <setting>=<value> or opentelemetry,<setting>=<value>")
        section, prefix = prefix, ""
        if section == "triton":
            raise ValueError(f"triton,{key}: deepserve writes no Triton trace files; use mode=opentelemetry and "
                             "opentelemetry,url=URL (OTLP/HTTP)")
        if section == MODE:
            if key not in OTEL_KEYS:
                raise ValueError(f"opentelemetry,{key}: unknown setting; expected one of {', '.join(OTEL_KEYS)}")
            if key == "resource":
                name, eq, attr = value.partition("=")
                if not eq or not name:
                    raise ValueError(f"opentelemetry,resource={value}: expected resource=<key>=<value>")
                config.resource[name.strip()] = attr.strip()
            elif key == "url":
                config.otel[key] = value
            else:
                config.otel[key] = str(_number(value, f"opentelemetry,{key}", 1, INT32))
            mode = MODE
        elif key == "mode":
            if value != MODE:
                raise ValueError(f"mode={value}: deepserve traces with OpenTelemetry only; use mode=opentelemetry")
            mode = MODE
        elif key == "level":
            levels.append(value)
        elif key == "rate":
            config.rate = _number(value, "rate", 0, UINT32)
        elif key == "count":
            config.count = _number(value, "count", -1, INT32)
        elif key in OTEL_KEYS:
            raise ValueError(f"{key}={value}: an OpenTelemetry setting: --trace-config opentelemetry,{key}=...")
        else:
            raise ValueError(f"{key}: unknown setting; expected level, rate, count, mode or opentelemetry,<setting>")
    batch, queue = (int(config.otel.get(k, 0)) for k in ("bsp_max_export_batch_size", "bsp_max_queue_size"))
    if batch and queue and batch > queue:
        raise ValueError(f"opentelemetry,bsp_max_export_batch_size={batch} must not exceed bsp_max_queue_size={queue}")
    try:
        config.level = _levels(levels, "level") if levels else ((LEVELS[0],) if mode else ())
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None
    return config


def _number(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected an integer, got {text!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{what}: expected an integer in [{low}, {high}], got {value}")
    return value


def _levels(values: list[str], what: str = "trace_level") -> tuple[str, ...]:
    if "OFF" in values:
        if len(values) > 1:
            raise InvalidArgument(f"{what}: OFF goes alone, got {values}")
        return ()
    bad = [v for v in values if v not in LEVELS]
    if bad:
        raise InvalidArgument(f"{what}: unknown level {bad[0]!r}; expected OFF, TIMESTAMPS or TENSORS")
    return tuple(level for level in LEVELS if level in values)


class TraceSetting:
    """One effective setting (the global one, or a model's) and its counters. `sample` is called once per request
    while tracing is on, so it is a few integer operations."""

    __slots__ = ("level", "rate", "count", "log_frequency", "own", "seen", "tensors")

    def __init__(self, base: Mapping, own: dict) -> None:
        merged = {**base, **own}
        self.level: tuple[str, ...] = merged["level"]
        self.rate: int = merged["rate"]
        self.count: int = merged["count"]
        self.log_frequency: int = merged["log_frequency"]
        self.own = own  # the fields set at this level (a model's overrides; the global one's changes since start)
        self.tensors = "TENSORS" in self.level
        self.seen = 0  # requests counted towards the rate

    def fields(self) -> dict:
        return {"level": self.level, "rate": self.rate, "count": self.count, "log_frequency": self.log_frequency}

    def sample(self) -> bool:
        """Is this request one to trace (the rate-th since the setting took effect, while the count lasts)?"""
        if not self.level or not self.rate or not self.count:
            return False
        self.seen += 1
        if self.seen % self.rate:
            return False
        if self.count > 0:
            self.count -= 1
        return True


class TraceSettings:
    """The global setting, the per-model ones, and the rules for changing them (Triton's TraceManager)."""

    def __init__(self, config: TraceConfig) -> None:
        self.config = config
        self.start = {**DEFAULTS, "level": config.level, "rate": config.rate, "count": config.count}
        self.global_ = TraceSetting(self.start, {})
        self.models: dict[str, TraceSetting] = {}

    @property
    def on(self) -> bool:
        """Could any request be traced? False means the request path need not ask."""
        return bool(self.global_.level) or any(s.level for s in self.models.values())

    def of(self, model: str) -> TraceSetting:
        return self.models.get(model) or self.global_

    def get(self, model: str = "") -> dict:
        """The settings in Triton's JSON shape: trace_level a list, the others strings; the OpenTelemetry options
        given at start follow, as Triton reports its mode's options."""
        s = self.of(model)
        out: dict = {"trace_level": list(s.level) or ["OFF"], "trace_rate": str(s.rate),
                     "trace_count": str(s.count), "trace_mode": MODE}
        out.update(self.config.otel)
        if self.config.resource:
            out["resource"] = ",".join(f"{k}={v}" for k, v in self.config.resource.items())
        return out

    def update(self, model: str, changes: Mapping) -> dict:
        """Apply Triton's trace setting request: each value a string, a list of strings, or None / [] to clear.
        Every value is checked before any is applied, so a refused request changes nothing."""
        parsed = {}
        for key, value in changes.items():
            values = [] if value is None else [value] if isinstance(value, str) else \
                list(value) if isinstance(value, list | tuple) else [value]
            if not all(isinstance(v, str) for v in values):
                raise InvalidArgument(f"trace setting {key}: expected a string or a list of strings, got {value!r}")
            if key == "trace_file":
                raise Unimplemented("trace_file: trace file location can not be updated through the network "
                                    "protocol (deepserve writes no trace files; spans go to the OTLP exporter)")
            if key == "trace_mode":
                if values not in ([], [MODE]):
                    raise InvalidArgument(f"trace_mode: deepserve has only mode {MODE!r}, got {values}")
                continue
            if key in OTEL_KEYS:
                raise InvalidArgument(f"{key}: OpenTelemetry options are set at start (--trace-config "
                                      f"opentelemetry,{key}=...) and cannot change at run time, as in Triton")
            name = _WIRE.get(key)
            if name is None:
                raise InvalidArgument(f"unknown trace setting {key!r}; expected trace_level, trace_rate, "
                                      "trace_count, log_frequency, trace_mode or trace_file")
            if not values:
                parsed[name] = _CLEAR
            elif name == "level":
                parsed[name] = _levels(values)
            elif len(values) != 1:
                raise InvalidArgument(f"{key}: expected one value, got {values}")
            else:
                low, high = (-1, INT32) if name == "count" else (0, UINT32)
                try:
                    parsed[name] = _number(values[0], key, low, high)
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
        if model:
            current = self.models.get(model)
            own = _apply(dict(current.own) if current else {}, parsed)
            if own:
                self.models[model] = TraceSetting(self.global_.fields(), own)
            else:
                self.models.pop(model, None)
        else:
            self.global_ = TraceSetting(self.start, _apply(dict(self.global_.own), parsed))
            for name, setting in self.models.items():  # they follow the global value where they set none
                if set(setting.own) != set(DEFAULTS):
                    self.models[name] = TraceSetting(self.global_.fields(), setting.own)
        return self.get(model)


def _apply(own: dict, parsed: dict) -> dict:
    for name, value in parsed.items():
        if value is _CLEAR:
            own.pop(name, None)
        else:
            own[name] = value
    return own
