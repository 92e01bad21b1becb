"""bench/run.sh grpc|upstream-tls: the upstream side of issue 14, HexGate against nginx in the same run.

grpc: h2load sends gRPC unary calls (POST, content-type application/grpc, te: trailers, one
  length-prefixed message from a file) over h2c to HexGate (route to an h2c:// backend), to nginx
  (`grpc_pass` on an `http2` listener, upstream keepalive) and directly to the backend
  (examples/grpc_backend.rs: a fixed reply and grpc-status 0 trailers). Every response is checked:
  h2load's DATA bytes per request must equal the reply's size (a trailers-only gateway refusal, which
  is HTTP 200 too, carries none), and before the runs one call through each target must come back
  with the reply and `grpc-status: 0` (curl).
upstream-tls: wrk over HTTP/1.1 to HexGate (route to an https:// backend, upstreamTls with the test
  CA and server name, upstreamProtocol http1) and to nginx (proxy_pass https, proxy_ssl_verify on,
  session reuse, upstream keepalive), both in front of one nginx backend (1 worker) serving
  `return 200 "ok"` over TLS with keep-alive, with a certificate from a throwaway CA. The same
  two proxies in front of the backend's plain HTTP listener run in the same rounds (`--no-plain-ref`
  skips them), so the TLS cost is read against the plain figures of the same run.

Same method as bench.py: interleaved rounds after a 2 s warm-up per target, CPU per request of each
proxy from /proc/PID/stat, CPU of the backend too, steal recorded (runs above --max-steal dropped),
medians and medians of round-by-round ratios; every load run is bounded and every process started
here is stopped by pid. Loopback only.
"""
import os
import re
import shutil
import statistics
import subprocess
import time

# examples/grpc_backend.rs: helloworld.HelloReply{message: "Hello world"} with its 5-byte prefix.
GRPC_REPLY = b"\x00\x00\x00\x00\x0d\x0a\x0bHello world"
# helloworld.HelloRequest{name: "world"} with its 5-byte prefix.
GRPC_REQUEST = b"\x00\x00\x00\x00\x07\x0a\x05world"
GRPC_PATH = "/helloworld.Greeter/SayHello"
GRPC_HEADERS = ["content-type: application/grpc", "te: trailers"]


def run_h2load_grpc(url, conns, seconds, streams, body_file):
    cmd = ["h2load", "-c", str(conns), "-m", str(streams), "-t", "1", "-D", str(seconds), "-d", body_file]
    for h in GRPC_HEADERS:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    traffic = re.search(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?, .*?\((\d+)\) data", out)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if not (m and done and lat and codes and traffic):
        raise SystemExit(f"cannot parse h2load output:\n{out}")

    def ms(v):
        n, unit = re.match(r"([\d.]+)(us|ms|s)$", v).groups()
        return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    ok = int(done.group(3))
    data = int(traffic.group(3))
    return {"rps": float(m.group(1)), "requests": ok,
            "failed": int(done.group(4)) + int(done.group(5)),
            "non2xx": int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4)),
            "data_per_req": data / max(ok, 1),
            "mean": ms(lat.group(3)), "max": ms(lat.group(2))}


def run_wrk(b, port, conns, seconds, path="/users/1"):
    res = b.run_wrk(port, conns, seconds, 1, path=path)
    return {"rps": res["rps"], "requests": res["requests"], "failed": 0, "non2xx": res["non2xx"],
            "sockerr": res["sockerr"], "mean": res["p50"], "max": res["p99"]}


