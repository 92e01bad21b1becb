#!/usr/bin/env python3
"""Bounded soak: load through one HexGate while its config is reloaded (SIGHUP) every
--reload-ms, one of its two backends is killed and restarted, and Redis (the limits store,
failureMode open) is killed and restarted, once a minute each. Samples the gateway's RSS and open
file descriptors every 5 s.

Usage: scripts/soak.py [--seconds 600] [--reload-ms 100] [--conns 16] [--hexgate PATH]
Exit 0 when no request failed, and (for runs of 2 minutes or more) RSS grew less than 5% and open
file descriptors stayed flat after the first minute; exit 1 otherwise. Everything started here is
stopped by pid; all addresses are loopback.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench import free_port, wait_port  # noqa: E402  (the benchmark's helpers)
from bench_more import fd_count, rss_kib  # noqa: E402


class Proc:
    def __init__(self, cmd, log):
        self.cmd, self.log = cmd, log
        self.p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()

    def stop(self):
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            self.kill()

    def restart(self):
        self.kill()
        self.p = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)


def backend_conf(tmp, name, port):
    return (f"worker_processes 1; daemon off; pid {tmp}/{name}.pid; error_log {tmp}/{name}.err;\n"
            f"events {{ worker_connections 1024; }}\n"
            f"http {{ access_log off; server {{ listen 127.0.0.1:{port}; "
            f"location / {{ return 200 \"{name}\"; }} }} }}\n")


def gateway_conf(port, admin, b1, b2, redis_port, retries):
    return f"""gatewayPort: "{port}"
gatewayBind: 127.0.0.1
adminPort: "{admin}"
healthCheckInterval: 1
retries: {retries}
redis: {{address: "127.0.0.1:{redis_port}", timeout: 100ms, failureMode: open}}
services:
  - name: soak
    path: /
    backends: ["http://127.0.0.1:{b1}", "http://127.0.0.1:{b2}"]
    rateLimiting: {{enabled: true, ratePerSecond: 1000000, burst: 1000000, key: ip}}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--reload-ms", type=int, default=100)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--hexgate", default=os.path.join(ROOT, "target", "release", "hexgate"))
    args = ap.parse_args()
    for tool in ["wrk", "nginx", "redis-server"]:
        if not shutil.which(tool):
            raise SystemExit(f"soak: {tool} not installed: run `make setup` (scripts/setup.sh)")
    if not os.path.exists(args.hexgate):
        raise SystemExit(f"soak: {args.hexgate} missing: run `cargo build --release`")

    tmp = tempfile.mkdtemp(prefix="hexgate-soak-")
    log = open(os.path.join(tmp, "soak.log"), "w")
    procs = []
    b1, b2, redis_port, port, admin = (free_port() for _ in range(5))
    try:
        backends = []
        for name, p in [("b1", b1), ("b2", b2)]:
            with open(f"{tmp}/{name}.conf", "w") as f:
                f.write(backend_conf(tmp, name, p))
            backends.append(Proc(["nginx", "-c", f"{tmp}/{name}.conf", "-p", tmp], log))
            wait_port(p)
        redis = Proc(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no"], log)
        wait_port(redis_port)
        cfg = f"{tmp}/gateway.yaml"
        with open(cfg, "w") as f:
            f.write(gateway_conf(port, admin, b1, b2, redis_port, 2))
        gw = Proc([args.hexgate, "run", "--config", cfg], log)
        procs += backends + [redis, gw]
        wait_port(port)

        wrk = subprocess.Popen(["wrk", "-t1", f"-c{args.conns}", f"-d{args.seconds}s", "--timeout", "5s",
                                f"http://127.0.0.1:{port}/soak"], stdout=subprocess.PIPE, text=True)
        start = time.time()
        end = start + args.seconds
        next_reload = start
        next_sample = start
        reloads = 0
        samples = []
        faults = []
        done_faults = set()
        while time.time() < end and wrk.poll() is None:
            now = time.time()
            t = now - start
            minute, sec = int(t // 60), t % 60
            if now >= next_reload:
                # Written as operators (and Kubernetes ConfigMaps) do: a new file renamed into place.
                with open(cfg + ".tmp", "w") as f:
                    f.write(gateway_conf(port, admin, b1, b2, redis_port, 2 + reloads % 2))
                os.replace(cfg + ".tmp", cfg)
                os.kill(gw.p.pid, signal.SIGHUP)
                reloads += 1
                next_reload += args.reload_ms / 1000.0
            for at, key, action in [(20, "kill-b2", lambda: backends[1].kill()),
                                    (30, "start-b2", lambda: backends[1].restart()),
                                    (40, "restart-redis", lambda: redis.restart())]:
                if sec >= at and (minute, key) not in done_faults and t < args.seconds - 5:
                    done_faults.add((minute, key))
                    action()
                    faults.append(f"{t:6.1f}s {key}")
            if now >= next_sample:
                samples.append((t, rss_kib([gw.p.pid]), fd_count([gw.p.pid])))
                next_sample += 5
            time.sleep(0.01)
        out, _ = wrk.communicate(timeout=args.seconds + 60)
        samples.append((time.time() - start, rss_kib([gw.p.pid]), fd_count([gw.p.pid])))
        metrics = subprocess.run(["curl", "-s", f"http://127.0.0.1:{admin}/metrics"], capture_output=True,
                                 text=True).stdout
    finally:
        for p in reversed(procs):
            p.stop()
        log.close()

    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    sock_errors = sum(int(x) for x in sock.groups()) if sock else 0
    codes = {}
    for code, n in re.findall(r'hexgate_http_requests_total\{service="[^"]*",method="GET",code="(\d+)"\} (\d+)', metrics):
        codes[code] = codes.get(code, 0) + int(n)
    ok_reloads = re.search(r'hexgate_config_reloads_total\{result="success"\} (\d+)', metrics)
    print("responses by status (gateway metrics):", codes)
    print("faults injected:", ", ".join(faults) or "none")
    print("samples (s, RSS KiB, fds):", " ".join(f"{t:.0f}:{r}:{n}" for t, r, n in samples))
    # The last sample is taken after the load stopped: not part of the steady state.
    warm = [s for s in samples[:-1] if s[0] >= 60] or samples
    base_rss, last_rss = warm[0][1], samples[-1][1]
    growth = 100.0 * (last_rss - base_rss) / base_rss
    fd_vals = [n for _, _, n in warm]
    print(f"requests {total}, non-2xx {non2xx}, socket errors {sock_errors}; SIGHUP reloads sent {reloads}, "
          f"applied {ok_reloads.group(1) if ok_reloads else '?'}; RSS after warm-up {base_rss} KiB, at end "
          f"{last_rss} KiB ({growth:+.1f}%); open fds {min(fd_vals)}-{max(fd_vals)}")
    failed = non2xx + sock_errors > 0
    if args.seconds >= 120:
        failed |= growth >= 5.0 or max(fd_vals) - min(fd_vals) > args.conns + 8
    print("soak:", "FAILED" if failed else "passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
