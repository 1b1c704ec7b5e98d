"""A fast stand-in upstream for scripts/bench.py: raw asyncio, HTTP/1.1 keep-alive, no framework.

    python scripts/bench_upstream.py [--host 127.0.0.1] [--port 0] [--key KEY]

Prints `READY <port>` on stdout once it listens; runs until SIGTERM/SIGINT. Uses uvloop when
it is installed. Answers:

- POST /v1/embeddings: 200 with a fixed ~1 KB JSON body (OpenAI's shape, with `usage`).
- POST /v1/chat/completions[?chunks=N&pause_ms=P]: 200 `text/event-stream`, chunked, N
  (default 200) `chat.completion.chunk` events P ms apart (default 5; the first right after
  the headers), then `data: [DONE]`. Each event carries `"t":<time.time_ns() just before the
  write>` and `"i":<index>`, so a client on this machine can tell how late each chunk arrives.
- anything else: 404.

With `--key KEY` (or `BENCH_UPSTREAM_KEY` in the environment), a request whose
`Authorization` is not `Bearer KEY` gets 401: that proves the proxy in front swapped the
caller's token for the real key on every request.

It does the least work it can per request (one parse, one or two writes), so that whatever it
costs is the same on the direct path and through a proxy, and small beside either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from urllib.parse import parse_qs

_VEC = [round(((i * 7919) % 2000) / 1000.0 - 1.0, 6) for i in range(132)]
EMBEDDING_BODY = json.dumps({
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": _VEC}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}, separators=(",", ":")).encode()
EMBEDDING_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"x-request-id: req_bench\r\nopenai-processing-ms: 1\r\n"
    b"Content-Length: " + str(len(EMBEDDING_BODY)).encode() + b"\r\n\r\n" + EMBEDDING_BODY
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nx-request-id: req_bench\r\nTransfer-Encoding: chunked\r\n\r\n"
)
NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
             b"Content-Length: 2\r\n\r\n{}")
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
UNAUTHORIZED = (b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\n\r\n{}")
_EVENT = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
          b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"tok "},'
          b'"finish_reason":null}],"i":%d,"t":%d}\n\n')
_DONE = b"data: [DONE]\n\n"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Upstream(asyncio.Protocol):
    expected_auth: str | None = None  # "Bearer KEY" when --key is given

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a stream is being written; parse the next request after it
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            try:
                method, target, _version = head[0].split(" ", 2)
            except ValueError:
                self.transport.write(BAD_REQUEST)
                self.transport.close()
                return
            length, chunked, close, auth = 0, False, False, None
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
                elif name == "connection" and "close" in value.lower():
                    close = True
                elif name == "authorization":
                    auth = value.strip()
            start = end + 4
            if chunked:  # rare here (bench clients send Content-Length); skip to the last chunk
                stop = self.buf.find(b"\r\n0\r\n\r\n", start - 2)
                if stop < 0:
                    return
                del self.buf[: stop + 7]
            else:
                if len(self.buf) < start + length:
                    return
                del self.buf[: start + length]
            self._respond(method, target, close, auth)

    def _respond(self, method: str, target: str, close: bool, auth: str | None) -> None:
        assert self.transport is not None
        path, _, query = target.partition("?")
        if self.expected_auth is not None and auth != self.expected_auth:
            self.transport.write(UNAUTHORIZED)
        elif method == "POST" and path == "/v1/embeddings":
            self.transport.write(EMBEDDING_RESPONSE)
        elif method == "POST" and path == "/v1/chat/completions":
            args = parse_qs(query)
            chunks = int(args.get("chunks", ["200"])[0])
            pause = float(args.get("pause_ms", ["5"])[0]) / 1000.0
            self.busy = True
            self.task = asyncio.get_running_loop().create_task(self._stream(chunks, pause, close))
            return
        else:
            self.transport.write(NOT_FOUND)
        if close:
            self.transport.close()

    async def _stream(self, chunks: int, pause: float, close: bool) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(STREAM_HEAD)
        for i in range(chunks):
            if i:
                await asyncio.sleep(pause)
            if self.transport is None:
                return
            transport.write(_chunk(_EVENT % (i, time.time_ns())))
        if self.transport is None:
            return
        transport.write(_chunk(_DONE) + b"0\r\n\r\n")
        self.task = None
        self.busy = False
        if close:
            transport.close()
        elif self.buf:
            self._process()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {bound}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default=os.environ.get("BENCH_UPSTREAM_KEY"),
                        help="answer 401 unless Authorization is `Bearer KEY` "
                             "(default: $BENCH_UPSTREAM_KEY)")
    args = parser.parse_args()
    if args.key:
        Upstream.expected_auth = f"Bearer {args.key}"
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
