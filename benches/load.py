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

weir runs four times: with the native round-robin ("weir"), with the
round-robin and least-conn WebAssembly policies on every call ("weir-wasm-rr",
"weir-wasm-lc"), and with the native round-robin, the access log on (a file
in the work directory) and 1 % of calls traced to an OTLP receiver
(tests/python/otlp_collector.py --quiet, from .venv) ("weir-observed"). For every target the proxy's CPU time per call is read from
/proc (its processes' utime + stime over the run, divided by the calls), and
before the runs weir's wake-ups per second while idle (context switches of
all its threads over 5 s with no traffic).

PIN=1 gives every proxy one core: the proxies and the backends on CPU 1,
h2load on CPU 0, one worker per proxy (THREADS=1).

Two more weir targets run only when TARGETS names them: "weir-log" (the
access log alone) and "weir-trace" (1 % traced alone), each printed as
`weir-log/weir: ...`, to split what "weir-observed" costs.

Before anything runs, PREFAULT_MB (2048; 0: off) of zeros are written to a
file and deleted, so the page cache the access log grows into is memory the
virtual machine has touched before (see `prefault`).

REVERSE_START=1 starts the weir gateways in the opposite order (the
observed one first): a ratio measured once each way, and their geometric
mean, does not favour whichever gateway was started first.

Before those runs, client-side mode: one Rust load client
(examples/load_client.rs, tonic's Echo client, closed loop with
CLIENT_CONCURRENCY calls in flight: 1, the latency of a lone call, and 8,
a load that fills both cores) drives: the first backend directly
("direct") and through a client-side channel (weir::client::Channel, etcd
service "echo-one" = that backend: "client-side"); the three backends with
tonic's own balancing over a fixed list ("direct-3"), through a client-side
channel (native round-robin "client-side-3", the least-conn component
"client-side-3-wasm-lc") and through the weir gateway ("weir"). CPU per
call is the client's own plus, for the gateway, the gateway's. Its ratio
lines read `A/B (N in flight): p50 ratio, p99 ratio, CPU ratio, throughput ratio` for
client-side/direct, client-side-3/direct-3, client-side-3/weir and
client-side-3-wasm-lc/client-side-3.

Everything listens on 127.0.0.1; every run is bounded in time.
Environment: ROUNDS (3), SECONDS (10), CONNECTIONS (50), STREAMS (10), THREADS (2),
PIN (0), WEIR_BASELINE (optional: another weir binary, e.g. a build of an earlier
commit, run beside this one as target "baseline" to tell a regression from
the machine's noise), TARGETS (optional: a comma-separated subset of the
targets to measure, e.g. `weir,haproxy,baseline`, `client-side` for the
client-side runs; the ratio lines need their targets), CLIENT_CONCURRENCY (1,8).
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
LOAD_CLIENT = os.path.join(REL, "examples", "load_client")
ENVOY = os.environ.get("ENVOY", os.path.join(ROOT, ".venv-bench", "bin", "envoy"))

ROUNDS = int(os.environ.get("ROUNDS", 3))
SECONDS = int(os.environ.get("SECONDS", 10))
CONNECTIONS = int(os.environ.get("CONNECTIONS", 50))
STREAMS = int(os.environ.get("STREAMS", 10))
PIN = os.environ.get("PIN", "0") == "1"
REVERSE_START = os.environ.get("REVERSE_START", "0") == "1"
THREADS = int(os.environ.get("THREADS", 1 if PIN else 2))
CLIENT_CONCURRENCY = [int(c) for c in os.environ.get("CLIENT_CONCURRENCY", "1,8").split(",")]
# The client-side runs' targets, measured by one Rust load client.
CLIENT_TARGETS = ("direct", "client-side", "direct-3", "client-side-3", "client-side-3-wasm-lc", "weir")
# Set by start_targets: the etcd the backends registered in.
ETCD = None
BACKENDS = []
PATH = "/weir.example.v1.Echo/Unary"
POLICIES = os.path.join(ROOT, "build", "policies")


def pinned(argv, cpu):
    """`argv` on CPU `cpu` when PIN=1."""
    return ["taskset", "-c", str(cpu)] + argv if PIN else argv


