"""Python gRPC stubs for Gantry's API, generated from the repository's proto/ with grpcio-tools
into a temporary folder on first use (nothing generated is committed).

    from gantry_stubs import worker, controller
    pb, rpc = worker()
    cpb, crpc = controller()
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
        files = [
            "gantry/v1/models.proto",
            "gantry/v1/worker.proto",
            "gantry/v1/worker_link.proto",
            "gantry/v1/controller.proto",
        ]
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


def controller():
    """The controller's messages and service stubs (`Inference`, `Deployments`, `Cluster`):
    (controller_pb2, controller_pb2_grpc). Shared messages (`ChatMessage`, `SamplingParams`)
    are in `worker()`'s module; `Models` is in models_pb2(_grpc)."""
    _generate()
    from gantry.v1 import controller_pb2, controller_pb2_grpc

    return controller_pb2, controller_pb2_grpc


def models():
    """The `Models` service: (models_pb2, models_pb2_grpc)."""
    _generate()
    from gantry.v1 import models_pb2, models_pb2_grpc

    return models_pb2, models_pb2_grpc


def print_done(done, label=""):
    """Prints a stream's closing `GenerateDone` on stderr: usage, first token, speed, finish."""
    pb, _ = worker()
    prefix = f"{label}: " if label else ""
    print(
        f"\n[{prefix}{done.usage.prompt_tokens} prompt + {done.usage.completion_tokens} generated tokens, "
        f"first token {done.time_to_first_token_ms:.0f} ms, {done.decode_tokens_per_sec:.1f} tok/s, "
        f"finish: {pb.FinishReason.Name(done.finish_reason)}]",
        file=sys.stderr,
    )
