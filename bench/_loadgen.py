"""The inference benchmark's load generator: streamed chat completions over raw asyncio sockets (+TLS).

Runs in its own process (uvloop when installed) so the gateways' cost is not its cost. A minimal
HTTP/1.1 client (keep-alive, chunked or length-delimited bodies) and SSE reader: per stream it records
the time to the first token (request written -> first event carrying a backend stamp, see
``_sse_backend``) and each event's one-way delay (receive time - the backend's ``monotonic_ns`` stamp).
It verifies nothing but TLS: ``--cafile`` trusts a certificate as is (the enclave's simulated platform
publishes its certificate for exactly that); attestation is the benchmark's job before it starts this.

    run:  --concurrency C --requests R   C keep-alive connections, R streams each, one at a time (starts
          spread over --stagger s); writes one JSON object (ttft_ns, delay_ns, events, streams, errors) to
          --out FILE, or to stdout without it. (A pipe is no place for it: at 64 streams it is ~400 KiB, and
          print() into the benchmark's pipe came out cut at 64 or 128 KiB now and then, with exit code 0.)
    hold: --streams N                    N streams open at once; prints ``ready {json}`` once each got its
          first event (or --timeout passed), holds them until a line arrives on stdin, then closes them
          all (the gateway must cancel upstream) and prints the final JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import ssl
import sys
import time
from dataclasses import dataclass, field

STAMP = re.compile(rb"tok(\d+)@(\d+);")
SEPARATORS = (b"\n\n", b"\r\n\r\n")


class StreamError(Exception):
    pass


@dataclass
class Target:
    host: str
    port: int
    path: str
    headers: list[tuple[str, str]]
    model: str
    events: int
    ssl_context: ssl.SSLContext | None

    def request(self) -> bytes:
        body = json.dumps({"model": self.model, "stream": True, "max_tokens": self.events,
                           "messages": [{"role": "user", "content": "Count for the benchmark."}]}).encode()
        head = [f"POST {self.path} HTTP/1.1", f"host: {self.host}:{self.port}", "content-type: application/json",
                "accept: text/event-stream", f"content-length: {len(body)}", "user-agent: cube-bench-loadgen"]
        head += [f"{name}: {value}" for name, value in self.headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class Tally:
    ttft_ns: list[int] = field(default_factory=list)
    delay_ns: list[int] = field(default_factory=list)
    events: int = 0
    streams: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"ttft_ns": self.ttft_ns, "delay_ns": self.delay_ns, "events": self.events,
                "streams": self.streams, "errors": self.errors[:20], "error_count": len(self.errors)}


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.reusable = True

    @classmethod
    async def open(cls, target: Target) -> "Connection":
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=target.ssl_context, limit=1 << 20,
            server_hostname=target.host if target.ssl_context else None)
        return cls(reader, writer)

    def close(self) -> None:
        self.writer.transport.abort()

    async def _head(self) -> tuple[int, dict[str, str]]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("connection", "").lower() == "close":
            self.reusable = False
        return status, headers

    async def _body_parts(self, headers: dict[str, str]):
        """The body's bytes as they arrive, whatever the framing."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers expected
                    return
                data = await self.reader.readexactly(size + 2)
                yield data[:-2]
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left > 0:
                data = await self.reader.read(min(left, 65536))
                if not data:
                    raise StreamError("connection closed inside the body")
                left -= len(data)
                yield data
        else:
            self.reusable = False
            while data := await self.reader.read(65536):
                yield data

    async def stream(self, target: Target, tally: Tally, on_first=None) -> None:
        """One streamed completion; every event checked (all present, in order)."""
        sent = time.monotonic_ns()
        self.writer.write(target.request())
        status, headers = await self._head()
        if status != 200:
            text = b"".join([part async for part in self._body_parts(headers)])
            raise StreamError(f"HTTP {status}: {text[:300].decode('utf-8', 'replace')}")
        buffer = b""
        expected = 0
        done = False
        async for part in self._body_parts(headers):
            now = time.monotonic_ns()
            buffer += part
            while True:
                cut, width = -1, 0
                for sep in SEPARATORS:
                    at = buffer.find(sep)
                    if at != -1 and (cut == -1 or at < cut):
                        cut, width = at, len(sep)
                if cut == -1:
                    break
                event, buffer = buffer[:cut], buffer[cut + width:]
                if b"[DONE]" in event:
                    done = True
                    continue
                if b'"error"' in event and not STAMP.search(event):
                    raise StreamError(f"error event: {event[:300].decode('utf-8', 'replace')}")
                match = STAMP.search(event)
                if match is None:
                    continue  # e.g. a usage-only chunk, a role-only chunk, a comment
                index, stamp = int(match.group(1)), int(match.group(2))
                if index != expected:
                    raise StreamError(f"event {index} arrived where {expected} was expected")
                if expected == 0:
                    tally.ttft_ns.append(now - sent)
                    if on_first is not None:
                        on_first()
                else:
                    tally.delay_ns.append(now - stamp)
                expected += 1
                tally.events += 1
        if expected != target.events or not done:
            raise StreamError(f"stream ended after {expected} of {target.events} events"
                              f"{'' if done else ', without data: [DONE]'}")
        tally.streams += 1


