#!/usr/bin/env python3
"""Evaluates the chart's ValidatingAdmissionPolicy for the controller's pod patches (rendered
chart on the command line) with a CEL interpreter (cel-python), as the API server would: a
patch is refused when the policy's match condition holds and any validation is false. There is
no API server here; this checks the expressions themselves on the patch the controller makes
and on the ones it must not be able to make. Exits 1 with the failing cases."""
import copy
import sys

import celpy
import yaml

LEADER = "gantry.dev/leader"


def pod(component, leader=None):
    labels = {"app.kubernetes.io/name": "gantry", "app.kubernetes.io/instance": "gantry",
              "app.kubernetes.io/component": component, "pod-template-hash": "5d9f"}
    if leader is not None:
        labels[LEADER] = leader
    return {"metadata": {"name": f"gantry-{component}-x", "namespace": "gantry", "labels": labels},
            "spec": {"containers": [{"name": component, "image": "ghcr.io/gantry/gantry:0.1.0"}]}}


def main():
    docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
    policy = next(d for d in docs if d.get("kind") == "ValidatingAdmissionPolicy")
    env = celpy.Environment()
    compile_ = lambda e: env.program(env.compile(e))  # noqa: E731
    conditions = [compile_(c["expression"]) for c in policy["spec"]["matchConditions"]]
    validations = [(compile_(v["expression"]), v["message"]) for v in policy["spec"]["validations"]]
    controller_sa = "system:serviceaccount:gantry:gantry-controller"

    def decide(user, old, new):
        """None when allowed, else the first failing validation's message."""
        act = {"request": celpy.json_to_cel({"userInfo": {"username": user}}),
               "object": celpy.json_to_cel(new), "oldObject": celpy.json_to_cel(old)}
        if not all(bool(c.evaluate(act)) for c in conditions):
            return None
        for prog, message in validations:
            try:
                ok = prog.evaluate(act)
            except Exception as e:  # an error in an expression denies, as failurePolicy: Fail does
                return f"error: {e}"
            if not isinstance(ok, celpy.celtypes.BoolType) or not bool(ok):
                return message
        return None

    def changed(p, fn):
        q = copy.deepcopy(p)
        fn(q)
        return q

    ctrl, ctrl_leader, worker = pod("controller"), pod("controller", "true"), pod("worker")
    cases = [
        ("the leader labels its own pod", controller_sa, ctrl, ctrl_leader, None),
        ("a pod clears its leader label", controller_sa, ctrl_leader, ctrl, None),
        ("the controller labels a worker's pod", controller_sa, worker,
         changed(worker, lambda q: q["metadata"]["labels"].update({LEADER: "true"})), "only its own pods"),
        ("the controller changes its pod's image", controller_sa, ctrl,
         changed(ctrl, lambda q: q["spec"]["containers"][0].update({"image": "evil:1"})), "spec"),
        ("the controller relabels its pod as a worker", controller_sa, ctrl,
         changed(ctrl, lambda q: q["metadata"]["labels"].update({"app.kubernetes.io/component": "worker"})),
         "no pod label but gantry.dev/leader"),
        ("the controller drops a label of its pod", controller_sa, ctrl,
         changed(ctrl, lambda q: q["metadata"]["labels"].pop("pod-template-hash")), "no pod label but gantry.dev/leader"),
        ("the controller annotates its pod", controller_sa, ctrl,
         changed(ctrl, lambda q: q["metadata"].update({"annotations": {"x": "y"}})), "annotations"),
        ("someone else changes a pod (the policy does not apply)", "system:node:n1", ctrl,
         changed(ctrl, lambda q: q["spec"]["containers"][0].update({"image": "other:1"})), None),
    ]
    failures = []
    for what, user, old, new, want in cases:
        got = decide(user, old, new)
        ok = got is None if want is None else (got is not None and want in got)
        print(f"check-pod-policy: {'ok  ' if ok else 'FAIL'} {what}: {'allowed' if got is None else 'refused: ' + got}")
        if not ok:
            failures.append(what)
    if failures:
        print(f"check-pod-policy: {len(failures)} case(s) wrong: {failures}")
        sys.exit(1)


if __name__ == "__main__":
    main()