def upstream_conns(pids, port):
    """Established TCP connections from any of pids to 127.0.0.1:port."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", "dst", f"127.0.0.1:{port}"],
                         capture_output=True, text=True).stdout
    want = {str(p) for p in pids}
    return sum(1 for line in out.splitlines() if any(f"pid={p}," in line for p in want))


def tcp_counters():
    """Loopback-wide TCP counters (this network namespace): passive opens (connections accepted),
    listen-queue overflows and SYN retransmits (a dropped SYN costs the client 1 s)."""
    vals = {}
    for path, prefix in [("/proc/net/snmp", "Tcp:"), ("/proc/net/netstat", "TcpExt:")]:
        with open(path) as f:
            lines = [ln.split() for ln in f if ln.startswith(prefix)]
        for head, row in zip(lines[0::2], lines[1::2]):
            vals.update(zip(head[1:], (int(x) for x in row[1:])))
    return {k: vals.get(k, 0) for k in ("PassiveOpens", "ListenOverflows", "TCPSynRetrans")}


def cpu_busy():
    """Jiffies the machine spent in user, nice, system, irq and softirq (all CPUs), and the total."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6], sum(v[:8])


def children_cpu():
    """CPU seconds of the load generators and other waited-for children of this script."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def nginx_status(port):
    """(accepted connections, requests) from the backend's stub_status."""
    out = subprocess.run(["curl", "-s", "--max-time", "2", f"http://127.0.0.1:{port}/stub"],
                         capture_output=True, text=True).stdout
    m = re.search(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$", out, re.M)
    if not m:
        return 0, 0
    return int(m.group(1)), int(m.group(3))


def grpc_call(port, tmp, body_file):
    """One unary call through curl (h2c prior knowledge): (HTTP status, grpc-status, body) or raises."""
    out_file = os.path.join(tmp, "grpc-check.bin")
    r = subprocess.run(["curl", "-s", "--max-time", "5", "--http2-prior-knowledge", "-X", "POST",
                        *sum((["-H", h] for h in GRPC_HEADERS), []), "--data-binary", f"@{body_file}",
                        "-o", out_file, "-D", "-", f"http://127.0.0.1:{port}{GRPC_PATH}"],
                       capture_output=True, text=True)
    status = re.search(r"^HTTP/2 (\d+)", r.stdout, re.M)
    gs = re.search(r"^grpc-status:\s*(\d+)", r.stdout, re.M | re.I)
    gm = re.search(r"^grpc-message:\s*(.*?)\s*$", r.stdout, re.M | re.I)
    with open(out_file, "rb") as f:
        body = f.read()
    return (int(status.group(1)) if status else None, int(gs.group(1)) if gs else None,
            gm.group(1) if gm else "", body, r.stdout)


def grpc_metrics(admin_port):
    """hexgate_grpc_requests_total by grpc_status, from the admin listener (empty if absent). The
    status "" counts answers that carried none: calls h2load cancelled when its time ran out."""
    out = subprocess.run(["curl", "-s", "--max-time", "2", f"http://127.0.0.1:{admin_port}/metrics"],
                         capture_output=True, text=True).stdout
    counts = {}
    for m in re.finditer(r'^hexgate_grpc_requests_total\{([^}]*)\}\s+([\d.e+]+)', out, re.M):
        gs = re.search(r'grpc_status="([^"]*)"', m.group(1))
        key = gs.group(1) if gs else "?"
        counts[key] = counts.get(key, 0) + float(m.group(2))
    return counts


def make_ca_and_cert(tmp, name):
    """A throwaway CA and a server certificate for `name` (RSA-2048, SAN DNS:name and IP:127.0.0.1)."""
    def ossl(*a):
        r = subprocess.run(["openssl", *a], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"openssl {' '.join(a)}: {r.stderr}")
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=HexGate bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-keyout", f"{tmp}/ca-key.pem", "-out", f"{tmp}/ca.pem")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{tmp}/be-key.pem",
         "-out", f"{tmp}/be.csr")
    with open(f"{tmp}/be.ext", "w") as f:
        f.write(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{name},IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", f"{tmp}/be.csr", "-CA", f"{tmp}/ca.pem", "-CAkey", f"{tmp}/ca-key.pem",
         "-CAcreateserial", "-days", "2", "-extfile", f"{tmp}/be.ext", "-out", f"{tmp}/be.pem")
    return f"{tmp}/ca.pem", f"{tmp}/be.pem", f"{tmp}/be-key.pem"


