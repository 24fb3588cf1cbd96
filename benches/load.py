#!/usr/bin/env python3
"""`make bench-load`: unary gRPC calls driven by h2load for a fixed time against
one backend directly, weir, HAProxy, Envoy and nginx (grpc_pass), all over the
same three release-built echo backends, round-robin, the same number of worker
threads, alternating the targets over several rounds. Prints requests per
second, p50 and p99 latency per run, the medians, and weir's ratios; the last
three lines read `weir/nginx: ...`, `weir/envoy: ...`, `weir/haproxy: ...`.

h2load counts HTTP 200 as success even when grpc-status is not 0, so after
each run a short check drives calls through the same target with the example
client (which reads grpc-status) and the run is void if any call failed.

Everything listens on 127.0.0.1; every run is bounded in time.
Environment: ROUNDS (3), SECONDS (10), CONNECTIONS (50), STREAMS (10), THREADS (2),
WEIR_BASELINE (optional: another weir binary, e.g. a build of an earlier
commit, run beside this one as target "baseline" to tell a regression from
the machine's noise).
"""
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
WEIR = os.path.join(REL, "weir")
SERVER = os.path.join(REL, "examples", "echo_server")
CLIENT = os.path.join(REL, "examples", "echo_client")
ENVOY = os.environ.get("ENVOY", os.path.join(ROOT, ".venv-bench", "bin", "envoy"))

ROUNDS = int(os.environ.get("ROUNDS", 3))
SECONDS = int(os.environ.get("SECONDS", 10))
CONNECTIONS = int(os.environ.get("CONNECTIONS", 50))
STREAMS = int(os.environ.get("STREAMS", 10))
THREADS = int(os.environ.get("THREADS", 2))
PATH = "/weir.example.v1.Echo/Unary"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, limit=20):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


