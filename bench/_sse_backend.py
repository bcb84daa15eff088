"""The inference benchmark's streaming backend: a minimal asyncio HTTP/1.1 server shaped like vLLM.

``GET /v1/models`` lists two models (so the enclave's registry discovers it as a ``vllm``-kind backend);
``POST /v1/chat/completions`` with ``"stream": true`` answers ``text/event-stream`` (chunked), one
OpenAI ``chat.completion.chunk`` per event at a fixed pace set by the model: ``bench-stream`` every
``--interval-ms``, ``bench-slow`` every ``--slow-interval-ms`` (the open-streams memory test). The first
event goes out as soon as the request is read, event ``i`` at ``start + i * interval`` (no drift).

Every event's content is ``tok<i>@<t>; `` where ``t`` is ``time.monotonic_ns()`` when it was written:
CLOCK_MONOTONIC is one clock for every process of the machine, so the load generator measures each
event's one-way delay, whatever gateway relays it. It also makes every chunk differ (LiteLLM ends a
stream after 100 identical chunks). ``stream_options.include_usage`` adds the usage-only chunk
(``choices: []``) before ``data: [DONE]``, as vLLM does.

    python bench/_sse_backend.py --port-file F [--events 256] [--interval-ms 10] [--slow-interval-ms 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

STREAM_MODEL = "bench-stream"
SLOW_MODEL = "bench-slow"
MAX_HEAD = 65536
MAX_BODY = 1 << 20


class BadRequest(Exception):
    pass


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    """One request (method, path, lower-cased headers, body); None when the client closed first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large") from None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, path, _ = lines[0].split(" ", 2)
    except ValueError:
        raise BadRequest("bad request line") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
            if len(body) > MAX_BODY:
                raise BadRequest("body too large")
        return method, path, headers, bytes(body)
    length = int(headers.get("content-length", "0"))
    if length > MAX_BODY:
        raise BadRequest("body too large")
    return method, path, headers, await reader.readexactly(length) if length else b""


def _response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
            .encode() + body)


class Backend:
    def __init__(self, events: int, interval: float, slow_interval: float) -> None:
        self.events = events
        self.pace = {STREAM_MODEL: interval, SLOW_MODEL: slow_interval}
        self.streams_open = 0

    def models_body(self) -> bytes:
        created = int(time.time())
        return json.dumps({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "bench", "max_model_len": 4096}
            for name in self.pace]}).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    return
                method, path, headers, body = request
                if method == "GET" and path.split("?")[0] in ("/v1/models", "/models"):
                    writer.write(_response("200 OK", self.models_body()))
                elif method == "GET" and path in ("/health", "/version"):
                    writer.write(_response("200 OK", b"{}"))
                elif method == "POST" and path.split("?")[0] in ("/v1/chat/completions", "/chat/completions"):
                    await self.chat(writer, json.loads(body or b"{}"))
                else:
                    writer.write(_response("404 Not Found", b'{"error": {"message": "no such route"}}'))
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, BadRequest, asyncio.IncompleteReadError, json.JSONDecodeError, ValueError):
            return
        finally:
            writer.close()

    async def chat(self, writer: asyncio.StreamWriter, request: dict) -> None:
        model = request.get("model")
        if model not in self.pace:
            writer.write(_response("404 Not Found", json.dumps(
                {"error": {"message": f"model {model!r} not found", "type": "invalid_request_error"}}).encode()))
            return
        if not request.get("stream"):
            text = " ".join(f"tok{i}" for i in range(self.events))
            writer.write(_response("200 OK", json.dumps({
                "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 8, "completion_tokens": self.events, "total_tokens": 8 + self.events},
            }).encode()))
            return
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        interval = self.pace[model]
        loop = asyncio.get_running_loop()
        start = loop.time()
        prefix = f'{{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":{int(time.time())},' \
                 f'"model":"{model}","choices":[{{"index":0,"delta":{{'
        self.streams_open += 1
        try:
            for i in range(self.events):
                delay = start + i * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                role = '"role":"assistant",' if i == 0 else ""
                finish = '"stop"' if i == self.events - 1 else "null"
                event = (f'data: {prefix}{role}"content":"tok{i}@{time.monotonic_ns()}; "}},'
                         f'"logprobs":null,"finish_reason":{finish}}}]}}\n\n').encode()
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()  # raises once the client (the gateway) went away: generation stops
            if include_usage:
                usage = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                                    "model": model, "choices": [], "usage": {
                                        "prompt_tokens": 8, "completion_tokens": self.events,
                                        "total_tokens": 8 + self.events}})
                event = f"data: {usage}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        finally:
            self.streams_open -= 1


async def serve(args: argparse.Namespace) -> None:
    backend = Backend(args.events, args.interval_ms / 1000, args.slow_interval_ms / 1000)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", args.port, backlog=4096, limit=MAX_HEAD)
    port = server.sockets[0].getsockname()[1]
    Path(args.port_file).write_text(str(port))
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", required=True, help="written with the listening port once ready")
    parser.add_argument("--events", type=int, default=256)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--slow-interval-ms", type=float, default=1000.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