def cpu_ticks(pids):
    """utime + stime of the processes `pids` (and their threads), in clock ticks."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


def wakeups(pid):
    """Context switches (voluntary + not) of every thread of `pid` so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


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

    def pid_of(self, name):
        """The pid of process `name` (through taskset, which execs it)."""
        return next(p.pid for n, p in self.procs if n == name)

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
        pinned(["h2load", "-D", str(SECONDS), "-c", str(CONNECTIONS), "-m", str(STREAMS), "-t", "1",
         "--log-file", log, "-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://127.0.0.1:{port}{PATH}"], 0),
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
    for binary in (WEIR, SERVER, CLIENT, LOAD_CLIENT, ENVOY):
        if not os.path.exists(binary):
            sys.exit(f"{binary} is missing: `make bench-load` builds/installs it")
    work = tempfile.mkdtemp(prefix="weir-load-")
    procs = Processes(work)
    try:
        run(work, procs)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def prefault(work):
    """Writes PREFAULT_MB of zeros to a file in `work` and deletes it, once,
    before anything is measured. In a virtual machine, the first time the
    guest touches a page of its memory the host must back it (an EPT fault
    per page): a target whose access log grows the page cache by ~150 MB a
    run pays that on pages the others never touch (measured here: a 3,000 MB
    file took 7.7 s to write the first time, 2.3 s the second). Pages freed
    by the deleted file stay backed, so the logs written during the runs
    reuse them, as a long-running host's would."""
    mb = int(os.environ.get("PREFAULT_MB", "2048"))
    if mb <= 0:
        return
    began = time.time()
    chunk = b"\0" * (1 << 20)
    path = os.path.join(work, "prefault.bin")
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(chunk)
    os.remove(path)
    print(f"memory pre-faulted: {mb} MB written and deleted in {time.time() - began:.1f} s", flush=True)


def run(work, procs):
    prefault(work)
    targets, pids = start_targets(work, procs)
    wanted = os.environ.get("TARGETS")
    if not wanted or "client-side" in wanted.split(","):
        measure_client_side(targets, pids)
    if not wanted or set(wanted.split(",")) - {"client-side"}:
        measure(work, targets, pids)


def load_client(args, tag, concurrency):
    """One run of the Rust load client; its JSON summary."""
    out = subprocess.run(pinned([LOAD_CLIENT, *args, "--concurrency", str(concurrency),
                                 "--seconds", f"{SECONDS}s"], 0),
                         capture_output=True, text=True, timeout=SECONDS + 60)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        sys.exit(f"the load client failed against {tag}:\n{out.stdout}\n{out.stderr}")
    res = json.loads(lines[-1])
    if res["failed"]:
        sys.exit(f"{res['failed']} calls failed through {tag}: {lines[-1]}")
    return res


