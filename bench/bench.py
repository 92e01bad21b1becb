#!/usr/bin/env python3
"""HexGate vs nginx (and haproxy) as reverse proxies in front of the same nginx `return 200` backend.

Interleaved rounds (hexgate, nginx, haproxy, hexgate, ...), wrk on loopback, median req/s, p50, p99,
CPU time per request of each proxy from /proc/PID/stat (all threads and worker processes), and CPU
steal for each run from /proc/stat. Runs with steal above the threshold are reported and dropped.
Bounded: every wrk run has a fixed duration; every process started here is stopped by pid.
"""
import argparse
import os
import re
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


def run_wrk(port, conns, seconds, threads, path="/users/1"):
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}{path}"]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="plain", choices=["plain"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--conns", default="64,256")
    ap.add_argument("--workers", type=int, default=2, help="proxy worker threads/processes")
    ap.add_argument("--max-steal", type=float, default=15.0)
    ap.add_argument("--hexgate", default=os.path.join(ROOT, "target", "release", "hexgate"))
    ap.add_argument("--no-haproxy", action="store_true")
    args = ap.parse_args()

    for tool in ["wrk", "nginx"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not installed: run `make setup` (scripts/setup.sh)")
    use_haproxy = not args.no_haproxy and shutil.which("haproxy")
    if not os.path.exists(args.hexgate):
        raise SystemExit(f"{args.hexgate} missing: run `cargo build --release`")

    tmp = tempfile.mkdtemp(prefix="hexgate-bench-")
    log = open(os.path.join(tmp, "bench.log"), "w")
    backend_port, nginx_port, haproxy_port, hg_port, hg_admin = (free_port() for _ in range(5))
    procs = []
    try:
        with open(os.path.join(tmp, "backend.conf"), "w") as f:
            f.write(f"""worker_processes 1; daemon off; pid {tmp}/backend.pid; error_log {tmp}/backend.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{backend_port} reuseport; location / {{ return 200 "ok"; }} }} }}
""")
        with open(os.path.join(tmp, "proxy.conf"), "w") as f:
            f.write(f"""worker_processes {args.workers}; daemon off; pid {tmp}/proxy.pid; error_log {tmp}/proxy.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream be {{ server 127.0.0.1:{backend_port}; keepalive 512; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{nginx_port} reuseport;
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }} }}
""")
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
        with open(os.path.join(tmp, "hexgate.yaml"), "w") as f:
            f.write(f"""gatewayPort: "{hg_port}"
gatewayBind: 127.0.0.1
adminPort: "{hg_admin}"
healthCheckInterval: 5
services:
  - name: bench
    path: /
    backends: ["http://127.0.0.1:{backend_port}"]
""")
        procs.append(Proc(["nginx", "-c", f"{tmp}/backend.conf", "-p", tmp], log))
        wait_port(backend_port)
        proxies = {}
        proxies["hexgate"] = Proc([args.hexgate, "run", "--config", f"{tmp}/hexgate.yaml"], log)
        wait_port(hg_port)
        proxies["nginx"] = Proc(["nginx", "-c", f"{tmp}/proxy.conf", "-p", tmp], log)
        wait_port(nginx_port)
        if use_haproxy:
            proxies["haproxy"] = Proc(["haproxy", "-f", f"{tmp}/haproxy.cfg"], log)
            wait_port(haproxy_port)
        procs += proxies.values()
        ports = {"hexgate": hg_port, "nginx": nginx_port, "haproxy": haproxy_port}
        time.sleep(0.5)

        results = {}
        for conns in [int(c) for c in args.conns.split(",")]:
            for name in proxies:
                run_wrk(ports[name], conns, 2, 1)  # warm-up
            for r in range(args.rounds):
                for name, proc in proxies.items():
                    s0, t0 = steal()
                    c0 = cpu_ticks(proc.pids())
                    res = run_wrk(ports[name], conns, args.seconds, 1)
                    c1 = cpu_ticks(proc.pids())
                    s1, t1 = steal()
                    res["steal"] = 100.0 * (s1 - s0) / max(1, t1 - t0)
                    res["cpu_us"] = (c1 - c0) / CLK_TCK * 1e6 / max(1, res["requests"])
                    results.setdefault((conns, name), []).append(res)
                    print(f"c={conns} round={r + 1} {name:8s} {res['rps']:9.0f} req/s  p50 {res['p50']:6.2f}ms  "
                          f"p99 {res['p99']:6.2f}ms  cpu/req {res['cpu_us']:5.1f}us  steal {res['steal']:4.1f}%"
                          + (f"  non2xx {res['non2xx']}" if res["non2xx"] else "")
                          + (f"  sockerr {res['sockerr']}" if res["sockerr"] else ""), flush=True)

        print()
        print(f"| conns | proxy | req/s | p50 ms | p99 ms | CPU µs/req | runs kept | req/s vs nginx | CPU vs nginx |")
        print(f"|---|---|---|---|---|---|---|---|---|")
        for conns in [int(c) for c in args.conns.split(",")]:
            med = {}
            for name in proxies:
                runs = results[(conns, name)]
                kept = [x for x in runs if x["steal"] <= args.max_steal] or runs
                med[name] = {k: statistics.median(x[k] for x in kept) for k in ["rps", "p50", "p99", "cpu_us"]}
                med[name]["kept"] = f"{len([x for x in runs if x['steal'] <= args.max_steal])}/{len(runs)}"
            for name in proxies:
                m = med[name]
                ratio = m["rps"] / med["nginx"]["rps"]
                cpu_ratio = m["cpu_us"] / med["nginx"]["cpu_us"] if med["nginx"]["cpu_us"] else float("nan")
                print(f"| {conns} | {name} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | {m['cpu_us']:.1f} | "
                      f"{m['kept']} | {ratio:.2f} | {cpu_ratio:.2f} |")
    finally:
        for p in reversed(procs):
            p.stop()
        log.close()


if __name__ == "__main__":
    main()
