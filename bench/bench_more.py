"""bench/run.sh scale|memory|h2|tls|profile: the cost of growing configs, memory, HTTP/2, TLS, and
instruction counts per request.

Same method as bench.py (which imports this): interleaved rounds, CPU from /proc, steal recorded,
medians of round-by-round ratios, every process stopped by pid, every load run bounded.
"""
import os
import resource
import socket
import statistics
import subprocess
import tempfile
import time
import re
import shutil


def backend_conf(tmp, ports):
    listens = "\n".join(f"    listen 127.0.0.1:{p};" for p in ports)
    return f"""worker_processes 1; daemon off; pid {tmp}/backend.pid; error_log {tmp}/backend.err;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{
{listens}
    location / {{ return 200 "ok"; }} }} }}
"""


def nginx_proxy_conf(tmp, name, workers, port, backends, listen_extra="", ssl=""):
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in backends)
    return f"""worker_processes {workers}; daemon off; pid {tmp}/{name}.pid; error_log {tmp}/{name}.err;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream be {{
{servers}
    keepalive 512; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{port} reuseport {listen_extra}; {ssl}
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }} }}
"""


def hexgate_conf(port, admin, services, extra=""):
    out = [f'gatewayPort: "{port}"', "gatewayBind: 127.0.0.1", f'adminPort: "{admin}"',
           "healthCheckInterval: 5", "maxConnections: 30000"]
    if extra:
        out.append(extra.rstrip("\n"))
    out.append("services:")
    for name, path, backends in services:
        out.append(f"  - name: {name}\n    path: {path}\n    backends:")
        out.extend(f'      - "http://127.0.0.1:{p}"' for p in backends)
    return "\n".join(out) + "\n"


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
            total += int(m.group(1)) if m else 0
        except FileNotFoundError:
            pass
    return total


def fd_count(pids):
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except (FileNotFoundError, PermissionError):
            pass
    return n


def run_h2load(url, conns, seconds, streams=10):
    cmd = ["h2load", "-c", str(conns), "-m", str(streams), "-t", "1", "-D", str(seconds), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     out)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if not (m and done and lat):
        raise SystemExit(f"cannot parse h2load output:\n{out}")

    def ms(v):
        n, unit = re.match(r"([\d.]+)(us|ms|s)$", v).groups()
        return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return {"rps": float(m.group(1)), "requests": int(done.group(3)), "failed": int(done.group(4)) + int(done.group(5)),
            "p50": ms(lat.group(3)), "p99": ms(lat.group(2))}