class Processes:
    def __init__(self, work):
        self.work, self.procs = work, []

    def start(self, name, argv, **kw):
        log = open(os.path.join(self.work, f"{name}.log"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def stop_all(self):
        for _, p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def grpc_frame():
    # EchoRequest{message: "hello"}: field 1, length-delimited.
    msg = b"\x0a\x05hello"
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def h2load(port, work, tag):
    body = os.path.join(work, "req.bin")
    log = os.path.join(work, f"h2load-{tag}.log")
    out = subprocess.run(
        ["h2load", "-D", str(SECONDS), "-c", str(CONNECTIONS), "-m", str(STREAMS), "-t", "1",
         "--log-file", log, "-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, timeout=SECONDS + 60)
    if out.returncode != 0:
        sys.exit(f"h2load failed against {tag}:\n{out.stdout}\n{out.stderr}")
    durations, ok, bad = [], 0, 0
    with open(log) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            if parts[1] == "200":
                ok += 1
                durations.append(int(parts[2]))
            else:
                bad += 1
    os.remove(log)
    if not durations:
        sys.exit(f"no successful request against {tag}:\n{out.stdout}")
    durations.sort()
    q = lambda p: durations[min(len(durations) - 1, int(p * len(durations)))] / 1000.0
    return {"rps": ok / SECONDS, "p50": q(0.50), "p99": q(0.99), "non200": bad}


def statuses_ok(port, tag):
    out = subprocess.run([CLIENT, "--target", f"127.0.0.1:{port}", "--calls", "300", "--concurrency", "4"],
                         capture_output=True, text=True, timeout=60)
    first = out.stdout.splitlines()[0] if out.stdout else out.stderr
    if out.returncode != 0 or not first.endswith(" 0 failed"):
        sys.exit(f"gRPC statuses through {tag} were not all OK: {first}\n{out.stdout}{out.stderr}")


def main():
    for tool in ("etcd", "h2load", "haproxy", "nginx"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} is missing: `make bench-load` installs it")
    for binary in (WEIR, SERVER, CLIENT, ENVOY):
        if not os.path.exists(binary):
            sys.exit(f"{binary} is missing: `make bench-load` builds/installs it")
    work = tempfile.mkdtemp(prefix="weir-load-")
    procs = Processes(work)
    try:
        run(work, procs)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def run(work, procs):
    targets = start_targets(work, procs)
    measure(work, targets)


def start_targets(work, procs, backend_count=3):
    """etcd, `backend_count` self-registering echo backends, and weir, HAProxy,
    nginx and Envoy in front of them; returns {target: port} ("direct" is the
    first backend)."""
    with open(os.path.join(work, "req.bin"), "wb") as f:
        f.write(grpc_frame())
    etcd_port, peer = free_port(), free_port()
    etcd = f"http://127.0.0.1:{etcd_port}"
    procs.start("etcd", ["etcd", "--name", "bench", "--data-dir", os.path.join(work, "etcd"),
                         "--listen-client-urls", etcd, "--advertise-client-urls", etcd,
                         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                         "--initial-cluster", f"bench=http://127.0.0.1:{peer}", "--log-level", "error"])
    wait_port(etcd_port, "etcd")
    backends = []
    for i in range(backend_count):
        port = free_port()
        procs.start(f"b{i}", [SERVER, "--name", f"b{i}", "--listen", f"127.0.0.1:{port}", "--etcd", etcd])
        wait_port(port, f"backend b{i}")
        backends.append(port)

    deadline = time.time() + 20
    while True:
        out = subprocess.run(["etcdctl", "--endpoints", etcd, "get", "--prefix", "/services/echo/", "--keys-only", "-w", "json"],
                             capture_output=True, text=True)
        if out.returncode == 0 and json.loads(out.stdout).get("count") == len(backends):
            break
        if time.time() > deadline:
            sys.exit(f"the backends did not register: {out.stdout}{out.stderr}")
        time.sleep(0.1)

    targets = {"direct": backends[0]}

    weir_port, admin = free_port(), free_port()
    with open(os.path.join(work, "weir.toml"), "w") as f:
        f.write(f'listen = "127.0.0.1:{weir_port}"\nadmin = "127.0.0.1:{admin}"\nworker_threads = {THREADS}\n'
                f'[etcd]\nendpoints = ["{etcd}"]\n[[route]]\nmatch = "/weir.example.v1.Echo/"\n'
                f'service = "echo"\npolicy = "round-robin"\n')
    procs.start("weir", [WEIR, "serve", "--config", os.path.join(work, "weir.toml")], env={**os.environ, "WEIR_LOG": "warn"})
    wait_port(weir_port, "weir")
    targets["weir"] = weir_port
    baseline = os.environ.get("WEIR_BASELINE")
    if baseline:
        base_port, base_admin = free_port(), free_port()
        base_toml = os.path.join(work, "baseline.toml")
        with open(os.path.join(work, "weir.toml")) as src, open(base_toml, "w") as f:
            f.write(src.read().replace(f"127.0.0.1:{weir_port}", f"127.0.0.1:{base_port}")
                    .replace(f"127.0.0.1:{admin}", f"127.0.0.1:{base_admin}"))
        procs.start("baseline", [baseline, "serve", "--config", base_toml], env={**os.environ, "WEIR_LOG": "warn"})
        wait_port(base_port, "baseline weir")
        targets["baseline"] = base_port

    haproxy_port = free_port()
    servers = "\n".join(f"  server b{i} 127.0.0.1:{p} proto h2" for i, p in enumerate(backends))
    with open(os.path.join(work, "haproxy.cfg"), "w") as f:
        f.write(f"global\n  nbthread {THREADS}\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 1s\n"
                f"  timeout client 60s\n  timeout server 60s\nfrontend grpc\n  bind 127.0.0.1:{haproxy_port} proto h2\n"
                f"  default_backend echo\nbackend echo\n  balance roundrobin\n{servers}\n")
    procs.start("haproxy", ["haproxy", "-db", "-f", os.path.join(work, "haproxy.cfg")])
    wait_port(haproxy_port, "haproxy")
    targets["haproxy"] = haproxy_port

    nginx_port = free_port()
    upstreams = "".join(f"server 127.0.0.1:{p};" for p in backends)
    os.makedirs(os.path.join(work, "nginx"), exist_ok=True)
    with open(os.path.join(work, "nginx.conf"), "w") as f:
        f.write(f"user root;\nworker_processes {THREADS};\ndaemon off;\npid {work}/nginx.pid;\n"
                f"error_log {work}/nginx-error.log error;\nevents {{ worker_connections 8192; }}\n"
                # nginx closes a connection after 1000 requests by default (HTTP/2
                # included), and h2load does not reconnect: lift both limits.
                f"http {{ access_log off; client_body_temp_path {work}/nginx; keepalive_requests 100000000;\n"
                f"  upstream echo {{ {upstreams} keepalive 64; keepalive_requests 100000000; }}\n"
                f"  server {{ listen 127.0.0.1:{nginx_port} http2; http2_max_concurrent_streams 1000;\n"
                f"    location / {{ grpc_pass grpc://echo; }} }} }}\n")
    procs.start("nginx", ["nginx", "-p", os.path.join(work, "nginx"), "-c", os.path.join(work, "nginx.conf")])
    wait_port(nginx_port, "nginx")
    targets["nginx"] = nginx_port

    envoy_port = free_port()
    envoy = {
        "static_resources": {
            "listeners": [{
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": envoy_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress", "codec_type": "HTTP2",
                        "http2_protocol_options": {"max_concurrent_streams": 1000},
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": "echo", "timeout": "0s"}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    }}]}],
            }],
            "clusters": [{
                "name": "echo", "type": "STATIC", "lb_policy": "ROUND_ROBIN",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "echo", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                    for p in backends]}]},
            }],
        },
    }
    with open(os.path.join(work, "envoy.json"), "w") as f:
        json.dump(envoy, f)
    procs.start("envoy", [ENVOY, "-c", os.path.join(work, "envoy.json"), "--concurrency", str(THREADS),
                          "--log-level", "error", "--base-id", str(os.getpid() % 60000)])
    wait_port(envoy_port, "envoy")
    targets["envoy"] = envoy_port
    return targets


