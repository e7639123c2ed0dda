"""Streams a chat answer from a Gantry worker with the Python gRPC client (grpcio), printing
tokens as they arrive (stubs from the repository's proto/, see gantry_stubs.py).

Usage: worker_chat.py HOST:PORT MODEL "question" [max_tokens]
"""

import sys

import grpc

from gantry_stubs import print_done
from gantry_stubs import worker as worker_stubs


def main():
    addr, model, question = sys.argv[1], sys.argv[2], sys.argv[3]
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    pb, rpc = worker_stubs()
    worker = rpc.WorkerStub(grpc.insecure_channel(addr))
    request = pb.GenerateRequest(
        model_id=model,
        chat=pb.Conversation(messages=[pb.ChatMessage(role="user", content=question)]),
        sampling=pb.SamplingParams(max_tokens=max_tokens),
    )
    for event in worker.Generate(request):
        if event.WhichOneof("event") == "token":
            print(event.token.text, end="", flush=True)
        else:
            print_done(event.done)


if __name__ == "__main__":
    main()
