"""Streams a chat answer from a Gantry controller with the Python gRPC client (grpcio):
`gantry.v1.Inference/Chat`, routed by the controller to a ready replica, tokens printed as
they arrive (stubs from the repository's proto/, see gantry_stubs.py).

Usage: chat.py HOST:PORT "question" [model] [max_tokens]
       (model: a deployment's name; default: the only one deployed)
"""

import sys

import grpc

from gantry_stubs import controller, models, print_done, worker


def main():
    addr, question = sys.argv[1], sys.argv[2]
    model = sys.argv[3] if len(sys.argv) > 3 else ""
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    wpb, _ = worker()
    cpb, crpc = controller()
    mpb, mrpc = models()
    channel = grpc.insecure_channel(addr)
    if not model:
        deployed = mrpc.ModelsStub(channel).List(mpb.ListModelsRequest()).models
        if len(deployed) != 1:
            raise SystemExit(f"deployed: {[m.name for m in deployed]}; name one")
        model = deployed[0].name
    request = cpb.ChatRequest(
        model=model,
        messages=[wpb.ChatMessage(role="user", content=question)],
        sampling=wpb.SamplingParams(max_tokens=max_tokens),
    )
    for event in crpc.InferenceStub(channel).Chat(request, timeout=120):
        if event.WhichOneof("event") == "token":
            print(event.token.text, end="", flush=True)
        else:
            print_done(event.done, model)


if __name__ == "__main__":
    main()
