"""Logging setup: human text, or one JSON object per line for log collectors; and Triton's logging extension
(tritonclient's update_log_settings / get_log_settings, gRPC LogSettings, HTTP /v2/logging) over it.

Triton switches INFO, WARNING and ERROR messages on and off one by one and has verbose levels beyond INFO; here
that is one filter on the root handler (log_info / log_warning / log_error) and the root level (log_verbose_level
> 0 lets DEBUG through). Logging is process-wide, so the settings are too: one module-level state, set by `setup`."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping

from service.errors import InvalidArgument, Unimplemented

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
FORMATS = ("default", "ISO8601", "json")  # Triton's two, and ours; --log-format text is Triton's "default"
_LEVEL_FLAGS = {"debug": (True, True, True, 1), "info": (True, True, True, 0), "warning": (False, True, True, 0),
                "error": (False, False, True, 0)}  # --log-level -> log_info, log_warning, log_error, verbose level


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})  # `extra=` fields
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class Iso8601Formatter(logging.Formatter):
    """Text lines stamped in ISO 8601 UTC (Triton's log_format ISO8601)."""

    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"


class LevelSwitch(logging.Filter):
    """Triton's per-severity switches, which a single threshold cannot express (INFO on, WARNING off)."""

    def __init__(self) -> None:
        super().__init__()
        self.info = self.warning = self.error = True
        self.verbose = 0

    def filter(self, record: logging.LogRecord) -> bool:
        level = record.levelno
        if level >= logging.ERROR:
            return self.error
        if level >= logging.WARNING:
            return self.warning
        if level >= logging.INFO:
            return self.info
        return self.verbose > 0


_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_handler = logging.StreamHandler(sys.stderr)
_switch = LevelSwitch()
_handler.addFilter(_switch)
_format = "default"


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else Iso8601Formatter(_TEXT) if fmt == "ISO8601" else \
        logging.Formatter(_TEXT)


def _apply() -> None:
    s = _switch
    lowest = (logging.DEBUG if s.verbose else logging.INFO if s.info else logging.WARNING if s.warning
              else logging.ERROR if s.error else logging.CRITICAL + 1)
    logging.getLogger().setLevel(lowest)  # records below it are not even built
    _handler.setFormatter(_formatter(_format))


def setup(fmt: str, level: str) -> None:
    """--log-format text|json, --log-level debug|info|warning|error."""
    global _format
    _format = "json" if fmt == "json" else "default"
    _switch.info, _switch.warning, _switch.error, _switch.verbose = _LEVEL_FLAGS[level.lower()]
    _handler.setStream(sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [_handler]
    _apply()


def get_settings() -> dict:
    """Triton's log settings, as its JSON has them."""
    return {"log_file": "", "log_info": _switch.info, "log_warning": _switch.warning, "log_error": _switch.error,
            "log_verbose_level": _switch.verbose, "log_format": _format}


def update_settings(changes: Mapping) -> dict:
    """Apply Triton's log settings request (plain values; None leaves a setting as it is) and answer the settings.
    Every value is checked before any is applied; the change holds from the next log record on."""
    global _format
    new = get_settings()
    for key, value in changes.items():
        if value is None:
            continue
        if key == "log_file":
            raise Unimplemented("log_file: log file location can not be updated through the network protocol "
                                "(deepserve logs to stderr)")
        if key in ("log_info", "log_warning", "log_error"):
            if not isinstance(value, bool):
                raise InvalidArgument(f"{key}: expected a boolean, got {value!r}")
        elif key == "log_verbose_level":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"log_verbose_level: expected an integer >= 0, got {value!r}")
        elif key == "log_format":
            value = "default" if value == "text" else value
            if value not in FORMATS:
                raise InvalidArgument(f"log_format: expected one of {', '.join(FORMATS)}, got {value!r}")
        else:
            raise InvalidArgument(f"unknown log setting {key!r}; expected log_info, log_warning, log_error, "
                                  "log_verbose_level, log_format or log_file")
        new[key] = value
    _switch.info, _switch.warning, _switch.error = new["log_info"], new["log_warning"], new["log_error"]
    _switch.verbose, _format = new["log_verbose_level"], new["log_format"]
    _apply()
    return get_settings()
