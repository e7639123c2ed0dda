"""A real Python gRPC client (grpcio) against a Gantry controller: lists the deployed models,
deploys a second one, waits for it, streams a chat through the controller, watches the
deployment change, scales it to zero and deletes it. Prints what it saw as JSON for the Rust
test (tests/controller_python.rs) to check.

Usage: controller_client.py HOST:PORT MODEL_PATH
"""

import json
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "clients"))
from gantry_stubs import controller, models, worker  # noqa: E402


def main():
    addr, model_path = sys.argv[1], sys.argv[2]
    wpb, _ = worker()
    cpb, crpc = controller()
    mpb, mrpc = models()
    channel = grpc.insecure_channel(addr)
    deployments = crpc.DeploymentsStub(channel)
    out = {"listed": [m.name for m in mrpc.ModelsStub(channel).List(mpb.ListModelsRequest()).models]}

    spec = cpb.DeploymentSpec(
        source=model_path,
        replicas=1,
        context_length=1024,
        placement=cpb.PlacementPolicy(strategy=cpb.PLACEMENT_STRATEGY_SPREAD),
    )
    applied = deployments.Apply(cpb.ApplyRequest(name="py", spec=spec))
    out["generation"] = applied.generation
    deadline = time.time() + 120
    while True:
        d = deployments.Get(cpb.GetDeploymentRequest(name="py"))
        if d.status.ready_replicas == 1:
            break
        if time.time() > deadline:
            raise SystemExit(f"py did not get ready: {d}")
        time.sleep(0.1)
    out["placement"] = [f"{s.worker_id}/gpu:{s.gpu_index}" for s in d.status.replica_status[0].stages]
    out["state"] = cpb.ReplicaState.Name(d.status.replica_status[0].state)

    request = cpb.ChatRequest(
        model="py",
        messages=[wpb.ChatMessage(role="user", content="What is the capital of France?")],
        sampling=wpb.SamplingParams(max_tokens=24),
    )
    text, events, done = "", 0, None
    for event in crpc.InferenceStub(channel).Chat(request, timeout=60):
        events += 1
        if event.WhichOneof("event") == "token":
            text += event.token.text
        else:
            done = event.done
    out["chat"] = {
        "text": text,
        "events": events,
        "completion_tokens": done.usage.completion_tokens,
        "finish_reason": wpb.FinishReason.Name(done.finish_reason),
    }

    watch = deployments.Watch(cpb.WatchDeploymentsRequest(), timeout=30)
    first = next(watch)
    out["watch_first"] = cpb.DeploymentEvent.Kind.Name(first.kind)
    deployments.Scale(cpb.ScaleRequest(name="py", replicas=0))
    for event in watch:
        if event.deployment.name == "py" and event.deployment.spec.replicas == 0:
            out["watch_scaled"] = cpb.DeploymentEvent.Kind.Name(event.kind)
            break
    watch.cancel()
    deployments.Delete(cpb.DeleteDeploymentRequest(name="py"))
    try:
        deployments.Get(cpb.GetDeploymentRequest(name="py"))
        out["after_delete"] = "still there"
    except grpc.RpcError as e:
        out["after_delete"] = e.code().name
    try:
        for _ in crpc.InferenceStub(channel).Chat(cpb.ChatRequest(model="py", messages=request.messages)):
            pass
    except grpc.RpcError as e:
        out["error"] = {"code": e.code().name, "details": e.details()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