async def run_workers(target: Target, concurrency: int, requests: int, stagger: float = 0.0) -> Tally:
    """``concurrency`` workers, ``requests`` streams each; worker i starts ``i * stagger / concurrency`` s
    late, so that streams of equal length keep starting all the time instead of in one burst."""
    tally = Tally()

    async def worker(number: int) -> None:
        await asyncio.sleep(number * stagger / concurrency)
        conn: Connection | None = None
        for _ in range(requests):
            try:
                if conn is None or not conn.reusable:
                    conn = await Connection.open(target)
                await conn.stream(target, tally)
            except (StreamError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                tally.errors.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return tally


async def hold_streams(target: Target, streams: int, timeout: float, connect_parallel: int) -> None:
    """Open ``streams`` streams at once, report when all are flowing, hold them until told to stop."""
    tally = Tally()
    started = asyncio.Semaphore(connect_parallel)  # bounds handshakes in progress, not open streams
    first = 0
    all_first = asyncio.Event()
    conns: list[Connection] = []

    def got_first() -> None:
        nonlocal first
        first += 1
        if first == streams:
            all_first.set()

    async def one() -> None:
        try:
            async with started:
                conn = await Connection.open(target)
                conns.append(conn)
            await conn.stream(target, tally, on_first=got_first)
        except (StreamError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            tally.errors.append(f"{type(exc).__name__}: {exc}")

    began = time.monotonic()
    tasks = [asyncio.create_task(one()) for _ in range(streams)]
    try:
        await asyncio.wait_for(all_first.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    flowing = first - sum(1 for t in tasks if t.done())  # got an event and still open
    ready = {"opened": len(conns), "first_event": first, "flowing": flowing,
             "seconds": round(time.monotonic() - began, 3), "errors": tally.errors[:5]}
    print("ready " + json.dumps(ready), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    still_open = sum(1 for t in tasks if not t.done())
    for conn in conns:
        conn.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({**ready, "still_open_at_stop": still_open, "error_count": len(tally.errors)}), flush=True)


def write_result(result: dict, out: str | None) -> None:
    """The run's JSON, complete: into ``out`` (written under a temporary name, then renamed, so a reader never
    sees half of it), else to stdout in one loop of raw writes that only ends when every byte is out."""
    text = json.dumps(result) + "\n"
    if out:
        partial = f"{out}.partial"
        with open(partial, "w", encoding="utf-8") as sink:
            sink.write(text)
        os.replace(partial, out)
        return
    sys.stdout.flush()
    view = memoryview(text.encode())
    fd = sys.stdout.fileno()
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:   # a descriptor someone set non-blocking: wait until the pipe drains
            select.select([], [fd], [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("run", "hold"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--events", type=int, default=256, help="events every stream must carry")
    parser.add_argument("--cafile", help="TLS, trusting this certificate (PEM); plain HTTP without it")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1, help="streams per connection (run)")
    parser.add_argument("--stagger", type=float, default=0.0, help="run: spread the workers' starts over this many s")
    parser.add_argument("--streams", type=int, default=1000, help="streams held open at once (hold)")
    parser.add_argument("--timeout", type=float, default=60.0, help="hold: longest wait for the first events")
    parser.add_argument("--connect-parallel", type=int, default=64)
    parser.add_argument("--out", help="run: write the result JSON to this file instead of stdout")
    args = parser.parse_args()
    context = None
    if args.cafile:
        context = ssl.create_default_context(cafile=args.cafile)
    headers = [tuple(part.strip() for part in h.split(":", 1)) for h in args.header]
    target = Target(args.host, args.port, args.path, headers, args.model, args.events, context)  # type: ignore[arg-type]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.mode == "run":
        tally = asyncio.run(run_workers(target, args.concurrency, args.requests, args.stagger))
        write_result(tally.to_json(), args.out)
    else:
        asyncio.run(hold_streams(target, args.streams, args.timeout, args.connect_parallel))


if __name__ == "__main__":
    main()
