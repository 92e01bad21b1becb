#!/usr/bin/env python3
"""HexGate vs nginx (and haproxy) as reverse proxies in front of the same nginx `return 200` backend.

Interleaved rounds (hexgate, nginx, haproxy, hexgate, ...), wrk on loopback, median req/s, p50, p99,
medians of the round-by-round ratios against the reference,
CPU time per request of each proxy from /proc/PID/stat (all threads and worker processes), and CPU
steal for each run from /proc/stat. Runs with steal above the threshold are reported and dropped.
Bounded: every wrk run has a fixed duration; every process started here is stopped by pid.
"""
import argparse
import hashlib
import http.client
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


def children(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    except FileNotFoundError:
        return []


def steal():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    return vals[7], sum(vals)


def to_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", v)
    if not m:
        raise SystemExit(f"cannot parse wrk latency {v!r}")
    n, unit = float(m.group(1)), m.group(2)
    return n * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}[unit]


def run_wrk(port, conns, seconds, threads, path="/users/1", extra=()):
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", *extra, f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
    p99 = to_ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50": p50, "p99": p99, "requests": total,
            "non2xx": int(errors.group(1)) if errors else 0, "sockerr": sock_err.group(1) if sock_err else ""}


class Proc:
    def __init__(self, cmd, log, cpus=None):
        if cpus:
            cmd = ["taskset", "-c", cpus] + cmd
        self.p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self):
        return [self.p.pid] + children(self.p.pid)

    def stop(self):
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def hexgate_yaml(port, admin, backend_port, extra="", route_extra=""):
    return f"""gatewayPort: "{port}"
gatewayBind: 127.0.0.1
adminPort: "{admin}"
healthCheckInterval: 5
{extra}services:
  - name: bench
    path: /
    backends: ["http://127.0.0.1:{backend_port}"]
{route_extra}"""