def hexgate_yaml(port, admin, backend, route_extra=""):
    return f"""gatewayPort: "{port}"
gatewayBind: 127.0.0.1
adminPort: "{admin}"
healthCheckInterval: 5
maxConnections: 30000
services:
  - name: bench
    path: /
    backends: ["{backend}"]
{route_extra}"""


def main(args, b):
    tools = ["nginx", "curl", "ss"] + (["h2load"] if args.mode == "grpc" else ["wrk", "openssl"])
    for tool in tools:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not installed: run `make setup` (scripts/setup.sh)")
    if not args.no_hexgate and not os.path.exists(args.hexgate):
        raise SystemExit(f"{args.hexgate} missing: run `cargo build --release`")
    if args.mode == "grpc" and not os.path.exists(args.grpc_backend):
        raise SystemExit(f"{args.grpc_backend} missing: run `cargo build --release --example grpc_backend`")
    import resource
    import tempfile
    busy = subprocess.run(["pgrep", "-x", "cargo|rustc"], capture_output=True, text=True).stdout.split()
    if busy:
        print(f"warning: cargo/rustc running (pids {' '.join(busy)}): runs will be disturbed", flush=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    tmp = tempfile.mkdtemp(prefix=f"hexgate-bench-{args.mode}-")
    log = open(os.path.join(tmp, "bench.log"), "w")
    procs = []

    def start(cmd, port):
        p = b.Proc(cmd, log)
        procs.append(p)
        try:
            b.wait_port(port)
        except SystemExit:
            log.flush()
            with open(os.path.join(tmp, "bench.log")) as f:
                tail = f.read()[-3000:]
            raise SystemExit(f"{' '.join(cmd)}: port {port} never opened; log ({tmp}/bench.log):\n{tail}")
        return p

    def start_hexgate(name, text, port):
        cfg = os.path.join(tmp, f"{name}.yaml")
        with open(cfg, "w") as f:
            f.write(text)
        v = subprocess.run([args.hexgate, "validate", cfg], capture_output=True, text=True)
        if v.returncode:
            raise SystemExit(f"hexgate validate {cfg} failed (this build lacks issue 14?):\n{v.stdout}{v.stderr}")
        return start([args.hexgate, "run", "--config", cfg], port)

    def start_nginx(name, conf, port):
        path = os.path.join(tmp, f"{name}.conf")
        with open(path, "w") as f:
            f.write(conf)
        return start(["nginx", "-c", path, "-p", tmp], port)

    conns_list = [int(c) for c in args.conns.split(",")]
    try:
        if args.mode == "grpc":
            targets, backend, runner, checks = setup_grpc(args, b, tmp, start, start_hexgate, start_nginx)
        else:
            targets, backend, runner, checks = setup_upstream_tls(args, b, tmp, start_hexgate, start_nginx)
        time.sleep(0.5)
        for check in checks:
            check()
        run_rounds(args, b, targets, backend, conns_list, runner)
    finally:
        for p in reversed(procs):
            p.stop()
        log.close()


def setup_grpc(args, b, tmp, start, start_hexgate, start_nginx):
    body_file = os.path.join(tmp, "request.bin")
    with open(body_file, "wb") as f:
        f.write(GRPC_REQUEST)
    bport = b.free_port()
    backend_proc = start([args.grpc_backend, "--port", str(bport)], bport)
    targets = {}
    if not args.no_hexgate:
        port, admin = b.free_port(), b.free_port()
        proc = start_hexgate("hexgate", hexgate_yaml(port, admin, f"h2c://127.0.0.1:{bport}"), port)
        targets["hexgate"] = {"proc": proc, "port": port, "admin": admin, "ref": "nginx"}
    port = b.free_port()
    conf = f"""worker_processes {args.workers}; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{ access_log off; keepalive_requests 1000000; http2_max_concurrent_streams 1024;
  upstream grpcbe {{ server 127.0.0.1:{bport}; keepalive {args.keepalive}; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{port} reuseport http2;
    location / {{ grpc_pass grpc://grpcbe; }} }} }}
"""
    targets["nginx"] = {"proc": start_nginx("nginx", conf, port), "port": port, "ref": "nginx"}
    if not args.no_direct:
        targets["backend (direct)"] = {"proc": backend_proc, "port": bport, "ref": None}
    backend = {"proc": backend_proc, "port": bport}

    def runner(port, conns, seconds):
        return run_h2load_grpc(f"http://127.0.0.1:{port}{GRPC_PATH}", conns, seconds, args.streams, body_file)

    def check():
        for name, t in targets.items():
            status, gs, gm, body, head = grpc_call(t["port"], tmp, body_file)
            if status != 200 or gs != 0 or body != GRPC_REPLY:
                raise SystemExit(f"{name}: a gRPC call did not come back as the backend's reply: HTTP {status}, "
                                 f"grpc-status {gs} {gm!r}, body {body!r}\n{head}")
            print(f"check: {name}: HTTP 200, grpc-status 0, reply of {len(body)} bytes", flush=True)
    return targets, backend, runner, [check]


def setup_upstream_tls(args, b, tmp, start_hexgate, start_nginx):
    name = "backend.bench.internal"
    ca, cert, key = make_ca_and_cert(tmp, name)
    plain_port, tls_port, stub_port = b.free_port(), b.free_port(), b.free_port()
    backend_conf = f"""worker_processes 1; daemon off; pid {tmp}/backend.pid; error_log {tmp}/backend.err;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{plain_port}; listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:be:10m; ssl_session_tickets on;
    location / {{ return 200 "ok"; }} }}
  server {{ listen 127.0.0.1:{stub_port}; location /stub {{ stub_status; }} }} }}
"""
    backend_proc = start_nginx("backend", backend_conf, tls_port)
    b.wait_port(plain_port)
    backend = {"proc": backend_proc, "port": tls_port, "plain_port": plain_port, "stub": stub_port}
    targets = {}
    kinds = [("tls", tls_port)] + ([] if args.no_plain_ref else [("plain", plain_port)])
    for kind, bport in kinds:
        if not args.no_hexgate:
            port, admin = b.free_port(), b.free_port()
            if kind == "tls":
                text = hexgate_yaml(port, admin, f"https://127.0.0.1:{bport}",
                                    f'    upstreamTls: {{caFile: "{ca}", serverName: "{name}"}}\n'
                                    "    upstreamProtocol: http1\n")
            else:
                text = hexgate_yaml(port, admin, f"http://127.0.0.1:{bport}")
            targets[f"hexgate {kind}"] = {"proc": start_hexgate(f"hexgate-{kind}", text, port), "port": port,
                                          "ref": f"nginx {kind}", "upstream": bport, "plain": "hexgate plain"}
        port = b.free_port()
        if kind == "tls":
            location = (f"proxy_pass https://be; proxy_ssl_trusted_certificate {ca}; proxy_ssl_verify on; "
                        f"proxy_ssl_name {name}; proxy_ssl_server_name on; proxy_ssl_session_reuse on; "
                        "proxy_ssl_protocols TLSv1.2 TLSv1.3;")
        else:
            location = "proxy_pass http://be;"
        conf = f"""worker_processes {args.workers}; daemon off; pid {tmp}/nginx-{kind}.pid; error_log {tmp}/nginx-{kind}.err;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream be {{ server 127.0.0.1:{bport}; keepalive {args.keepalive}; keepalive_requests 1000000; keepalive_timeout 300s; }}
  server {{ listen 127.0.0.1:{port} reuseport;
    location / {{ {location} proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }} }}
"""
        targets[f"nginx {kind}"] = {"proc": start_nginx(f"nginx-{kind}", conf, port), "port": port,
                                    "ref": f"nginx {kind}", "upstream": bport, "plain": "nginx plain"}

    def runner(port, conns, seconds):
        return run_wrk(b, port, conns, seconds)

    def check():
        for tname, t in targets.items():
            a0 = nginx_status(stub_port)
            r = subprocess.run(["curl", "-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{t['port']}/users/1"], capture_output=True, text=True)
            a1 = nginx_status(stub_port)
            if r.stdout != "200" or a1[1] - a0[1] < 2:
                raise SystemExit(f"{tname}: GET /users/1 answered {r.stdout!r} (backend saw {a1[1] - a0[1] - 1} "
                                 f"requests; the stub_status call itself is one)")
            print(f"check: {tname}: 200 through the backend", flush=True)
    return targets, backend, runner, [check]


def run_rounds(args, b, targets, backend, conns_list, runner):
    results = {}
    stub = backend.get("stub")
    for conns in conns_list:
        for name, t in targets.items():
            runner(t["port"], conns, 2)  # warm-up
        for r in range(args.rounds):
            for name, t in targets.items():
                pids = t["proc"].pids()
                bpids = backend["proc"].pids()
                s0, tt0 = b.steal()
                c0, bc0 = b.cpu_ticks(pids), b.cpu_ticks(bpids)
                a0 = nginx_status(stub) if stub else (0, 0)
                g0 = grpc_metrics(t["admin"]) if "admin" in t else {}
                k0 = tcp_counters()
                m0, l0 = cpu_busy(), children_cpu()
                res = runner(t["port"], conns, args.seconds)
                c1, bc1 = b.cpu_ticks(pids), b.cpu_ticks(bpids)
                k1 = tcp_counters()
                m1, l1 = cpu_busy(), children_cpu()
                s1, tt1 = b.steal()
                a1 = nginx_status(stub) if stub else (0, 0)
                g1 = grpc_metrics(t["admin"]) if "admin" in t else {}
                n = max(1, res["requests"])
                res["steal"] = 100.0 * (s1 - s0) / max(1, tt1 - tt0)
                res["cpu_us"] = (c1 - c0) / b.CLK_TCK * 1e6 / n
                res["backend_cpu_us"] = (bc1 - bc0) / b.CLK_TCK * 1e6 / n
                # Everything else the machine did meanwhile (another build or test run would show
                # here; loopback softirq time not charged to a process does too), in % of all CPUs.
                own = (c1 - c0) + ((bc1 - bc0) if t["proc"] is not backend["proc"] else 0)
                other = (m1[0] - m0[0]) - own - (l1 - l0) * b.CLK_TCK
                res["other_pct"] = 100.0 * other / max(1, m1[1] - m0[1])
                res["new_be_conns"] = a1[0] - a0[0] - 1 if stub else None  # minus the stub_status call
                res["up_conns"] = (upstream_conns(pids, t["upstream"] if "upstream" in t else backend["port"])
                                   if t["ref"] else None)
                grpc_bad = {k: g1.get(k, 0) - g0.get(k, 0) for k in g1 if k != "0" and g1.get(k, 0) - g0.get(k, 0)}
                # Calls in flight when h2load stops are cancelled and carry no grpc-status.
                if grpc_bad.get("", 0) <= conns * args.streams:
                    grpc_bad.pop("", None)
                res["disturbed"] = res["steal"] > args.max_steal or res["other_pct"] > args.max_other
                results.setdefault((conns, name), []).append(res)
                notes = []
                if res.get("failed") or res.get("non2xx"):
                    notes.append(f"failed {res.get('failed', 0)} non2xx {res.get('non2xx', 0)}")
                if res.get("sockerr"):
                    notes.append(f"sockerr {res['sockerr']}")
                if "data_per_req" in res and abs(res["data_per_req"] - len(GRPC_REPLY)) > 0.01:
                    notes.append(f"DATA bytes/req {res['data_per_req']:.2f} (expected {len(GRPC_REPLY)}: "
                                 "some answers were not the backend's reply)")
                # Connections accepted on loopback during the run beyond the load generator's own.
                res["tcp_opens"] = k1["PassiveOpens"] - k0["PassiveOpens"] - conns
                if k1["ListenOverflows"] - k0["ListenOverflows"] or k1["TCPSynRetrans"] - k0["TCPSynRetrans"]:
                    notes.append(f"listen overflows {k1['ListenOverflows'] - k0['ListenOverflows']}, "
                                 f"SYN retransmits {k1['TCPSynRetrans'] - k0['TCPSynRetrans']}")
                if grpc_bad:
                    notes.append(f"gateway grpc-status != 0: {grpc_bad}")
                extra = ""
                if res["new_be_conns"] is not None:
                    extra += f"  new backend conns {res['new_be_conns']}"
                if res["up_conns"] is not None:
                    extra += f"  upstream conns {res['up_conns']}"
                extra += f"  other tcp opens {res['tcp_opens']}"
                print(f"c={conns} round={r + 1} {name:17s} {res['rps']:9.0f} req/s  "
                      f"{'mean' if args.mode == 'grpc' else 'p50'} {res['mean']:6.2f}ms  "
                      f"{'max' if args.mode == 'grpc' else 'p99'} {res['max']:7.2f}ms  cpu/req {res['cpu_us']:5.1f}us  "
                      f"backend cpu/req {res['backend_cpu_us']:5.1f}us  steal {res['steal']:4.1f}%  other {res['other_pct']:4.1f}%"
                      f"{extra}" + ("  DROPPED" if res["disturbed"] else "")
                      + ("  " + "; ".join(notes) if notes else ""), flush=True)
    print()
    lat = ("mean ms", "max ms") if args.mode == "grpc" else ("p50 ms", "p99 ms")
    plain_cols = args.mode == "upstream-tls" and not args.no_plain_ref
    head = (f"| conns | proxy | req/s | {lat[0]} | {lat[1]} | CPU µs/req | backend CPU µs/req | upstream conns | "
            "runs kept | req/s vs nginx | CPU vs nginx |" + (" CPU vs own plain |" if plain_cols else ""))
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for conns in conns_list:
        for name, t in targets.items():
            runs = results[(conns, name)]
            kept = [x for x in runs if not x["disturbed"]] or runs
            med = {k: statistics.median(x[k] for x in kept)
                   for k in ["rps", "mean", "max", "cpu_us", "backend_cpu_us"]}
            up = [x["up_conns"] for x in kept if x["up_conns"] is not None]
            up_txt = f"{statistics.median(up):.0f}" if up else "-"
            nkept = len([x for x in runs if not x["disturbed"]])
            if t["ref"]:
                ratio, cpu_ratio = pairwise(runs, results[(conns, t["ref"])])
                ratios = f"{ratio:.2f} | {cpu_ratio:.2f}"
            else:
                ratios = "- | -"
            own = ""
            if plain_cols:
                _, own_ratio = pairwise(runs, results[(conns, t["plain"])])
                own = f" {own_ratio:.2f} |"
            cpu = f"{med['cpu_us']:.1f}" if t["ref"] else f"({med['cpu_us']:.1f})"
            print(f"| {conns} | {name} | {med['rps']:.0f} | {med['mean']:.2f} | {med['max']:.2f} | {cpu} | "
                  f"{med['backend_cpu_us']:.1f} | {up_txt} | {nkept}/{len(runs)} | {ratios} |{own}")
    return results


def pairwise(runs, ref_runs, keys=("rps", "cpu_us")):
    """Medians of the round-by-round ratios runs[i] / ref_runs[i], over rounds where neither run was
    disturbed (steal or other load above the thresholds; all rounds if none qualify)."""
    pairs = [(a, c) for a, c in zip(runs, ref_runs) if not a["disturbed"] and not c["disturbed"]]
    pairs = pairs or list(zip(runs, ref_runs))
    return tuple(statistics.median(a[k] / c[k] for a, c in pairs if c[k]) if any(c[k] for _, c in pairs)
                 else float("nan") for k in keys)
