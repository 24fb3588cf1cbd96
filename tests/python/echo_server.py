"""A gRPC server nobody here wrote (Python grpcio, C-core's HTTP/2) for weir
to front: the Echo service of proto/weir/example/v1/echo.proto and the
standard grpc.health.v1 service, both with C-core's default HTTP/2 rules
(one ping per 5 minutes without data, GOAWAY ENHANCE_YOUR_CALM on the third
strike) unless told otherwise.

Prints `listening on PORT` once it serves. On SIGTERM it stops gracefully:
GOAWAY, then up to --grace seconds for calls in flight, then exits.

usage: echo_server.py PROTO_DIR NAME [--port N] [--max-concurrent-streams N] [--grace S]
"""
import argparse
import signal
import threading
import time
from concurrent import futures

import grpc
from stubs import load_stubs

SERVING = b"\x08\x01"  # grpc.health.v1.HealthCheckResponse{status: SERVING}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("proto_dir")
    parser.add_argument("name")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-concurrent-streams", type=int, default=0)
    parser.add_argument("--grace", type=float, default=10.0)
    args = parser.parse_args()
    pb, rpc = load_stubs(args.proto_dir)

    class Echo(rpc.EchoServicer):
        def _wait(self, request, context):
            deadline = time.monotonic() + request.delay_ms / 1000.0
            while time.monotonic() < deadline and context.is_active():
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

        def Unary(self, request, context):
            self._wait(request, context)
            if request.fail_code:
                code = next(c for c in grpc.StatusCode if c.value[0] == request.fail_code)
                context.abort(code, f"asked to fail with {request.fail_code}")
            return pb.EchoReply(message=request.message, payload=request.payload,
                                instance=args.name)

        def ServerStream(self, request, context):
            for i in range(max(1, request.repeat)):
                self._wait(request, context)
                yield pb.EchoReply(message=request.message, instance=args.name, count=i + 1)

        def ClientStream(self, request_iterator, context):
            count, last = 0, ""
            for r in request_iterator:
                count, last = count + 1, r.message
            return pb.EchoReply(message=last, instance=args.name, count=count)

        def Bidi(self, request_iterator, context):
            for r in request_iterator:
                yield pb.EchoReply(message=r.message, instance=args.name)

    def health_check(request, context):
        return SERVING

    def health_watch(request, context):
        yield SERVING
        # A quiet stream: nothing more to say until the client goes away.
        done = threading.Event()
        context.add_callback(done.set)
        done.wait()

    identity = lambda b: b
    health = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(
            health_check, request_deserializer=identity, response_serializer=identity),
        "Watch": grpc.unary_stream_rpc_method_handler(
            health_watch, request_deserializer=identity, response_serializer=identity),
    })
    options = []
    if args.max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", args.max_concurrent_streams))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256), options=options,
                         maximum_concurrent_rpcs=None)
    rpc.add_EchoServicer_to_server(Echo(), server)
    server.add_generic_rpc_handlers((health,))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"listening on {port}", flush=True)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    stopping.wait()
    server.stop(args.grace).wait()


if __name__ == "__main__":
    main()
