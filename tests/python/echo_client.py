"""A gRPC client nobody here wrote (Python grpcio) calling through weir.

Compiles proto/weir/example/v1/echo.proto with grpcio-tools, then checks every
call kind, metadata and trailers, an error with details, a deadline, and a
16 MiB message. Exits non-zero, naming the check, on any failure.

usage: echo_client.py HOST:PORT PROTO_DIR [CA CERT KEY]
With CA, CERT and KEY (PEM files) it calls over TLS, presenting CERT.
"""
import sys

import grpc
from stubs import load_stubs


def main():
    target, proto_dir = sys.argv[1], sys.argv[2]
    pb, rpc = load_stubs(proto_dir)
    big = 64 * 1024 * 1024
    options = [("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)]
    if len(sys.argv) > 3:
        ca, cert, key = (open(p, "rb").read() for p in sys.argv[3:6])
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        # The gateway's certificate names localhost; the target is an address.
        options.append(("grpc.ssl_target_name_override", "localhost"))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    stub = rpc.EchoStub(channel)
    checks = []

    def check(name, cond, detail=""):
        if not cond:
            sys.exit(f"FAILED {name}: {detail}")
        checks.append(name)

    reply, call = stub.Unary.with_call(
        pb.EchoRequest(message="py"),
        metadata=[("x-echo-lang", "python"), ("x-echo-raw-bin", b"\x00\x01\xff")], timeout=10)
    meta = dict(call.initial_metadata())
    check("unary", reply.message == "py" and reply.instance, reply)
    check("metadata", meta.get("x-echo-lang") == "python" and meta.get("x-echo-raw-bin") == b"\x00\x01\xff", meta)

    reply = stub.ClientStream(iter([pb.EchoRequest(message=f"m{i}") for i in range(6)]), timeout=10)
    check("client streaming", reply.count == 6 and reply.message == "m5", reply)

    replies = list(stub.ServerStream(pb.EchoRequest(message="s", repeat=5), timeout=10))
    check("server streaming", [r.count for r in replies] == [1, 2, 3, 4, 5], replies)

    replies = list(stub.Bidi(iter([pb.EchoRequest(message=f"b{i}") for i in range(4)]), timeout=10))
    check("bidi streaming", [r.message for r in replies] == ["b0", "b1", "b2", "b3"], replies)

    try:
        stub.Unary(pb.EchoRequest(message="f", fail_code=grpc.StatusCode.NOT_FOUND.value[0]), timeout=10)
        check("error status", False, "no error")
    except grpc.RpcError as e:
        trailers = dict(e.trailing_metadata() or ())
        check("error status", e.code() == grpc.StatusCode.NOT_FOUND and "failed as asked" in e.details(), e)
        check("trailers", trailers.get("x-trailer-bin") == b"\x00\xffbin"
              and trailers.get("grpc-status-details-bin") == b"\x08\x2a details", trailers)

    try:
        stub.Unary(pb.EchoRequest(message="slow", delay_ms=3000), timeout=0.3)
        check("deadline", False, "no error")
    except grpc.RpcError as e:
        check("deadline", e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e)

    payload = bytes(i % 251 for i in range(16 * 1024 * 1024 + 1))
    reply = stub.Unary(pb.EchoRequest(message="big", payload=payload), timeout=30)
    check("16 MiB message", reply.payload == payload, len(reply.payload))

    print("grpcio through weir: all checks ok:", ", ".join(checks))


if __name__ == "__main__":
    main()
