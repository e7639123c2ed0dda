"""Python gRPC stubs for Gantry's API, generated from the repository's proto/ with grpcio-tools
into a temporary folder on first use (nothing generated is committed).

    from gantry_stubs import worker
    pb, rpc = worker()
"""

import os
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
_generated = None


def _generate():
    global _generated
    if _generated is None:
        from grpc_tools import protoc

        out = tempfile.mkdtemp(prefix="gantry-py-stubs-")
        proto = os.path.join(ROOT, "proto", "proto")
        files = ["gantry/v1/models.proto", "gantry/v1/worker.proto", "gantry/v1/worker_link.proto"]
        if protoc.main(["protoc", f"-I{proto}", f"--python_out={out}", f"--grpc_python_out={out}", *files]) != 0:
            raise SystemExit("protoc could not compile proto/")
        sys.path.insert(0, out)
        _generated = out
    return _generated


def worker():
    """The `gantry.v1.Worker` messages and service stubs: (worker_pb2, worker_pb2_grpc)."""
    _generate()
    from gantry.v1 import worker_pb2, worker_pb2_grpc

    return worker_pb2, worker_pb2_grpc