def measure(work, targets):
    for tag, port in targets.items():
        statuses_ok(port, tag)  # also warms every proxy's connections
    print(f"h2load: {SECONDS}s per run, {CONNECTIONS} connections x {STREAMS} streams, "
          f"{THREADS} worker threads per proxy, 3 backends, {ROUNDS} rounds", flush=True)
    order = list(targets)
    results = {t: [] for t in targets}
    for r in range(ROUNDS):
        order = order[1:] + order[:1]  # a different target goes first each round
        for tag in order:
            res = h2load(targets[tag], work, tag)
            statuses_ok(targets[tag], tag)
            results[tag].append(res)
            print(f"round {r + 1} {tag:<8} {res['rps']:>9.0f} calls/s  p50 {res['p50']:7.2f} ms  p99 {res['p99']:7.2f} ms",
                  flush=True)

    med = {t: {k: statistics.median(x[k] for x in v) for k in ("rps", "p50", "p99")} for t, v in results.items()}
    print("\nmedians over the rounds:")
    print(f"{'target':<8} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for t in targets:
        print(f"{t:<8} {med[t]['rps']:>9.0f} {med[t]['p50']:>8.2f} {med[t]['p99']:>8.2f}")
    print()
    if "baseline" in med:
        print(f"weir/baseline: throughput ratio {med['weir']['rps'] / med['baseline']['rps']:.2f}, "
              f"p99 ratio {med['weir']['p99'] / med['baseline']['p99']:.2f}")
    for other in ("nginx", "envoy", "haproxy"):
        print(f"weir/{other}: throughput ratio {med['weir']['rps'] / med[other]['rps']:.2f}, "
              f"p99 ratio {med['weir']['p99'] / med[other]['p99']:.2f}")


if __name__ == "__main__":
    main()
