"""Who may use the gateway, and how much: bearer tokens, the bind rules, body size and rate limits.

Tokens come only from the environment (never a flag: flags show up in `ps` and shell history):
MODEL_EVAL_API_TOKEN may read and write (chat completions, feedback), MODEL_EVAL_API_READ_TOKEN may
only read. Tokens are compared through their SHA-256 digests with `hmac.compare_digest`, so the
comparison takes the same time whatever the length or the first differing byte of a guess.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from model_eval.errors import ModelEvalError
from model_eval.local_server import is_loopback

WRITE_TOKEN_ENV = "MODEL_EVAL_API_TOKEN"
READ_TOKEN_ENV = "MODEL_EVAL_API_READ_TOKEN"
# Tokens shorter than this are refused at start-up: a short shared secret is guessable over HTTP.
MIN_TOKEN_CHARS = 16


class GatewayConfigError(ModelEvalError):
    """The gateway was asked to start in a way that would expose it; the message says what to change."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class Access:
    """The configured tokens (as digests: the tokens themselves are not kept) and whether auth is off."""

    write_digest: bytes | None
    read_digest: bytes | None
    no_auth: bool = False

    @classmethod
    def from_env(cls, no_auth: bool = False) -> "Access":
        tokens = {}
        for name in (WRITE_TOKEN_ENV, READ_TOKEN_ENV):
            value = os.environ.get(name) or None
            if value is not None and len(value) < MIN_TOKEN_CHARS:
                raise GatewayConfigError(f"{name} is shorter than {MIN_TOKEN_CHARS} characters; use a long random token "
                                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
            tokens[name] = value
        write, read = tokens[WRITE_TOKEN_ENV], tokens[READ_TOKEN_ENV]
        if write is not None and write == read:
            raise GatewayConfigError(f"{WRITE_TOKEN_ENV} and {READ_TOKEN_ENV} are the same; the read token must not write")
        return cls(_digest(write) if write else None, _digest(read) if read else None, no_auth)

    @property
    def configured(self) -> bool:
        return self.write_digest is not None or self.read_digest is not None

    def level(self, authorization: str | None) -> str | None:
        """"write", "read" or None (no valid token) for an Authorization header's value."""
        if self.no_auth:
            return "write"
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        digest = _digest(token.strip())
        # Both comparisons always run, so the timing does not tell which token a guess was near.
        is_write = self.write_digest is not None and hmac.compare_digest(digest, self.write_digest)
        is_read = self.read_digest is not None and hmac.compare_digest(digest, self.read_digest)
        return "write" if is_write else "read" if is_read else None


def check_bind(host: str, access: Access, allow_remote: bool) -> None:
    """Refuse a start that would expose the gateway: every rule of README's "Gateway" section, in one place."""
    if access.no_auth:
        if access.configured:
            raise GatewayConfigError("--no-auth given while a token is set in the environment: choose one")
        if not is_loopback(host):
            raise GatewayConfigError(f"--no-auth only binds a loopback address (127.0.0.1, ::1), not {host}")
        return
    if not access.configured:
        raise GatewayConfigError(f"no token configured: set {WRITE_TOKEN_ENV} (read and write) and/or {READ_TOKEN_ENV} "
                                 "(read only) in the environment, or start with --no-auth on a loopback address")
    if not is_loopback(host) and not allow_remote:
        raise GatewayConfigError(f"{host} is not a loopback address: binding it exposes the gateway to the network; "
                                 "pass --allow-remote to do so on purpose (put TLS in front of it)")


# ---------------------------------------------------------------- limits, as a plain ASGI middleware
def error_body(status: int, message: str, param: str | None = None, kind: str | None = None) -> bytes:
    """The OpenAI error shape, so the openai client raises its usual exception with our message."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}
    return json.dumps({"error": {"message": message, "type": kind or kinds.get(status, "server_error"),
                                 "param": param, "code": None}}).encode()


class TokenBucket:
    """`rate` requests a second with bursts of `burst`, per client; refilled lazily on each request."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._state: dict[str, tuple[float, float]] = {}   # client -> (tokens, last refill time)

    def take(self, client: str, now: float | None = None) -> float:
        """0 when the request may go on, else the seconds until it could (Retry-After)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._state.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._state[client] = (tokens - 1.0, now)
            return 0.0
        self._state[client] = (tokens, now)
        if len(self._state) > 10_000:   # forget clients whose bucket has refilled: memory stays bounded
            self._state = {c: (t, at) for c, (t, at) in self._state.items() if t + (now - at) * self.rate < self.burst}
        return (1.0 - tokens) / self.rate


class LimitsMiddleware:
    """Body size limit (413) and per-client rate limit (429 with Retry-After), before any routing.

    A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware: that one wraps every
    response in an extra task and stream, which costs time on every call and delays streamed pieces.
    The client is the peer address: behind a reverse proxy, limit there instead.
    """

    def __init__(self, app, max_body_bytes: int, rate_per_s: float, burst: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.bucket = TokenBucket(rate_per_s, burst) if rate_per_s > 0 else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.bucket is not None and scope.get("path") != "/v1/health":
            client = (scope.get("client") or ("unknown", 0))[0]
            wait = self.bucket.take(client)
            if wait > 0:
                return await _reply(send, 429, error_body(429, f"rate limit: at most {self.bucket.rate:g} requests/s "
                                                               f"(bursts of {self.bucket.burst}) per client"),
                                    [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            return await _reply(send, 413, error_body(413, f"request body of {length} bytes is over the limit of "
                                                           f"{self.max_body_bytes} bytes", "body"))
        if length is not None:
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): count as the body arrives.
        received = 0
        limit = self.max_body_bytes

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, counted_receive, send)
        except BodyTooLarge:
            await _reply(send, 413, error_body(413, f"request body is over the limit of {limit} bytes", "body"))


class BodyTooLarge(Exception):
    pass


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reply(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