def measure_client_side(targets, pids):
    """The first backend directly and through a client-side channel; the three
    backends with tonic's balancing, through client-side channels (native
    round-robin, the least-conn component) and through the gateway: each
    driven by the same Rust load client (closed loop), once per
    CLIENT_CONCURRENCY (calls in flight). CPU per call is the client's own
    plus, for the gateway, the gateway's."""
    least_conn = os.path.join(POLICIES, "least-conn.wasm")
    argv = {"direct": ["--direct", f"127.0.0.1:{targets['direct']}"],
            "client-side": ["--etcd", ETCD, "--service", "echo-one"],
            "direct-3": ["--direct", ",".join(f"127.0.0.1:{p}" for p in BACKENDS)],
            "client-side-3": ["--etcd", ETCD, "--service", "echo"],
            "client-side-3-wasm-lc": ["--etcd", ETCD, "--service", "echo", "--policy", least_conn],
            "weir": ["--gateway", f"127.0.0.1:{targets['weir']}"]}
    hz = os.sysconf("SC_CLK_TCK")
    print(f"Rust load client: {SECONDS}s per run (after 1 s of warm-up), closed loop with "
          f"{' and '.join(map(str, CLIENT_CONCURRENCY))} calls in flight, {ROUNDS} rounds, "
          f"{'pinned: client on CPU 0' if PIN else 'unpinned'}", flush=True)
    runs = [(t, c) for c in CLIENT_CONCURRENCY for t in CLIENT_TARGETS]
    results = {run: [] for run in runs}
    order = list(runs)
    for r in range(ROUNDS):
        order = order[1:] + order[:1]
        for tag, conc in order:
            proxy = family(pids["weir"]) if tag == "weir" else []
            ticks = cpu_ticks(proxy)
            res = load_client(argv[tag], tag, conc)
            proxy_us = (cpu_ticks(proxy) - ticks) / hz * 1e6 / res["all_calls"] if proxy else 0.0
            res["cpu_us"] = res["cpu_us_per_call"] + proxy_us
            results[(tag, conc)].append(res)
            print(f"round {r + 1} {tag:<22} x{conc:<3} {res['calls_per_s']:>9.0f} calls/s  p50 {res['p50_ms']:7.3f} ms"
                  f"  p99 {res['p99_ms']:7.3f} ms  CPU {res['cpu_us']:6.1f} us/call"
                  f" (client {res['cpu_us_per_call']:.1f})", flush=True)
    keys = ("calls_per_s", "p50_ms", "p99_ms", "cpu_us")
    med = {run: {k: statistics.median(x[k] for x in v) for k in keys} for run, v in results.items()}
    for conc in CLIENT_CONCURRENCY:
        print(f"\nmedians over the rounds (Rust load client, {conc} in flight):")
        print(f"{'target':<22} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/call':>12}")
        for t in CLIENT_TARGETS:
            m = med[(t, conc)]
            print(f"{t:<22} {m['calls_per_s']:>9.0f} {m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f} {m['cpu_us']:>12.1f}")
    print()
    for conc in CLIENT_CONCURRENCY:
        for a, b in (("client-side", "direct"), ("client-side-3", "direct-3"), ("client-side-3", "weir"),
                     ("client-side-3-wasm-lc", "client-side-3")):
            x, y = med[(a, conc)], med[(b, conc)]
            print(f"{a}/{b} ({conc} in flight): p50 ratio {x['p50_ms'] / y['p50_ms']:.2f}, "
                  f"p99 ratio {x['p99_ms'] / y['p99_ms']:.2f}, CPU ratio {x['cpu_us'] / y['cpu_us']:.2f}, "
                  f"throughput ratio {x['calls_per_s'] / y['calls_per_s']:.2f}")
    print(flush=True)


def family(pids):
    """`pids` and their children (nginx's workers), from /proc."""
    found = set(pids)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in found:
                found.add(int(entry))
    return sorted(found)


