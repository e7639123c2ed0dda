"""A real Python gRPC client (grpcio) against a Gantry worker, the way a user would write one:
stubs generated from the repository's proto/ with grpcio-tools, then a streamed chat, a
cancelled stream and an error. Prints one JSON object with what it saw.

Usage: worker_client.py HOST:PORT MODEL
"""

import json
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "clients"))
from gantry_stubs import worker as stubs  # noqa: E402


def main():
    addr, model = sys.argv[1], sys.argv[2]
    pb, rpc = stubs()
    channel = grpc.insecure_channel(addr)
    worker = rpc.WorkerStub(channel)
    result = {}

    # A streamed chat answer.
    req = pb.GenerateRequest(
        model_id=model,
        chat=pb.Conversation(messages=[pb.ChatMessage(role="user", content="What is the capital of France?")]),
        sampling=pb.SamplingParams(max_tokens=16, logprobs=True),
        request_id="py-1",
    )
    text, tokens, logprobs, done = "", [], [], None
    for ev in worker.Generate(req, timeout=120):
        which = ev.WhichOneof("event")
        if which == "token":
            text += ev.token.text
            if ev.token.HasField("token_id"):
                tokens.append(ev.token.token_id)
            if ev.token.HasField("logprob"):
                logprobs.append(ev.token.logprob)
        elif which == "done":
            done = ev.done
    result["chat"] = {
        "text": text,
        "tokens": tokens,
        "logprobs": logprobs,
        "finish_reason": pb.FinishReason.Name(done.finish_reason),
        "completion_tokens": done.usage.completion_tokens,
    }

    # A cancelled stream: read three tokens, cancel, and watch the worker go idle.
    long = pb.GenerateRequest(
        model_id=model,
        prompt="Once upon a time",
        sampling=pb.SamplingParams(max_tokens=4000, ignore_eos=True),
    )
    call = worker.Generate(long)
    read = 0
    for ev in call:
        if ev.WhichOneof("event") == "token":
            read += 1
        if read == 3:
            call.cancel()
            break
    deadline = time.time() + 10
    while True:
        status = worker.Status(pb.StatusRequest())
        m = [x for x in status.models if x.info.model_id == model][0]
        if m.running == 0:
            break
        if time.time() > deadline:
            raise SystemExit("the generation still runs 10 s after the cancel")
        time.sleep(0.02)
    result["cancel"] = {"read": read, "tokens_generated": m.tokens_generated}

    # An error: the gRPC code and message as Python sees them.
    try:
        list(worker.Generate(pb.GenerateRequest(model_id="missing", prompt="hi")))
        result["error"] = None
    except grpc.RpcError as e:
        result["error"] = {"code": e.code().name, "details": e.details()}

    print(json.dumps(result))


if __name__ == "__main__":
    main()