def main():
    ap = argparse.ArgumentParser(prog="bench/run.sh", description="HexGate benchmarks (docs/benchmarks.md).")
    ap.add_argument("mode", nargs="?", default="plain", choices=["plain", "full", "apikey", "policies", "scale", "memory", "h2", "tls",
                                                           "profile", "grpc", "upstream-tls", "accesslog", "tracing"],
                    help="plain: HexGate vs nginx vs haproxy; full: HexGate plain vs JWT vs Redis limits vs both "
                         "vs API key + plan limits through Redis; "
                         "apikey: only plain, JWT + Redis limits and API key + plan limits through Redis (and nginx); "
                         "policies: plain vs CORS, two header rules and a rewrite on the route (Origin sent to both); "
                         "scale: 1 vs 1,000 routes and backends; memory: idle RSS and 10,000 idle connections; "
                         "h2: h2load over h2c; tls: HTTPS at the proxy; "
                         "profile: instructions per request under callgrind, HexGate and nginx; "
                         "grpc: gRPC unary over h2c, HexGate (h2c:// backend) vs nginx grpc_pass; "
                         "upstream-tls: HexGate vs nginx proxy_ssl to an HTTPS keep-alive backend; "
                         "accesslog: no access log vs the text line vs JSON lines, both to a file (and nginx); "
                         "tracing: no tracing vs OTLP/HTTP export at sampleRatio 1.0 and 0.01 to an nginx "
                         "`return 200` sink (its CPU counted apart), and nginx")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--conns", default="64,256")
    ap.add_argument("--workers", type=int, default=2, help="proxy worker threads/processes")
    ap.add_argument("--max-steal", type=float, default=15.0)
    ap.add_argument("--hexgate", default=os.path.join(ROOT, "target", "release", "hexgate"))
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--limits", action="store_true",
                    help="profile: HexGate with a rate limit and a quota through a local redis-server")
    ap.add_argument("--grpc-backend", default=os.path.join(ROOT, "target", "release", "examples", "grpc_backend"),
                    help="grpc: the backend binary (examples/grpc_backend.rs)")
    ap.add_argument("--streams", type=int, default=10, help="grpc: concurrent streams per h2load connection")
    ap.add_argument("--keepalive", type=int, default=512,
                    help="grpc, upstream-tls: nginx's upstream keepalive (idle connections kept per worker)")
    ap.add_argument("--no-plain-ref", action="store_true",
                    help="upstream-tls: skip the two proxies in front of the backend's plain HTTP listener")
    ap.add_argument("--no-direct", action="store_true", help="grpc: skip the run straight to the backend")
    ap.add_argument("--max-other", type=float, default=10.0,
                    help="grpc, upstream-tls: drop runs where CPU outside the proxy, backend and load generator "
                         "exceeds this %% of the machine (another build or test running)")
    ap.add_argument("--otlp-endpoint", default=None,
                    help="tracing: export to this OTLP endpoint (a real collector; its CPU is not measured) "
                         "instead of the nginx sink the bench starts")
    ap.add_argument("--no-nginx", action="store_true",
                    help="accesslog, tracing: skip nginx (the reference proxy) to shorten each round")
    ap.add_argument("--no-hexgate", action="store_true",
                    help="grpc, upstream-tls: nginx (and the backend) only, e.g. to try the harness")
    args = ap.parse_args()
    if args.mode in ("grpc", "upstream-tls"):
        import bench_upstream
        return bench_upstream.main(args, sys.modules[__name__])
    if args.mode in ("scale", "memory", "h2", "tls", "profile"):
        import bench_more
        return bench_more.main(args, sys.modules[__name__])

    features = args.mode in ("full", "apikey")
    for tool in ["wrk", "nginx"] + (["redis-server", "redis-cli"] if features else []):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not installed: run `make setup` (scripts/setup.sh)")
    use_haproxy = args.mode == "plain" and not args.no_haproxy and shutil.which("haproxy")
    if not os.path.exists(args.hexgate):
        raise SystemExit(f"{args.hexgate} missing: run `cargo build --release`")

    tmp = tempfile.mkdtemp(prefix="hexgate-bench-")
    log = open(os.path.join(tmp, "bench.log"), "w")
    backend_port, nginx_port, haproxy_port = (free_port() for _ in range(3))
    procs = []
    redis = None
    sink = None  # tracing: the OTLP sink (an nginx answering every POST with an empty 200)
    try:
        with open(os.path.join(tmp, "backend.conf"), "w") as f:
            f.write(f"""worker_processes 1; daemon off; pid {tmp}/backend.pid; error_log {tmp}/backend.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{backend_port} reuseport; location / {{ return 200 "ok"; }} }} }}
""")
        procs.append(Proc(["nginx", "-c", f"{tmp}/backend.conf", "-p", tmp], log))
        wait_port(backend_port)
        if args.mode == "tracing" and not args.otlp_endpoint:
            # A cheap OTLP/HTTP sink in its own process (so its CPU is counted apart from the
            # gateway's and the backend's): `return 200` reads and discards each export's body, and
            # an empty body is a valid empty ExportTraceServiceResponse. stub_status counts the POSTs.
            sink_port = free_port()
            with open(os.path.join(tmp, "sink.conf"), "w") as f:
                f.write(f"""worker_processes 1; daemon off; pid {tmp}/sink.pid; error_log {tmp}/sink.err;
events {{ worker_connections 1024; }}
http {{ access_log off; keepalive_requests 1000000; client_max_body_size 0; client_body_buffer_size 1m;
  server {{ listen 127.0.0.1:{sink_port};
    location = /sink_status {{ stub_status; }}
    location / {{ default_type application/x-protobuf; return 200; }} }} }}
""")
            sink = Proc(["nginx", "-c", f"{tmp}/sink.conf", "-p", tmp], log)
            procs.append(sink)
            wait_port(sink_port)
            sink_requests.port = sink_port
        # targets: name -> (proc, port, wrk extra args)
        targets = {}
        admins = {}
        hg_variants = {"hexgate": ("", "")}
        headers = {}
        if args.mode == "policies":
            # The bar: CORS (one origin), two header rules (a request `set` with a
            # variable, a response `remove`) and a rewrite, within 10 % of plain's CPU per request.
            hg_variants["hg+policies"] = ("", POLICIES_ROUTE)
            origin = ["-H", f"Origin: {POLICIES_ORIGIN}"]
            headers = {"hexgate": origin, "hg+policies": origin}
        if args.mode == "accesslog":
            # The bar: the JSON access log to a file within 5 % of plain's CPU per request.
            for fmt in ("text", "json"):
                hg_variants[f"hg+{fmt}log"] = (
                    f'accessLog: {{enabled: true, format: {fmt}, path: "{tmp}/{fmt}-access.log"}}\n', "")
        if args.mode == "tracing":
            # Every request is a new trace (wrk sends no traceparent): the parent-based sampler
            # falls back to the ratio, so 1.0 exports a span tree per request and 0.01 one in 100.
            endpoint = args.otlp_endpoint or f"http://127.0.0.1:{sink_requests.port}"
            for ratio in TRACING_RATIOS:
                hg_variants[f"hg+trace@{ratio}"] = (tracing_yaml(endpoint, ratio), "")
        if features:
            subprocess.run([args.hexgate, "keygen", "--out", f"{tmp}/keys"], check=True, capture_output=True)
            token = subprocess.run([args.hexgate, "token", "--key", f"{tmp}/keys/private.pem", "--sub", "bench",
                                    "--ttl", "24h"], check=True, capture_output=True, text=True).stdout.strip()
            redis_port = free_port()
            redis = Proc(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], log)
            procs.append(redis)
            wait_port(redis_port)
            auth = f'authentication: {{enabled: true, publicKeyPath: "{tmp}/keys/public.pem"}}\n'
            redis_cfg = f'redis: {{address: "127.0.0.1:{redis_port}", timeout: 1s}}\n'
            limits = ("    rateLimiting: {enabled: true, ratePerSecond: 1000000000, burst: 1000000000, key: \"header:x-api-key\"}\n"
                      "    quota: {enabled: true, limit: 4000000000, period: 1h, key: \"header:x-api-key\"}\n")
            limits_consumer = limits.replace("header:x-api-key", "consumer")
            # API key (one key in the watched key file, a key shaped like `hexgate apikey new`'s) and
            # the key's plan: a rate limit and a quota per consumer through Redis, as hg+jwt+redis's two.
            api_key = "hgk_" + secrets.token_urlsafe(32)
            with open(os.path.join(tmp, "apikeys.yaml"), "w") as f:
                f.write(f'- id: bench-1\n  consumer: bench\n  plan: bench\n'
                        f'  hash: "sha256:{hashlib.sha256(api_key.encode()).hexdigest()}"\n')
            apikey_cfg = ("apiKeys: {file: ./apikeys.yaml}\n"
                          "plans:\n"
                          "  bench: {rateLimiting: {ratePerSecond: 1000000000, burst: 1000000000}, "
                          "quota: {limit: 4000000000, period: 24h}}\n"
                          + auth.replace("}\n", ", defaultPlan: bench}\n") + redis_cfg)
            apikey_route = "    authentication: {enabled: true, methods: [apiKey]}\n"
            hg_variants = {
                "hexgate": ("", ""),
                "hg+jwt": (auth, ""),
                "hg+redis": (redis_cfg, limits),
                "hg+jwt+redis": (auth + redis_cfg, limits_consumer),
                "hg+apikey+plans+redis": (apikey_cfg, apikey_route),
            }
            if args.mode == "apikey":
                hg_variants = {k: v for k, v in hg_variants.items()
                               if k in ("hexgate", "hg+jwt+redis", "hg+apikey+plans+redis")}
            headers = {"hg+jwt": ["-H", f"Authorization: Bearer {token}"],
                       "hg+redis": ["-H", "X-Api-Key: bench"],
                       "hg+jwt+redis": ["-H", f"Authorization: Bearer {token}"],
                       "hg+apikey+plans+redis": ["-H", f"X-Api-Key: {api_key}"]}
        for name, (extra, route_extra) in hg_variants.items():
            port, admin = free_port(), free_port()
            cfg = os.path.join(tmp, f"{name}.yaml")
            with open(cfg, "w") as f:
                f.write(hexgate_yaml(port, admin, backend_port, extra, route_extra))
            targets[name] = (Proc([args.hexgate, "run", "--config", cfg], log), port, headers.get(name, []))
            procs.append(targets[name][0])  # stopped by the finally below even if a later start fails
            admins[name] = admin
            wait_started(name, targets[name][0], port, log)
            check_200(name, port, headers.get(name, []))
            if name == "hg+policies":
                check_policies(port)
        with open(os.path.join(tmp, "proxy.conf"), "w") as f:
            f.write(f"""worker_processes {args.workers}; daemon off; pid {tmp}/proxy.pid; error_log {tmp}/proxy.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream be {{ server 127.0.0.1:{backend_port}; keepalive 512; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{nginx_port} reuseport;
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }} }}
""")
        # policies: HexGate against itself only; accesslog and tracing: nginx as a reference unless --no-nginx.
        if args.mode != "policies" and not (args.mode in ("accesslog", "tracing") and args.no_nginx):
            targets["nginx"] = (Proc(["nginx", "-c", f"{tmp}/proxy.conf", "-p", tmp], log), nginx_port, [])
            procs.append(targets["nginx"][0])
            wait_port(nginx_port)
        if use_haproxy:
            with open(os.path.join(tmp, "haproxy.cfg"), "w") as f:
                f.write(f"""global
  nbthread {args.workers}
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
  option forwardfor
frontend fe
  bind 127.0.0.1:{haproxy_port}
  default_backend be
backend be
  server s1 127.0.0.1:{backend_port}
""")
            targets["haproxy"] = (Proc(["haproxy", "-f", f"{tmp}/haproxy.cfg"], log), haproxy_port, [])
            procs.append(targets["haproxy"][0])
            wait_port(haproxy_port)
        time.sleep(0.5)
        reference = "nginx" if args.mode == "plain" else "hexgate"
        compares = [("hg+apikey+plans+redis", "hg+jwt+redis")]  # the API-key bar: own CPU ≤ JWT + limits
        if args.mode == "policies":
            compares = [("hg+policies", "hexgate")]  # the policies bar: CPU per request within 10 %
        if args.mode == "accesslog":
            compares = [("hg+jsonlog", "hexgate")]  # the access-log bar: CPU per request within 5 %
        if args.mode == "tracing":
            compares = [(f"hg+trace@{ratio}", "hexgate") for ratio in TRACING_RATIOS]
        sent = {name: 0 for name in targets}  # requests each target answered (warm-ups included)
        sink_posts = {name: 0 for name in targets}  # OTLP exports the sink received during its runs

        results = {}
        redis_stats = {}
        for conns in [int(c) for c in args.conns.split(",")]:
            for name, (proc, port, hdrs) in targets.items():
                sent[name] += run_wrk(port, conns, 2, 1, extra=hdrs)["requests"]  # warm-up
            for r in range(args.rounds):
                for name, (proc, port, hdrs) in targets.items():
                    s0, t0 = steal()
                    c0 = cpu_ticks(proc.pids())
                    rc0 = cpu_ticks(redis.pids()) if redis else 0
                    e0 = evalsha_calls(redis_port) if redis else 0
                    sc0 = cpu_ticks(sink.pids()) if sink else 0
                    sp0 = sink_requests() if sink else 0
                    res = run_wrk(port, conns, args.seconds, 1, extra=hdrs)
                    c1 = cpu_ticks(proc.pids())
                    rc1 = cpu_ticks(redis.pids()) if redis else 0
                    e1 = evalsha_calls(redis_port) if redis else 0
                    sc1 = cpu_ticks(sink.pids()) if sink else 0
                    sp1 = sink_requests() - 1 if sink else 0  # less the status request itself
                    sent[name] += res["requests"]
                    sink_posts[name] += max(0, sp1 - sp0)
                    res["sink_cpu_us"] = (sc1 - sc0) / CLK_TCK * 1e6 / max(1, res["requests"])
                    s1, t1 = steal()
                    res["steal"] = 100.0 * (s1 - s0) / max(1, t1 - t0)
                    res["cpu_us"] = (c1 - c0) / CLK_TCK * 1e6 / max(1, res["requests"])
                    res["redis_cpu_us"] = (rc1 - rc0) / CLK_TCK * 1e6 / max(1, res["requests"])
                    res["evalsha_per_req"] = (e1 - e0) / max(1, res["requests"])
                    results.setdefault((conns, name), []).append(res)
                    extra_txt = ""
                    if redis and "redis" in name:
                        extra_txt = f"  redis cpu/req {res['redis_cpu_us']:5.1f}us  evalsha/req {res['evalsha_per_req']:.2f}"
                    if sink and name.startswith("hg+trace"):
                        extra_txt = f"  sink cpu/req {res['sink_cpu_us']:5.2f}us"
                    print(f"c={conns} round={r + 1} {name:21s} {res['rps']:9.0f} req/s  p50 {res['p50']:6.2f}ms  "
                          f"p99 {res['p99']:6.2f}ms  cpu/req {res['cpu_us']:5.1f}us  steal {res['steal']:4.1f}%" + extra_txt
                          + (f"  non2xx {res['non2xx']}" if res["non2xx"] else "")
                          + (f"  sockerr {res['sockerr']}" if res["sockerr"] else ""), flush=True)

        print()
        print(f"| conns | proxy | req/s | p50 ms | p99 ms | CPU µs/req | Redis CPU µs/req | EVALSHA/req | runs kept | req/s vs {reference} | CPU vs {reference} |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for conns in [int(c) for c in args.conns.split(",")]:
            med = {}
            for name in targets:
                runs = results[(conns, name)]
                kept = [x for x in runs if x["steal"] <= args.max_steal] or runs
                med[name] = {k: statistics.median(x[k] for x in kept)
                             for k in ["rps", "p50", "p99", "cpu_us", "redis_cpu_us", "evalsha_per_req"]}
                med[name]["kept"] = f"{len([x for x in runs if x['steal'] <= args.max_steal])}/{len(runs)}"
            for name in targets:
                m = med[name]
                ratio, cpu_ratio = pairwise(results[(conns, name)], results[(conns, reference)], args.max_steal)
                rcpu = f"{m['redis_cpu_us']:.1f}" if "redis" in name else "-"
                ev = f"{m['evalsha_per_req']:.2f}" if "redis" in name else "-"
                print(f"| {conns} | {name} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | {m['cpu_us']:.1f} | "
                      f"{rcpu} | {ev} | {m['kept']} | {ratio:.2f} | {cpu_ratio:.2f} |")
        for compare in compares:
            if not all(n in targets for n in compare):
                continue
            print()
            print(f"{compare[0]} ÷ {compare[1]} (medians of the round-by-round ratios, same run):")
            if args.mode == "tracing":
                # The sink's CPU has no counterpart on the plain route: shown per request, not as a ratio.
                print("| conns | req/s | own CPU µs/req | sink CPU µs/req (not in own) |")
            else:
                print("| conns | req/s | own CPU µs/req | Redis CPU µs/req |")
            print("|---|---|---|---|")
            for conns in [int(c) for c in args.conns.split(",")]:
                rps_r, cpu_r, rcpu_r = pairwise(results[(conns, compare[0])], results[(conns, compare[1])],
                                                args.max_steal, keys=("rps", "cpu_us", "redis_cpu_us"))
                rcpu_txt = "-" if rcpu_r != rcpu_r else f"{rcpu_r:.2f}"  # nan: no Redis in either
                if args.mode == "tracing":
                    runs = results[(conns, compare[0])]
                    kept = [x for x in runs if x["steal"] <= args.max_steal] or runs
                    rcpu_txt = f"{statistics.median(x['sink_cpu_us'] for x in kept):.2f}" if sink else "-"
                print(f"| {conns} | {rps_r:.2f} | {cpu_r:.2f} | {rcpu_txt} |")
            if args.mode == "policies":
                print("bar: own CPU µs/req ratio at most 1.10")
            if args.mode == "accesslog":
                print("bar: own CPU µs/req ratio at most 1.05")
        if args.mode == "accesslog":
            print()
            print("| proxy | lines written | bytes | lines dropped |")
            print("|---|---|---|---|")
            for fmt in ("text", "json"):
                name, path = f"hg+{fmt}log", os.path.join(tmp, f"{fmt}-access.log")
                lines = size = 0
                if os.path.exists(path):
                    size = os.path.getsize(path)
                    with open(path, "rb") as f:
                        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
                    os.remove(path)  # large; nothing else reads it
                print(f"| {name} | {lines} | {size} | {access_log_dropped(admins[name])} |")
        if args.mode == "tracing":
            print()
            print("Spans (the gateway's counters at the end; requests include warm-ups; "
                  "sink POSTs counted during the variant's measured runs):")
            print("| proxy | sampleRatio | requests | spans exported | spans dropped | exported per request | sink POSTs |")
            print("|---|---|---|---|---|---|---|")
            for ratio in TRACING_RATIOS:
                name = f"hg+trace@{ratio}"
                exported = admin_metric(admins[name], "hexgate_tracing_exported_spans_total")
                dropped = admin_metric(admins[name], "hexgate_tracing_dropped_spans_total")
                per = f"{exported / max(1, sent[name]):.3f}" if isinstance(exported, int) else "?"
                posts = sink_posts[name] if sink else "-"
                print(f"| {name} | {ratio} | {sent[name]} | {exported} | {dropped} | {per} | {posts} |")
    finally:
        for p in reversed(procs):
            p.stop()
        log.close()


def pairwise(runs, ref_runs, max_steal, keys=("rps", "cpu_us")):
    """Medians of the round-by-round ratios runs[i] / ref_runs[i], over rounds where neither run
    saw more steal than max_steal (all rounds if none qualify)."""
    pairs = [(a, b) for a, b in zip(runs, ref_runs) if a["steal"] <= max_steal and b["steal"] <= max_steal]
    pairs = pairs or list(zip(runs, ref_runs))
    return tuple(statistics.median(a[k] / b[k] for a, b in pairs if b[k]) if any(b[k] for _, b in pairs)
                 else float("nan") for k in keys)


POLICIES_ORIGIN = "https://app.example.com"
POLICIES_ROUTE = (f'    cors: {{allowOrigins: ["{POLICIES_ORIGIN}"]}}\n'
                  '    requestHeaders: {set: {X-Request-Tag: "${request_id}"}}\n'
                  '    responseHeaders: {remove: [Server]}\n'
                  '    rewrite: {regex: "^/users/(.*)$", replacement: "/v2/users/$1"}\n')


def check_policies(port):
    """The policies variant really applies them: the origin allowed, the backend's Server removed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/users/1", headers={"Origin": POLICIES_ORIGIN})
        resp = conn.getresponse()
        resp.read()
        acao, server = resp.getheader("access-control-allow-origin"), resp.getheader("server")
    finally:
        conn.close()
    if acao != POLICIES_ORIGIN or server is not None:
        raise SystemExit(f"hg+policies: the policies are not applied (Access-Control-Allow-Origin {acao!r}, "
                         f"Server {server!r})")


def check_200(name, port, hdrs):
    """One request with the variant's headers before any measuring: anything but 200 (a refused
    key, token or limit, a config the gateway took differently) stops the run."""
    headers = dict(v.split(": ", 1) for v in hdrs[1::2])
    deadline = time.time() + 10
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/users/1", headers=headers)
            resp = conn.getresponse()
            status, body = resp.status, resp.read()[:200]
        finally:
            conn.close()
        # 502/503 only while the first health check of the backend is pending.
        if status == 200 or status not in (502, 503) or time.time() > deadline:
            break
        time.sleep(0.1)
    if status != 200:
        raise SystemExit(f"{name}: sample request answered {status} {body!r}, not 200")


def access_log_dropped(admin_port):
    """hexgate_access_log_dropped_total from the admin listener."""
    return admin_metric(admin_port, "hexgate_access_log_dropped_total")


def admin_metric(admin_port, metric):
    """The sum of a counter's series (with or without labels) from the admin listener's /metrics;
    "?" when it is not there."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = re.findall(rf"^{re.escape(metric)}(?:{{[^}}]*}})? (\d+(?:\.\d+)?(?:e\+?\d+)?)$", text, re.M)
    return int(sum(float(v) for v in values)) if values else "?"