def start_targets(work, procs, backend_count=3):
    """etcd, `backend_count` self-registering echo backends, and weir, HAProxy,
    nginx and Envoy in front of them; returns {target: port} ("direct" is the
    first backend)."""
    with open(os.path.join(work, "req.bin"), "wb") as f:
        f.write(grpc_frame())
    etcd_port, peer = free_port(), free_port()
    etcd = f"http://127.0.0.1:{etcd_port}"
    global ETCD
    ETCD = etcd
    procs.start("etcd", ["etcd", "--name", "bench", "--data-dir", os.path.join(work, "etcd"),
                         "--listen-client-urls", etcd, "--advertise-client-urls", etcd,
                         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                         "--initial-cluster", f"bench=http://127.0.0.1:{peer}", "--log-level", "error"])
    wait_port(etcd_port, "etcd")
    backends = []
    for i in range(backend_count):
        port = free_port()
        procs.start(f"b{i}", pinned([SERVER, "--name", f"b{i}", "--listen", f"127.0.0.1:{port}", "--etcd", etcd], 1))
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

    # The first backend alone, as etcd service "echo-one" too (a plain key,
    # no lease): a client-side channel to it calls what "direct" calls.
    subprocess.run(["etcdctl", "--endpoints", etcd, "put", f"/services/echo-one/127.0.0.1:{backends[0]}",
                    f"127.0.0.1:{backends[0]}"], check=True, capture_output=True)
    targets = {"direct": backends[0]}
    global BACKENDS
    BACKENDS = backends
    pids = {"direct": [procs.pid_of("b0")]}

    # weir three times: the native round-robin, and Wasm policies on every call
    # (round-robin and least-conn from build/policies, under other names so
    # the native one is not chosen).
    wasm = os.path.join(work, "policies")
    os.makedirs(wasm, exist_ok=True)
    for name in ("round-robin", "least-conn"):
        shutil.copy(os.path.join(POLICIES, f"{name}.wasm"), os.path.join(wasm, f"wasm-{name}.wasm"))
    # And once more observed: the access log on (a file in the work
    # directory) and 1 % of calls traced to a receiver that only counts.
    collector_port = free_port()
    procs.start("collector", [os.path.join(ROOT, ".venv", "bin", "python"),
                              os.path.join(ROOT, "tests", "python", "otlp_collector.py"),
                              "--quiet", "--port", str(collector_port)])
    wait_port(collector_port, "the OTLP receiver")
    observed = (f'[access_log]\npath = "{os.path.join(work, "access.log")}"\n'
                f'[tracing]\notlp_endpoint = "http://127.0.0.1:{collector_port}"\nsample_ratio = 0.01\n')
    variants = [("weir", "round-robin", ""),
                ("weir-wasm-rr", "wasm-round-robin", f'[policy]\ndir = "{wasm}"\n'),
                ("weir-wasm-lc", "wasm-least-conn", f'[policy]\ndir = "{wasm}"\n'),
                ("weir-observed", "round-robin", observed)]
    # Each half of "observed" alone, when TARGETS names it (to split its cost).
    named = os.environ.get("TARGETS", "").split(",")
    if "weir-log" in named:
        variants.append(("weir-log", "round-robin", observed.split("[tracing]")[0]))
    if "weir-trace" in named:
        variants.append(("weir-trace", "round-robin", "[tracing]" + observed.split("[tracing]")[1]))
    if REVERSE_START:
        # The same gateways started (and first measured) in the other order:
        # the position of a process in the run is not free of effects.
        variants.reverse()
    for tag, policy, extra in variants:
        weir_port, admin = free_port(), free_port()
        toml = os.path.join(work, f"{tag}.toml")
        with open(toml, "w") as f:
            f.write(f'listen = "127.0.0.1:{weir_port}"\nadmin = "127.0.0.1:{admin}"\nworker_threads = {THREADS}\n'
                    f'[etcd]\nendpoints = ["{etcd}"]\n{extra}[[route]]\nmatch = "/weir.example.v1.Echo/"\n'
                    f'service = "echo"\npolicy = "{policy}"\n')
        procs.start(tag, pinned([WEIR, "serve", "--config", toml], 1), env={**os.environ, "WEIR_LOG": "warn"})
        wait_port(weir_port, tag)
        targets[tag] = weir_port
        pids[tag] = [procs.pid_of(tag)]
        if tag == "weir":
            native_ports = (weir_port, admin)
    baseline = os.environ.get("WEIR_BASELINE")
    if baseline:
        base_port, base_admin = free_port(), free_port()
        base_toml = os.path.join(work, "baseline.toml")
        with open(os.path.join(work, "weir.toml")) as src, open(base_toml, "w") as f:
            f.write(src.read().replace(f"127.0.0.1:{native_ports[0]}", f"127.0.0.1:{base_port}")
                    .replace(f"127.0.0.1:{native_ports[1]}", f"127.0.0.1:{base_admin}"))
        procs.start("baseline", pinned([baseline, "serve", "--config", base_toml], 1), env={**os.environ, "WEIR_LOG": "warn"})
        wait_port(base_port, "baseline weir")
        targets["baseline"] = base_port
        pids["baseline"] = [procs.pid_of("baseline")]

    haproxy_port = free_port()
    servers = "\n".join(f"  server b{i} 127.0.0.1:{p} proto h2" for i, p in enumerate(backends))
    with open(os.path.join(work, "haproxy.cfg"), "w") as f:
        f.write(f"global\n  nbthread {THREADS}\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 1s\n"
                f"  timeout client 60s\n  timeout server 60s\nfrontend grpc\n  bind 127.0.0.1:{haproxy_port} proto h2\n"
                f"  default_backend echo\nbackend echo\n  balance roundrobin\n{servers}\n")
    procs.start("haproxy", pinned(["haproxy", "-db", "-f", os.path.join(work, "haproxy.cfg")], 1))
    wait_port(haproxy_port, "haproxy")
    targets["haproxy"] = haproxy_port
    pids["haproxy"] = [procs.pid_of("haproxy")]

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
    procs.start("nginx", pinned(["nginx", "-p", os.path.join(work, "nginx"), "-c", os.path.join(work, "nginx.conf")], 1))
    wait_port(nginx_port, "nginx")
    targets["nginx"] = nginx_port
    pids["nginx"] = [procs.pid_of("nginx")]  # the master; its workers are found at measure time

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
    procs.start("envoy", pinned([ENVOY, "-c", os.path.join(work, "envoy.json"), "--concurrency", str(THREADS),
                                 "--log-level", "error", "--base-id", str(os.getpid() % 60000)], 1))
    wait_port(envoy_port, "envoy")
    targets["envoy"] = envoy_port
    pids["envoy"] = [procs.pid_of("envoy")]
    return targets, pids


