"""POST over plain HTTP/1.1 to one endpoint, on kept-alive connections: httptools' parser under asyncio.

What the lean client (`http_client`) uses for a non-streamed call to an `http://` endpoint reached
without a proxy: a model served on the same machine or network (llama.cpp, vLLM, Ollama), where the
client's own CPU is a visible share of a call. Profiled in the gateway, aiohttp's request and
response machinery took about 0.13 ms of CPU a call; this takes about 0.04 ms for the same exchange
(benchmarks/README.md, section 8). HTTPS, proxies and streamed answers stay on aiohttp.

Timeouts follow aiohttp's as the lean client sets them: `timeout_s` to connect, and `timeout_s`
without a byte from the server while waiting for the answer (a slow but steady body is not cut).
Failures raise `TimeoutError` or `ConnectionError`, which the client names as it names aiohttp's.
"""

from __future__ import annotations

import asyncio
import urllib.parse

import httptools


class StaleConnection(ConnectionError):
    """A kept-alive connection the server had closed before any byte of the answer: safe to send again."""


class _Connection(asyncio.Protocol):
    """One connection; one request at a time (the pool hands it out to one caller)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reply: asyncio.Future | None = None
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._headers_done = False
        self._delimited = False    # Content-Length or chunked: else the body ends when the server closes
        self._received = False
        self._last_data = 0.0
        self._read_timeout_s = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._received = True
        self._last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"malformed HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.reply is None or self.reply.done():
            return
        if self._headers_done and not self._delimited:
            self._complete(keep_alive=False)   # the body was "everything until the server closes"
        elif not self._received:
            self._fail(StaleConnection("the server closed the connection before answering"))
        else:
            self._fail(ConnectionResetError(f"the server closed the connection mid-answer ({exc or 'EOF'})"))

    # ------------------------------------------------------------ httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        # Names lower-cased (HTTP's are case-insensitive): readers look up e.g. headers.get("retry-after").
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        names = {name for name, _ in self._headers}
        self._delimited = "content-length" in names or "transfer-encoding" in names

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete(keep_alive=self.parser.should_keep_alive())

    # ------------------------------------------------------------ one exchange
    def _complete(self, keep_alive: bool) -> None:
        reply = self.reply
        if reply is not None and not reply.done():
            reply.set_result((self.parser.get_status_code(), dict(self._headers), b"".join(self._body), keep_alive))

    def _fail(self, exc: BaseException) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(exc)

    async def exchange(self, request: bytes, read_timeout_s: float):
        """Send one request; (status, headers, body, keep_alive) once the whole answer is in."""
        self.reply = reply = self.loop.create_future()
        self._headers, self._body, self._headers_done, self._delimited, self._received = [], [], False, False, False
        self._last_data = self.loop.time()
        self._read_timeout_s = read_timeout_s
        self._timer = self.loop.call_later(read_timeout_s, self._check_read_timeout)
        self.transport.write(request)
        try:
            return await reply
        finally:
            self._timer.cancel()
            self.reply = None

    def _check_read_timeout(self) -> None:
        # One timer per exchange, re-armed only when bytes arrived meanwhile: no timer work per chunk.
        quiet = self.loop.time() - self._last_data
        if quiet >= self._read_timeout_s:
            self._fail(TimeoutError(f"no byte from the server for {self._read_timeout_s:g} s"))
        else:
            self._timer = self.loop.call_later(self._read_timeout_s - quiet, self._check_read_timeout)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class PlainHTTPPool:
    """Kept-alive connections to one `http://host[:port]` endpoint, opened as needed, never capped
    (the caller's concurrency limit decides how many are in flight). Use in one event loop."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout_s: float):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "http" or parts.query or parts.username or not parts.hostname:
            raise ValueError(f"PlainHTTPPool serves plain http://host[:port]/path endpoints, not {base_url}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.path_prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        head = {"Host": parts.netloc, **headers}
        self._head = "".join(f"{name}: {value}\r\n" for name, value in head.items()).encode("latin-1")
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout_s):
            _, connection = await loop.create_connection(lambda: _Connection(loop), self.host, self.port)
        return connection

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of one POST; TimeoutError or ConnectionError (OSError) when it fails."""
        request = (b"POST " + (self.path_prefix + path).encode("latin-1") + b" HTTP/1.1\r\n" + self._head
                   + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        while True:
            connection = None
            while self._idle and connection is None:
                candidate = self._idle.pop()
                connection = None if candidate.closed else candidate
            reused = connection is not None
            if connection is None:
                connection = await self._connect()
            try:
                status, headers, answer, keep_alive = await connection.exchange(request, self.timeout_s)
            except StaleConnection:
                connection.close()
                if reused:
                    continue   # the server had dropped an idle connection; it never saw this request
                raise
            except BaseException:   # failed, timed out or cancelled mid-exchange: the connection's state is unknown
                connection.close()
                raise
            if keep_alive and not connection.closed:
                self._idle.append(connection)
            else:
                connection.close()
            return status, headers, answer

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