TRACING_RATIOS = ("1.0", "0.01")


def tracing_yaml(endpoint, ratio):
    """The gateway's tracing block: OTLP over HTTP (protobuf; /v1/traces appended to a URL
    without a path), parent-based sampling at the ratio."""
    return (f"tracing:\n"
            f'  otlpEndpoint: "{endpoint}"\n'
            f"  serviceName: hexgate-bench\n"
            f"  sampleRatio: {ratio}\n")


def sink_requests():
    """Requests the OTLP sink (nginx) has served, from its stub_status (this request included)."""
    conn = http.client.HTTPConnection("127.0.0.1", sink_requests.port, timeout=5)
    try:
        conn.request("GET", "/sink_status")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return int(re.search(r"^\s*\d+\s+\d+\s+(\d+)\s*$", text, re.M).group(1))


sink_requests.port = None


def wait_started(name, proc, port, log, timeout=10):
    """wait_port, but a gateway that exits (a config it refuses) stops the run with its own words."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.p.poll() is not None:
            log.flush()
            with open(log.name) as f:
                tail = f.read()[-2000:]
            raise SystemExit(f"{name} exited ({proc.p.returncode}) before listening; the log ends:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{name}: port {port} never opened")


def evalsha_calls(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"], capture_output=True, text=True).stdout
    m = re.search(r"cmdstat_evalsha:calls=(\d+)", out)
    return int(m.group(1)) if m else 0


if __name__ == "__main__":
    main()
