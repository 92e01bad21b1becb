#!/usr/bin/env python3
"""A real gRPC client (grpcio) for the gateway's gRPC tests, with no protoc and no generated code.

Makes one call to `greeter.py`'s service (or any other method path, e.g. through the gateway) over
cleartext HTTP/2 and prints exactly one JSON line on stdout:

  {"call": ..., "method": "/helloworld.Greeter/SayHello", "code": "OK", "code_value": 0,
   "details": ..., "count": N, "messages": [...], "initial_metadata": {...},
   "trailing_metadata": {...}, "elapsed_ms": ...}

`count` is the number of reply messages received (before an error, if any); `messages` are those
replies as text. Metadata maps each key to its list of values (`-bin` values in hex).
Exits 0 whatever the RPC's status (the JSON says it); non-zero only for bad arguments or a crash.

Calls:  unary (SayHello, --message), metadata (Metadata: the server's view of the request
metadata), server_stream (--count N, --size), client_stream (--count N messages of --size bytes),
bidi (--count N messages, each echoed), slow (Slow, --sleep SECONDS), stream_hang (StreamThenHang,
--count K), fail (Fail, --message CODE[:DETAILS]). --method PATH overrides the method path
(e.g. /other.Service/Call, to see what the gateway answers for it) keeping the call's shape.
--progress writes `recv I` on stderr as each reply message arrives (a test waits on it).
"""

import argparse
import json
import sys
import time

import grpc

SERVICE = "helloworld.Greeter"
CALLS = {
    # name: (method, shape)
    "unary": ("SayHello", "unary_unary"),
    "metadata": ("Metadata", "unary_unary"),
    "server_stream": ("ServerStream", "unary_stream"),
    "client_stream": ("ClientStream", "stream_unary"),
    "bidi": ("Bidi", "stream_stream"),
    "slow": ("Slow", "unary_unary"),
    "stream_hang": ("StreamThenHang", "unary_stream"),
    "fail": ("Fail", "unary_unary"),
}


def md_dict(md):
    out = {}
    for item in md or ():
        k, v = item[0], item[1]
        if isinstance(v, bytes):
            v = v.hex()
        out.setdefault(k, []).append(v)
    return out


def text(b):
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", required=True, help="HOST:PORT, e.g. 127.0.0.1:8000")
    p.add_argument("--call", required=True, choices=sorted(CALLS))
    p.add_argument("--service", default=SERVICE)
    p.add_argument("--method", help="full method path, overriding --service and the call's method")
    p.add_argument("--message", default="world", help="unary request payload")
    p.add_argument("--count", type=int, default=3, help="messages to stream (or K for stream_hang)")
    p.add_argument("--size", type=int, default=0, help="bytes per streamed message (padding)")
    p.add_argument("--sleep", type=float, default=5.0, help="seconds the Slow method sleeps")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="deadline in seconds, sent as grpc-timeout (0: none)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--progress", action="store_true",
                   help="write `recv I` on stderr as each reply arrives")
    args = p.parse_args()

    metadata = []
    for m in args.metadata:
        k, sep, v = m.partition("=")
        if not sep:
            p.error("--metadata wants KEY=VALUE")
        metadata.append((k.lower(), v))

    name, shape = CALLS[args.call]
    method = args.method or "/%s/%s" % (args.service, name)
    timeout = args.timeout if args.timeout > 0 else None

    if args.call == "server_stream":
        request = ("%d:%d" % (args.count, args.size)).encode()
    elif args.call == "stream_hang":
        request = str(args.count).encode()
    elif args.call == "slow":
        request = repr(args.sleep).encode()
    else:
        request = args.message.encode()

    def requests():
        for i in range(args.count):
            m = ("m%d" % i).encode()
            if len(m) < args.size:
                m += b"." * (args.size - len(m))
            yield m

    channel = grpc.insecure_channel(
        args.target,
        options=[
            ("grpc.enable_retries", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ],
    )
    ident = dict(request_serializer=None, response_deserializer=None)
    messages = []
    start = time.monotonic()

    def got(m):
        messages.append(text(m))
        if args.progress:
            print("recv %d" % len(messages), file=sys.stderr, flush=True)

    call = None
    try:
        if shape == "unary_unary":
            resp, call = channel.unary_unary(method, **ident).with_call(
                request, timeout=timeout, metadata=metadata)
            got(resp)
        elif shape == "stream_unary":
            resp, call = channel.stream_unary(method, **ident).with_call(
                requests(), timeout=timeout, metadata=metadata)
            got(resp)
        elif shape == "unary_stream":
            call = channel.unary_stream(method, **ident)(request, timeout=timeout, metadata=metadata)
            for m in call:
                got(m)
        else:
            call = channel.stream_stream(method, **ident)(requests(), timeout=timeout,
                                                          metadata=metadata)
            for m in call:
                got(m)
    except grpc.RpcError as e:
        # An RpcError from a call is that call (with code, details and metadata).
        call = e
    elapsed_ms = int((time.monotonic() - start) * 1000)

    code = call.code()
    try:
        initial = md_dict(call.initial_metadata())
    except Exception:
        initial = {}
    out = {
        "call": args.call,
        "method": method,
        "code": code.name,
        "code_value": code.value[0],
        "details": call.details(),
        "count": len(messages),
        "messages": messages,
        "initial_metadata": initial,
        "trailing_metadata": md_dict(call.trailing_metadata()),
        "elapsed_ms": elapsed_ms,
    }
    channel.close()
    print(json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
