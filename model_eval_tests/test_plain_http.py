"""plain_http, the kept-alive HTTP/1.1 POST the lean client uses for plain http:// endpoints, against a
raw asyncio TCP server that answers with exactly the bytes each test scripts (framings, closes,
silences a real server may produce). The fault classes through the engine are compared with
litellm's in test_inference_engine.py; these cover the connection handling itself."""

from __future__ import annotations

import asyncio
import json

import pytest

from model_eval.plain_http import PlainHTTPPool

ANSWER = json.dumps({"choices": [{"message": {"content": "PASS"}, "finish_reason": "stop"}]}).encode()


def with_length(body: bytes = ANSWER, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def serve(reply, scenario):
    """Run `scenario(pool, seen)` against a server whose `reply(request_bytes, writer, seen)` answers each request."""
    seen = {"connections": 0, "requests": []}

    async def handle(reader, writer):
        seen["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
                seen["requests"].append(head + await reader.readexactly(length))
                if await reply(writer, seen):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = PlainHTTPPool(f"http://127.0.0.1:{port}/v1", {"Content-Type": "application/json", "Authorization": "Bearer k"}, 1.0)
    try:
        return await scenario(pool, seen)
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


def run(reply, scenario):
    return asyncio.run(serve(reply, scenario))


def test_calls_reuse_one_connection_and_send_the_request_as_given():
    async def reply(writer, seen):
        writer.write(with_length())
        return False

    async def scenario(pool, seen):
        answers = [await pool.post("/chat/completions", b'{"n": %d}' % i) for i in range(20)]
        return answers, seen

    answers, seen = run(reply, scenario)
    assert all(status == 200 and body == ANSWER and headers["content-type"] == "application/json"
               for status, headers, body in answers)
    assert seen["connections"] == 1 and len(seen["requests"]) == 20
    first = seen["requests"][0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and first.endswith(b'\r\n\r\n{"n": 0}')
    assert b"\r\nHost: 127.0.0.1:" in first and b"\r\nAuthorization: Bearer k\r\n" in first


def test_a_connection_the_server_drops_after_each_answer_is_replaced_without_an_error():
    async def reply(writer, seen):   # says nothing about closing, then closes: the client finds out on reuse
        writer.write(with_length())
        await writer.drain()
        return True

    async def scenario(pool, seen):
        results = []
        for i in range(15):
            results.append(await pool.post("/chat/completions", b"{}"))
            if i % 3 == 0:
                await asyncio.sleep(0.01)   # sometimes the close is seen before the next call, sometimes not
        return results, seen

    results, seen = run(reply, scenario)
    assert [status for status, _, _ in results] == [200] * 15 and seen["connections"] == 15


@pytest.mark.parametrize("framing", ["chunked", "until-close"])
def test_chunked_and_close_delimited_bodies_are_read_whole(framing):
    async def reply(writer, seen):
        if framing == "chunked":
            half = len(ANSWER) // 2
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, ANSWER[:half], len(ANSWER) - half, ANSWER[half:]))
            return False
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + ANSWER)
        return True

    async def scenario(pool, seen):
        return [await pool.post("/chat/completions", b"{}") for _ in range(3)], seen

    answers, seen = run(reply, scenario)
    assert [(status, body) for status, _, body in answers] == [(200, ANSWER)] * 3
    assert seen["connections"] == (1 if framing == "chunked" else 3)


def test_a_body_cut_short_is_a_connection_error_and_its_connection_is_not_reused():
    async def reply(writer, seen):
        if len(seen["requests"]) == 1:
            writer.write(with_length()[:-10])   # promised more than it sends
            return True
        writer.write(with_length())
        return False

    async def scenario(pool, seen):
        with pytest.raises(ConnectionResetError):
            await pool.post("/chat/completions", b"{}")
        return await pool.post("/chat/completions", b"{}"), seen

    (status, _, body), seen = run(reply, scenario)
    assert status == 200 and body == ANSWER and seen["connections"] == 2


def test_the_read_timeout_counts_silence_not_the_whole_answer():
    async def reply(writer, seen):
        if len(seen["requests"]) == 1:
            await asyncio.sleep(5)   # nothing at all: past the 1 s timeout
            return True
        whole = with_length()
        for start in range(0, len(whole), len(whole) // 4 + 1):   # 1.6 s in all, never 1 s silent
            writer.write(whole[start:start + len(whole) // 4 + 1])
            await writer.drain()
            await asyncio.sleep(0.4)
        return False

    async def scenario(pool, seen):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await pool.post("/chat/completions", b"{}")
        silent_for = loop.time() - started
        status, _, body = await pool.post("/chat/completions", b"{}")
        return silent_for, status, body, seen

    silent_for, status, body, seen = run(reply, scenario)
    assert 0.9 <= silent_for < 2.0
    assert status == 200 and body == ANSWER and seen["connections"] == 2   # the timed-out connection was closed


def test_only_plain_http_endpoints_are_accepted():
    for url in ("https://api.example.com/v1", "http://user:pw@host/v1", "http://host/v1?api-version=1"):
        with pytest.raises(ValueError, match="plain http"):
            PlainHTTPPool(url, {}, 1.0)
