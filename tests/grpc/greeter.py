#!/usr/bin/env python3
"""A real gRPC server (grpcio) for the gateway's gRPC tests, with no protoc and no generated code.

Service `helloworld.Greeter`; every message is raw bytes (identity serializers), so requests and
replies are plain ASCII the tests can read:

  SayHello      unary: replies b"hello " + request. Initial metadata echoes each request
                metadata key starting with "x-" as "x-seen-KEY"; a request carrying
                `x-want-trailer: V` gets the trailing metadata `x-trailer-echo: V`.
  Metadata      unary: replies the JSON object of the request metadata it received.
  ServerStream  request b"N" (or b"N:SIZE"): streams N messages b"msg I" (padded to SIZE bytes).
  ClientStream  counts the request messages: replies b"count=N bytes=B".
  Bidi          echoes each request message as b"echo " + message, as it arrives.
  Slow          request b"SECONDS": sleeps that long unless the call's deadline passes or the
                client cancels first (then it stops at once), then replies b"slept SECONDS".
  StreamThenHang request b"K": sends K messages b"part I", then holds the stream open (up to
                the call's deadline or 120 s) without finishing it; the tests kill this process
                there to see what a client gets from a backend that dies mid-stream.
  Fail          request b"CODE[:DETAILS]": ends the call with that status code number.

--trailer KEY=VALUE (repeatable) adds trailing metadata to every reply. Binds 127.0.0.1 only;
--port 0 takes any free port. Prints one line `READY port=PORT pid=PID` when serving, then one line
per finished call on stderr (method, status) for the test's log.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "helloworld.Greeter"
MAX_HANG = 120.0


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


class Greeter:
    def __init__(self, trailers):
        self.trailers = tuple(trailers)

    def _finish(self, context, extra=()):
        trailing = self.trailers + tuple(extra)
        if trailing:
            context.set_trailing_metadata(trailing)

    @staticmethod
    def _metadata(context):
        return [(k, v) for k, v in context.invocation_metadata()]

    def say_hello(self, request, context):
        md = self._metadata(context)
        initial = []
        extra = []
        for k, v in md:
            if k.startswith("x-") and not k.endswith("-bin"):
                initial.append(("x-seen-" + k, v))
            if k == "x-want-trailer":
                extra.append(("x-trailer-echo", v))
        if initial:
            context.send_initial_metadata(tuple(initial))
        self._finish(context, extra)
        log("SayHello OK", len(request))
        return b"hello " + request

    def metadata(self, request, context):
        md = {}
        for k, v in self._metadata(context):
            if isinstance(v, bytes):
                v = v.hex()
            md.setdefault(k, []).append(v)
        self._finish(context)
        return json.dumps(md, sort_keys=True).encode()

    def server_stream(self, request, context):
        text = request.decode()
        n, _, size = text.partition(":")
        n = int(n)
        size = int(size or 0)
        for i in range(n):
            if not context.is_active():
                log("ServerStream cancelled at", i)
                return
            msg = ("msg %d" % i).encode()
            if len(msg) < size:
                msg += b"." * (size - len(msg))
            yield msg
        self._finish(context)
        log("ServerStream OK", n)

    def client_stream(self, request_iterator, context):
        n = 0
        total = 0
        for m in request_iterator:
            n += 1
            total += len(m)
        self._finish(context)
        log("ClientStream OK", n)
        return ("count=%d bytes=%d" % (n, total)).encode()

    def bidi(self, request_iterator, context):
        n = 0
        for m in request_iterator:
            n += 1
            yield b"echo " + m
        self._finish(context)
        log("Bidi OK", n)

    def slow(self, request, context):
        seconds = float(request.decode() or "5")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not context.is_active():
                # The deadline passed or the client (here: the gateway) cancelled.
                log("Slow stopped early: deadline or cancel")
                return b""
            time.sleep(0.02)
        self._finish(context)
        log("Slow OK", seconds)
        return ("slept %s" % request.decode()).encode()

    def stream_then_hang(self, request, context):
        k = int(request.decode() or "1")
        for i in range(k):
            yield ("part %d" % i).encode()
        log("StreamThenHang sent", k)
        end = time.monotonic() + MAX_HANG
        while time.monotonic() < end and context.is_active():
            time.sleep(0.05)
        log("StreamThenHang ended without being killed")

    def fail(self, request, context):
        text = request.decode()
        code, _, details = text.partition(":")
        code = int(code)
        status = next(c for c in grpc.StatusCode if c.value[0] == code)
        self._finish(context)
        context.abort(status, details or ("failed with %d" % code))


def handler(greeter):
    ident = dict(request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "SayHello": grpc.unary_unary_rpc_method_handler(greeter.say_hello, **ident),
            "Metadata": grpc.unary_unary_rpc_method_handler(greeter.metadata, **ident),
            "ServerStream": grpc.unary_stream_rpc_method_handler(greeter.server_stream, **ident),
            "ClientStream": grpc.stream_unary_rpc_method_handler(greeter.client_stream, **ident),
            "Bidi": grpc.stream_stream_rpc_method_handler(greeter.bidi, **ident),
            "Slow": grpc.unary_unary_rpc_method_handler(greeter.slow, **ident),
            "StreamThenHang": grpc.unary_stream_rpc_method_handler(
                greeter.stream_then_hang, **ident
            ),
            "Fail": grpc.unary_unary_rpc_method_handler(greeter.fail, **ident),
        },
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0: any free one)")
    p.add_argument("--trailer", action="append", default=[], metavar="KEY=VALUE",
                   help="trailing metadata added to every reply (repeatable)")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--exit-on-stdin-close", action="store_true",
                   help="exit when stdin closes (a test that started it through a pipe is gone)")
    args = p.parse_args()
    trailers = []
    for t in args.trailer:
        k, sep, v = t.partition("=")
        if not sep:
            p.error("--trailer wants KEY=VALUE")
        trailers.append((k.lower(), v))

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers),
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((handler(Greeter(trailers)),))
    port = server.add_insecure_port("127.0.0.1:%d" % args.port)
    if port == 0:
        log("could not bind 127.0.0.1:%d" % args.port)
        sys.exit(1)
    server.start()
    print("READY port=%d pid=%d" % (port, os.getpid()), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Exit by itself after an hour at most, or (--exit-on-stdin-close) when the test that started
    # it is gone and its stdin pipe closes, so a crashed test leaves nothing running.
    def watch_stdin():
        try:
            while sys.stdin.read(4096):
                pass
        except Exception:
            pass
        stop.set()
    if args.exit_on_stdin_close:
        threading.Thread(target=watch_stdin, daemon=True).start()
    stop.wait(3600)
    server.stop(grace=0.5).wait()


if __name__ == "__main__":
    main()
