"""Auth and TLS, one mechanism for both front ends: bearer tokens from --auth-token-file compared in constant time,
and the --tls-* files as gRPC credentials and as an ssl.SSLContext for HTTP."""

from __future__ import annotations

import hmac
import ssl
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings

CHALLENGE = "missing or invalid bearer token (header 'authorization: Bearer <token>')"


class ConfigError(Exception):
    """A security file that cannot be used: start-up stops with this message and exit 2."""


@dataclass(frozen=True)
class Tokens:
    tokens: tuple[bytes, ...]
    open_health: bool  # health checks need no token (Kubernetes probes send none)

    def accepts(self, authorization: str | bytes | None) -> bool:
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        offered = authorization or ""
        token = offered[7:].strip().encode() if offered.lower().startswith("bearer ") else b""
        ok = False
        for t in self.tokens:  # no early exit: the time taken does not depend on which token matched
            ok |= hmac.compare_digest(token, t)
        return ok


def load_tokens(settings: Settings) -> Tokens | None:
    if not settings.auth_token_file:
        return None
    try:
        text = Path(settings.auth_token_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--auth-token-file {settings.auth_token_file} cannot be read as UTF-8 text: {exc}") \
            from None
    tokens = tuple(t.strip().encode() for t in text.splitlines() if t.strip())
    if not tokens:
        raise ConfigError(f"--auth-token-file {settings.auth_token_file} holds no token")
    return Tokens(tokens, settings.open_health)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca:
        ctx.load_verify_locations(settings.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
