#!/usr/bin/env python3
"""`make bench-hostile`: the slow-reader test of tests/it/hostile.rs, run the
same way against weir, HAProxy, Envoy and nginx (as `make bench-load` starts
them, in front of one release-built echo backend) and the backend directly.

One client (grpcio) opens 8 ServerStream calls of 20,000 replies of 7 KB each
and never reads them. Another client then makes 40 unary calls, each with a
2 s deadline. Printed per target: how many of the 40 succeeded and their p50
and p99 latency. Target for weir: 40 of 40.

Everything listens on 127.0.0.1; every call is bounded in time.
Run with the project's virtualenv Python (grpcio): `.venv/bin/python benches/hostile.py`.
"""
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "python"))

import grpc  # noqa: E402

import load  # noqa: E402
from stubs import load_stubs  # noqa: E402

HOGS = 8
CALLS = 40


def slow_reader(port, pb, rpc):
    target = f"127.0.0.1:{port}"
    hog = grpc.insecure_channel(target)
    unread = [rpc.EchoStub(hog).ServerStream(
        pb.EchoRequest(message=f"hog {i}", repeat=20_000, payload=b"x" * 7 * 1024), timeout=60)
        for i in range(HOGS)]
    time.sleep(1.0)  # the hogs' replies fill what they can
    other = rpc.EchoStub(grpc.insecure_channel(target))
    ok, latencies = 0, []
    for i in range(CALLS):
        began = time.monotonic()
        try:
            other.Unary(pb.EchoRequest(message=f"other {i}"), timeout=2)
            ok += 1
            latencies.append((time.monotonic() - began) * 1000)
        except grpc.RpcError:
            pass
    for call in unread:
        call.cancel()
    hog.close()
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
    return ok, p(0.5), p(0.99)


def main():
    pb, rpc = load_stubs(os.path.join(load.ROOT, "proto"))
    work = tempfile.mkdtemp(prefix="weir-hostile-")
    procs = load.Processes(work)
    try:
        targets, _pids = load.start_targets(work, procs, backend_count=1)
        print(f"slow reader: {HOGS} unread ServerStream calls (20,000 x 7 KB), then {CALLS} unary calls "
              f"with a 2 s deadline from another client", flush=True)
        print(f"{'target':<8} {'succeeded':>9} {'p50 ms':>8} {'p99 ms':>8}")
        for tag in ("direct", "weir", "haproxy", "envoy", "nginx"):
            ok, p50, p99 = slow_reader(targets[tag], pb, rpc)
            print(f"{tag:<8} {ok:>6}/{CALLS} {p50:>8.1f} {p99:>8.1f}", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
