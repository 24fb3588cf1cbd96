"""The Python stubs of proto/weir/example/v1/echo.proto, compiled at run time
with grpcio-tools (shared by the interop client and server)."""
import importlib
import os
import sys
import tempfile

from grpc_tools import protoc


def load_stubs(proto_dir):
    out = tempfile.mkdtemp(prefix="weir-py-")
    rc = protoc.main([
        "protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
        os.path.join(proto_dir, "weir/example/v1/echo.proto"),
    ])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    return (importlib.import_module("weir.example.v1.echo_pb2"),
            importlib.import_module("weir.example.v1.echo_pb2_grpc"))
