"""An OTLP/gRPC trace receiver nobody here wrote the protocol of: the
TraceService of the `opentelemetry-proto` package, served with grpcio.

Prints `listening on PORT` once it serves, then one JSON line per span it
receives (flushed at once):
  {"trace_id", "span_id", "parent_span_id" (hex, "" for a root), "name",
   "kind" (SERVER, CLIENT, ...), "attributes" {key: value}, "status"
   {"code": UNSET|OK|ERROR, "message"}, "events" [{"name", "attributes"}],
   "service" (the resource's service.name)}
With --quiet it prints nothing per span, and the number of spans received
when it stops (a receiver for load benchmarks). Runs until SIGTERM.

usage: otlp_collector.py [--port N] [--quiet]
"""
import argparse
import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2

LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, quiet):
        self.quiet, self.received = quiet, 0

    def Export(self, request, context):
        if self.quiet:
            with LOCK:
                self.received += sum(len(ss.spans) for rs in request.resource_spans
                                     for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        lines = []
        for rs in request.resource_spans:
            service = attributes(rs.resource.attributes).get("service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(json.dumps({
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": trace_pb2.Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                        "attributes": attributes(s.attributes),
                        "status": {
                            "code": trace_pb2.Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                            "message": s.status.message,
                        },
                        "events": [{"name": e.name, "attributes": attributes(e.attributes)}
                                   for e in s.events],
                        "service": service,
                    }))
        with LOCK:
            for line in lines:
                sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    traces = Traces(args.quiet)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(traces, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"listening on {port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()
    if args.quiet:
        print(f"received {traces.received} spans", flush=True)


if __name__ == "__main__":
    main()