def interleave(b, args, targets, conns_list, runner, reference, group_of=None):
    """targets: name -> (proc, port, extra). Runs rounds A B A B ..., prints per run and a table;
    ratios are medians of round-by-round ratios against reference (or group_of(name))."""
    results = {}
    for conns in conns_list:
        for name, (proc, port, extra) in targets.items():
            runner(port, conns, 2, extra)  # warm-up
        for r in range(args.rounds):
            for name, (proc, port, extra) in targets.items():
                s0, t0 = b.steal()
                c0 = b.cpu_ticks(proc.pids())
                res = runner(port, conns, args.seconds, extra)
                c1 = b.cpu_ticks(proc.pids())
                s1, t1 = b.steal()
                res["steal"] = 100.0 * (s1 - s0) / max(1, t1 - t0)
                res["cpu_us"] = (c1 - c0) / b.CLK_TCK * 1e6 / max(1, res["requests"])
                results.setdefault((conns, name), []).append(res)
                bad = res.get("non2xx", 0) + res.get("failed", 0)
                print(f"c={conns} round={r + 1} {name:18s} {res['rps']:9.0f} req/s  p50 {res['p50']:6.2f}ms  "
                      f"p99 {res['p99']:6.2f}ms  cpu/req {res['cpu_us']:5.1f}us  steal {res['steal']:4.1f}%"
                      + (f"  failed {bad}" if bad else ""), flush=True)
    print()
    print("| conns | proxy | req/s | p50 ms | p99 ms | CPU µs/req | runs kept | req/s ratio | CPU ratio | vs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for conns in conns_list:
        for name in targets:
            runs = results[(conns, name)]
            kept = [x for x in runs if x["steal"] <= args.max_steal] or runs
            med = {k: statistics.median(x[k] for x in kept) for k in ["rps", "p50", "p99", "cpu_us"]}
            ref = group_of(name) if group_of else reference
            ratio, cpu_ratio = b.pairwise(runs, results[(conns, ref)], args.max_steal)
            print(f"| {conns} | {name} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} | "
                  f"{med['cpu_us']:.1f} | {len([x for x in runs if x['steal'] <= args.max_steal])}/{len(runs)} | "
                  f"{ratio:.2f} | {cpu_ratio:.2f} | {ref} |")
    return results


def free_ports(b, n):
    ports = set()
    while len(ports) < n:
        ports.add(b.free_port())
    return sorted(ports)


def main(args, b):
    for tool in (["wrk", "nginx"] + (["h2load"] if args.mode == "h2" else []) + (["openssl"] if args.mode == "tls" else [])
                 + (["valgrind", "callgrind_control", "callgrind_annotate"] if args.mode == "profile" else [])):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not installed: run `make setup` (scripts/setup.sh)")
    if not os.path.exists(args.hexgate):
        raise SystemExit(f"{args.hexgate} missing: run `cargo build --release`")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    tmp = tempfile.mkdtemp(prefix=f"hexgate-bench-{args.mode}-")
    log = open(os.path.join(tmp, "bench.log"), "w")
    procs = []

    def start(name, cmd, port):
        p = b.Proc(cmd, log)
        procs.append(p)
        b.wait_port(port)
        return p

    def start_hexgate(name, yaml_text, port):
        cfg = os.path.join(tmp, f"{name}.yaml")
        with open(cfg, "w") as f:
            f.write(yaml_text)
        return start(name, [args.hexgate, "run", "--config", cfg], port)

    def start_nginx(name, conf, port):
        path = os.path.join(tmp, f"{name}.conf")
        with open(path, "w") as f:
            f.write(conf)
        return start(name, ["nginx", "-c", path, "-p", tmp], port)

    try:
        n_backends = 1000 if args.mode == "scale" else 1
        bports = free_ports(b, n_backends)
        start_nginx("backend", backend_conf(tmp, bports), bports[0])
        one = bports[:1]
        conns = [int(c) for c in args.conns.split(",")]

        if args.mode == "scale":
            routes = [(f"r{i}", f"/api/v{i % 10}/svc{i}", one) for i in range(1000)]
            targets = {}
            for name, services in [("hg-1route", [("bench", "/", one)]),
                                   ("hg-1000routes", routes),
                                   ("hg-1000backends", [("bench", "/", bports)])]:
                port, admin = b.free_port(), b.free_port()
                targets[name] = (start_hexgate(name, hexgate_conf(port, admin, services), port), port, [])
            for name, backends in [("nginx-1backend", one), ("nginx-1000backends", bports)]:
                port = b.free_port()
                targets[name] = (start_nginx(name, nginx_proxy_conf(tmp, name, args.workers, port, backends), port),
                                 port, [])
            time.sleep(1)
            path = "/api/v7/svc997/x"

            def run(port, c, seconds, extra):
                return b.run_wrk(port, c, seconds, 1, path=path, extra=extra)
            interleave(b, args, targets, conns, run, "hg-1route",
                       group_of=lambda n: "hg-1route" if n.startswith("hg") else "nginx-1backend")
        elif args.mode == "h2":
            targets = {}
            port, admin = b.free_port(), b.free_port()
            targets["hexgate"] = (start_hexgate("hexgate", hexgate_conf(port, admin, [("bench", "/", one)]), port),
                                  port, [])
            port = b.free_port()
            targets["nginx"] = (start_nginx("nginx", nginx_proxy_conf(tmp, "nginx", args.workers, port, one,
                                                                      listen_extra="http2"), port), port, [])
            time.sleep(0.5)

            def run(port, c, seconds, extra):
                return run_h2load(f"http://127.0.0.1:{port}/users/1", c, seconds)
            interleave(b, args, targets, conns, run, "nginx")
        elif args.mode == "tls":
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                            "/CN=localhost", "-keyout", f"{tmp}/key.pem", "-out", f"{tmp}/cert.pem"],
                           check=True, capture_output=True)
            targets = {}
            port, https, admin = b.free_port(), b.free_port(), b.free_port()
            tls = (f'tls: {{enabled: true, httpsPort: "{https}", certFile: "{tmp}/cert.pem", '
                   f'keyFile: "{tmp}/key.pem"}}')
            targets["hexgate"] = (start_hexgate("hexgate", hexgate_conf(port, admin, [("bench", "/", one)], tls),
                                                https), https, [])
            port = b.free_port()
            ssl = (f"ssl_certificate {tmp}/cert.pem; ssl_certificate_key {tmp}/key.pem; "
                   "ssl_protocols TLSv1.2 TLSv1.3;")
            targets["nginx"] = (start_nginx("nginx", nginx_proxy_conf(tmp, "nginx", args.workers, port, one,
                                                                      listen_extra="ssl", ssl=ssl), port), port, [])
            time.sleep(0.5)

            def run(port, c, seconds, extra):
                return run_wrk_url(b, f"https://127.0.0.1:{port}/users/1", c, seconds)
            interleave(b, args, targets, conns, run, "nginx")
        elif args.mode == "memory":
            memory(b, args, tmp, one, start_hexgate, start_nginx)
        elif args.mode == "profile":
            profile(b, args, tmp, log, one, procs)
    finally:
        for p in reversed(procs):
            p.stop()
        log.close()