def measure(work, targets, pids):
    wanted = os.environ.get("TARGETS")
    if wanted:
        keep = wanted.split(",")
        targets = {t: p for t, p in targets.items() if t in keep}
    for tag, port in targets.items():
        statuses_ok(port, tag)  # also warms every proxy's connections
    time.sleep(1)
    idle = {}
    for tag in [t for t in ("weir", "weir-wasm-lc") if t in targets]:
        before = wakeups(pids[tag][0])
        time.sleep(5)
        idle[tag] = (wakeups(pids[tag][0]) - before) / 5
    hz = os.sysconf("SC_CLK_TCK")
    layout = "pinned: proxies and backends on CPU 1, h2load on CPU 0" if PIN else "unpinned"
    print(f"h2load: {SECONDS}s per run, {CONNECTIONS} connections x {STREAMS} streams, "
          f"{THREADS} worker threads per proxy, 3 backends, {ROUNDS} rounds, {layout}", flush=True)
    for tag, per_second in idle.items():
        print(f"idle {tag}: {per_second:.1f} wake-ups per second (all threads, 5 s without traffic)", flush=True)
    order = list(targets)
    results = {t: [] for t in targets}
    for r in range(ROUNDS):
        order = order[1:] + order[:1]  # a different target goes first each round
        for tag in order:
            procs_of = family(pids[tag])
            ticks = cpu_ticks(procs_of)
            res = h2load(targets[tag], work, tag)
            used = (cpu_ticks(procs_of) - ticks) / hz
            calls = res["rps"] * SECONDS
            # The backend itself is the "proxy" of "direct": not a proxy cost.
            res["cpu_us"] = used * 1e6 / calls if calls and tag != "direct" else float("nan")
            statuses_ok(targets[tag], tag)
            results[tag].append(res)
            print(f"round {r + 1} {tag:<12} {res['rps']:>9.0f} calls/s  p50 {res['p50']:7.2f} ms  p99 {res['p99']:7.2f} ms"
                  f"  CPU {res['cpu_us']:5.1f} us/call", flush=True)

    keys = ("rps", "p50", "p99", "cpu_us")
    med = {t: {k: statistics.median(x[k] for x in v) for k in keys} for t, v in results.items()}
    print("\nmedians over the rounds:")
    print(f"{'target':<12} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/call':>12}")
    for t in targets:
        print(f"{t:<12} {med[t]['rps']:>9.0f} {med[t]['p50']:>8.2f} {med[t]['p99']:>8.2f} {med[t]['cpu_us']:>12.1f}")
    print()
    if all(t in med for t in ("weir", "weir-wasm-lc", "weir-wasm-rr")):
        print(f"weir-wasm/weir: throughput ratio {med['weir-wasm-lc']['rps'] / med['weir']['rps']:.2f} "
              f"(least-conn; round-robin {med['weir-wasm-rr']['rps'] / med['weir']['rps']:.2f})")
    for half in [t for t in ("weir-log", "weir-trace") if t in med and "weir" in med]:
        print(f"{half}/weir: throughput ratio {med[half]['rps'] / med['weir']['rps']:.2f}, "
              f"CPU ratio {med[half]['cpu_us'] / med['weir']['cpu_us']:.2f}")
    if "weir-observed" in med and "weir" in med:
        print(f"weir-observed/weir: throughput ratio {med['weir-observed']['rps'] / med['weir']['rps']:.2f} "
              f"(the access log on, 1 % of calls traced), "
              f"CPU ratio {med['weir-observed']['cpu_us'] / med['weir']['cpu_us']:.2f}")
    if "baseline" in med and "weir" in med:
        print(f"weir/baseline: throughput ratio {med['weir']['rps'] / med['baseline']['rps']:.2f}, "
              f"p99 ratio {med['weir']['p99'] / med['baseline']['p99']:.2f}")
    for other in [t for t in ("nginx", "envoy", "haproxy") if t in med and "weir" in med]:
        print(f"weir/{other}: throughput ratio {med['weir']['rps'] / med[other]['rps']:.2f}, "
              f"p99 ratio {med['weir']['p99'] / med[other]['p99']:.2f}")


if __name__ == "__main__":
    main()