def run_wrk_url(b, url, conns, seconds):
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = b.to_ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
    p99 = b.to_ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": p50, "p99": p99, "requests": total, "non2xx": int(errors.group(1)) if errors else 0}


def open_idle(port, n):
    """n keep-alive connections, each having completed one request, left open."""
    socks = []
    req = b"GET /users/1 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(req)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"ok"):
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("connection closed during the memory test")
            data += chunk
        socks.append(s)
    return socks


def memory(b, args, tmp, one, start_hexgate, start_nginx):
    n = 10000
    rows = []
    port, admin = b.free_port(), b.free_port()
    hg = start_hexgate("hexgate", hexgate_conf(port, admin, [("bench", "/", one)]), port)
    nport = b.free_port()
    ng = start_nginx("nginx", nginx_proxy_conf(tmp, "nginx", args.workers, nport, one), nport)
    time.sleep(1)
    for name, proc, p in [("hexgate", hg, port), ("nginx", ng, nport)]:
        idle = rss_kib(proc.pids())
        b.run_wrk(p, 64, 3, 1)
        warm = rss_kib(proc.pids())
        t = time.time()
        socks = open_idle(p, n)
        opened = time.time() - t
        time.sleep(1)
        held = rss_kib(proc.pids())
        fds = fd_count(proc.pids())
        for s in socks:
            s.close()
        time.sleep(2)
        # The allocator returns freed pages to the OS as threads allocate again: measure after
        # a little more traffic, as a live instance would see.
        b.run_wrk(p, 64, 2, 1)
        time.sleep(1)
        after = rss_kib(proc.pids())
        rows.append((name, idle, warm, held, held - warm, fds, after, opened))
        print(f"{name}: idle {idle} KiB, after load {warm} KiB, with {n} idle keep-alive connections {held} KiB "
              f"(+{held - warm} KiB, {fds} fds), after they closed and 2 s more load {after} KiB; opened in {opened:.1f}s", flush=True)
    print()
    print(f"| proxy | idle RSS MiB | after 3 s of load MiB | with {n} idle conns MiB | extra MiB | "
          f"extra KiB per conn | after close + 2 s load MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, idle, warm, held, extra, fds, after, _ in rows:
        print(f"| {name} | {idle / 1024:.1f} | {warm / 1024:.1f} | {held / 1024:.1f} | {extra / 1024:.1f} | "
              f"{extra / n:.2f} | {after / 1024:.1f} |")


def profile(b, args, tmp, log, one, procs):
    """Each proxy (HexGate, and nginx as one process) under callgrind: counters zeroed after a
    warm-up, then wrk with 4 keep-alive connections for --seconds; instructions per request are the
    user-space instructions counted in that window over the requests wrk completed."""
    rows = []
    port, admin = b.free_port(), b.free_port()
    cfg = os.path.join(tmp, "hexgate.yaml")
    text = hexgate_conf(port, admin, [("bench", "/", one)])
    wrk_extra = []
    if args.limits:
        if not shutil.which("redis-server"):
            raise SystemExit("redis-server not installed: run `make setup` (scripts/setup.sh)")
        redis_port = b.free_port()
        procs.append(b.Proc(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], log))
        b.wait_port(redis_port)
        text = text.replace("services:", f'redis: {{address: "127.0.0.1:{redis_port}", timeout: 1s}}\nservices:')
        text += ('    rateLimiting: {enabled: true, ratePerSecond: 1000000000, burst: 1000000000, key: "header:x-api-key"}\n'
                 '    quota: {enabled: true, limit: 4000000000, period: 1h, key: "header:x-api-key"}\n')
        wrk_extra = ["-H", "X-Api-Key: bench"]
    with open(cfg, "w") as f:
        f.write(text)
    nport = b.free_port()
    nconf = os.path.join(tmp, "nginx.conf")
    with open(nconf, "w") as f:
        f.write(nginx_proxy_conf(tmp, "nginx", 1, nport, one).replace("daemon off;", "daemon off; master_process off;"))
    for name, cmd, p in [("hexgate", [args.hexgate, "run", "--config", cfg], port),
                         ("nginx", ["nginx", "-c", nconf, "-p", tmp], nport)]:
        out = os.path.join(tmp, f"callgrind.{name}")
        proc = b.Proc(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"] + cmd, log)
        procs.append(proc)
        b.wait_port(p, timeout=60)
        extra = wrk_extra if name == "hexgate" else []
        b.run_wrk(p, 4, 3, 1, extra=extra)
        subprocess.run(["callgrind_control", "-z", str(proc.p.pid)], check=True, capture_output=True)
        res = b.run_wrk(p, 4, args.seconds, 1, extra=extra)
        subprocess.run(["callgrind_control", "-d", str(proc.p.pid)], check=True, capture_output=True)
        proc.stop()
        dumps = sorted(f for f in os.listdir(tmp) if f.startswith(f"callgrind.{name}.") and f.endswith(".1"))
        if not dumps:
            raise SystemExit(f"no callgrind dump for {name} in {tmp}")
        ann = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", os.path.join(tmp, dumps[-1])],
                             check=True, capture_output=True, text=True).stdout
        total = int(re.search(r"^([\d,]+)\s+\(100.0%\)\s+PROGRAM TOTALS", ann, re.M).group(1).replace(",", ""))
        per_req = total / max(res["requests"], 1)
        rows.append((name, res["requests"], total, per_req))
        print(f"{name}: {res['requests']} requests, {total:,} instructions, {per_req:,.0f} per request", flush=True)
        # After the counters are zeroed, the threads' entry frames carry the whole total: skip them.
        top = [ln for ln in ann.splitlines() if re.match(r"^\s*[\d,]+\s+\(\s*[\d.]+%\)\s+\S", ln)
               and "PROGRAM TOTALS" not in ln and float(re.search(r"\(\s*([\d.]+)%\)", ln).group(1)) < 90][:15]
        for ln in top:
            cnt, pct, fn = re.match(r"^\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)$", ln).groups()
            fn = re.sub(r"^\S*:", "", fn.split(" [")[0])[:110]
            print(f"  {pct:>5}%  {int(cnt.replace(',', '')) / max(res['requests'], 1):>7,.0f}/req  {fn}")
    print()
    print("| proxy | requests | instructions per request | vs nginx |")
    print("|---|---|---|---|")
    ref = rows[-1][3]
    for name, n, _, per in rows:
        print(f"| {name} | {n} | {per:,.0f} | {per / ref:.2f}x |")
