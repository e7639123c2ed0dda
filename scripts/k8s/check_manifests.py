#!/usr/bin/env python3
"""Offline checks of Gantry's Kubernetes manifests (run by scripts/validate-manifests.sh).

Every object of every file given is checked:
  - built-in kinds against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships, in
    strict mode (unknown fields are errors), for one Kubernetes version;
  - ModelDeployments (gantry.dev) against the openAPIV3Schema of the generated CRD, read the
    way the API server reads it: OpenAPI's `nullable` and boolean exclusive bounds, and
    unknown fields rejected (kubectl's default strict field validation) except where the
    schema keeps them (x-kubernetes-preserve-unknown-fields).

Modes:
  --crd-contract       the CRD file also has to match the contract the controller relies on
                       (names, scope, versions, subresources, printer columns, spec fields)
  --policy             the objects are one rendered chart: also check the security and
                       wiring rules the chart promises (non-root, read-only root, no
                       capabilities, seccomp, resources, namespaced least-privilege RBAC,
                       Services that select pods, workers that dial an existing Service)
  --expect-invalid     every file holds one object that must be REJECTED; "# expect: TEXT"
                       lines in the file name texts that the rejection has to mention

Exits 1 when anything fails, printing each failure.
"""

import argparse
import copy
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

GROUP = "gantry.dev"
# KEDA's ScaledObject (the chart's optional keda.scaledObjects), checked against the fields the
# chart renders (scripts/k8s/keda-scaledobject.schema.json): no schema of it ships with Kubernetes.
KEDA_SCHEMA = __import__("pathlib").Path(__file__).with_name("keda-scaledobject.schema.json")
KIND = "ModelDeployment"
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class Failures:
    def __init__(self):
        self.items = []

    def add(self, where, what):
        self.items.append(f"{where}: {what}")


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    return text, docs


def describe(obj):
    if not isinstance(obj, dict):
        return "(not an object)"
    name = (obj.get("metadata") or {}).get("name", "?")
    return f"{obj.get('kind', '?')}/{name}"


# ---------------------------------------------------------------------------------------------
# The CRD's schema, as JSON Schema


def to_json_schema(node, root=True):
    """Turns a Kubernetes structural (OpenAPI v3) schema into JSON Schema with the API
    server's meaning."""
    if isinstance(node, list):
        return [to_json_schema(n, root=False) for n in node]
    if not isinstance(node, dict):
        return node
    s = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            s[key] = {k: to_json_schema(v, root=False) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            s[key] = value if isinstance(value, bool) else to_json_schema(value, root=False)
        elif key in ("allOf", "anyOf", "oneOf"):
            # In a structural schema these only constrain; their branches carry no types.
            s[key] = [to_json_schema(v, root=False) for v in value]
        else:
            s[key] = value
    # OpenAPI 3.0: `nullable: true` admits null.
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"] if isinstance(s["type"], str) else list(s["type"]) + ["null"]
    # OpenAPI 3.0 / draft 4: boolean exclusive bounds qualify minimum/maximum.
    for excl, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(s.get(excl), bool):
            if s[excl] and bound in s:
                s[excl] = s.pop(bound)
            else:
                del s[excl]
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = s.pop("x-kubernetes-preserve-unknown-fields", False)
    # Unknown fields are rejected by the API server (kubectl apply's default field validation
    # is Strict) wherever the schema lists the properties and does not keep unknown ones.
    if not root and "properties" in s and "additionalProperties" not in s and not preserve:
        s["additionalProperties"] = False
    for k in list(s):
        if k.startswith("x-kubernetes-"):
            del s[k]
    return s


def crd_from(path):
    """The CRD object, or None and why not."""
    try:
        _, docs = load_docs(path)
    except OSError as e:
        return None, f"cannot read the CRD: {e.strerror}"
    except yaml.YAMLError as e:
        return None, f"the CRD is not YAML: {e}"
    crds = [d for d in docs if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        return None, f"expected one CustomResourceDefinition, found {len(crds)}"
    return crds[0], None


class CrdSchemas:
    """The ModelDeployment versions the CRD serves, each with its JSON Schema validator."""

    def __init__(self, crd):
        self.validators = {}
        self.cel_rules = 0
        for v in crd.get("spec", {}).get("versions", []):
            schema = ((v.get("schema") or {}).get("openAPIV3Schema")) or {}
            self.cel_rules += str(schema).count("x-kubernetes-validations")
            if v.get("served"):
                js = to_json_schema(schema)
                jsonschema.Draft7Validator.check_schema(js)
                self.validators[v["name"]] = jsonschema.Draft7Validator(js)

    def errors(self, obj):
        api = obj.get("apiVersion", "")
        version = api.split("/", 1)[1] if "/" in api else ""
        if obj.get("kind") != KIND:
            return [f"kind {obj.get('kind')!r} is not {KIND} (the only kind of {GROUP})"]
        if version not in self.validators:
            return [f"apiVersion {api!r} is not served by the CRD (served: "
                    f"{', '.join(GROUP + '/' + v for v in sorted(self.validators))})"]
        errs = []
        extra = set(obj) - {"apiVersion", "kind", "metadata", "spec", "status"}
        if extra:
            errs.append(f"unknown top-level field(s): {', '.join(sorted(extra))}")
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not meta.get("name"):
            errs.append("metadata.name is required")
        elif not DNS1123_SUBDOMAIN.match(meta["name"]) or len(meta["name"]) > 253:
            errs.append(f"metadata.name {meta['name']!r} is not a DNS-1123 subdomain")
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        for e in sorted(self.validators[version].iter_errors(body), key=lambda e: list(e.absolute_path)):
            errs.append(f"{path_of(e)}: {e.message}")
        return errs


def path_of(error):
    parts = [str(p) if isinstance(p, str) else f"[{p}]" for p in error.absolute_path]
    return ".".join(parts).replace(".[", "[") or "(root)"


def builtin_errors(obj, kube_version):
    try:
        kubernetes_validate.validate(obj, kube_version, strict=True)
        return []
    except kubernetes_validate.ValidationError as e:
        return [f"{path_of(e)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]


def object_errors(obj, kube_version, crd_schemas, crd_problem):
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        return ["not a Kubernetes object (apiVersion and kind are required)"]
    if str(obj["apiVersion"]).split("/")[0] == GROUP:
        if crd_schemas is None:
            return [f"cannot check a {GROUP} object without the CRD: {crd_problem}"]
        return crd_schemas.errors(obj)
    if str(obj["apiVersion"]).split("/")[0] == "keda.sh":
        import json
        validator = jsonschema.Draft202012Validator(json.loads(KEDA_SCHEMA.read_text()))
        return [f"{path_of(e)}: {e.message}" for e in validator.iter_errors(obj)]
    return builtin_errors(obj, kube_version)


# ---------------------------------------------------------------------------------------------
# The CRD contract


def check_contract(crd, where, failures):
    def need(cond, what):
        if not cond:
            failures.add(where, f"CRD contract: {what}")

    spec = crd.get("spec", {})
    names = spec.get("names", {})
    need(crd.get("apiVersion") == "apiextensions.k8s.io/v1", "apiVersion apiextensions.k8s.io/v1")
    need((crd.get("metadata") or {}).get("name") == f"modeldeployments.{GROUP}",
         f"metadata.name modeldeployments.{GROUP}")
    need(spec.get("group") == GROUP, f"group {GROUP}")
    need(names.get("kind") == KIND, f"kind {KIND}")
    need(names.get("plural") == "modeldeployments", "plural modeldeployments")
    need("md" in (names.get("shortNames") or []), "short name md")
    need(spec.get("scope") == "Namespaced", "scope Namespaced")
    versions = {v.get("name"): v for v in spec.get("versions", [])}
    v = versions.get("v1alpha1")
    need(v is not None, "version v1alpha1")
    if v is None:
        return
    need(v.get("served") and v.get("storage"), "v1alpha1 served and stored")
    sub = v.get("subresources") or {}
    need("status" in sub, "status subresource")
    scale = sub.get("scale") or {}
    need(scale.get("specReplicasPath") == ".spec.replicas", "scale specReplicasPath .spec.replicas")
    need(scale.get("statusReplicasPath") == ".status.replicas", "scale statusReplicasPath .status.replicas")
    need(scale.get("labelSelectorPath") == ".status.selector", "scale labelSelectorPath .status.selector")
    columns = [c.get("name") for c in v.get("additionalPrinterColumns") or []]
    need(columns == ["Model", "Replicas", "Ready", "VRAM", "Status", "Age"],
         f"printer columns Model, Replicas, Ready, VRAM, Status, Age (found {', '.join(map(str, columns))})")
    schema = (v.get("schema") or {}).get("openAPIV3Schema") or {}
    props = schema.get("properties") or {}
    spec_props = (props.get("spec") or {}).get("properties") or {}
    for field in ("model", "dtype", "contextLength", "replicas", "sampling", "placement",
                  "stageWireDtype", "hfTokenSecret"):
        need(field in spec_props, f"spec.{field}")
    status_props = (props.get("status") or {}).get("properties") or {}
    for field in ("replicas", "readyReplicas", "selector", "observedGeneration", "phase",
                  "vramPerReplica", "conditions", "replicaStatus"):
        need(field in status_props, f"status.{field}")


# ---------------------------------------------------------------------------------------------
# Rules for one rendered chart


def pod_spec_of(obj):
    if obj.get("kind") in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return None


def check_policy(objs, where, failures):
    services = {o["metadata"]["name"]: o for o in objs if o.get("kind") == "Service"}
    workloads = [o for o in objs if pod_spec_of(o) is not None]
    for o in objs:
        if o.get("kind") in ("ClusterRole", "ClusterRoleBinding"):
            failures.add(where, f"{describe(o)}: the chart's RBAC must stay namespaced")
        if o.get("kind") == "Role":
            for rule in o.get("rules") or []:
                for field in ("apiGroups", "resources", "verbs"):
                    if "*" in (rule.get(field) or []):
                        failures.add(where, f"{describe(o)}: wildcard in {field}")
                if "secrets" in (rule.get("resources") or []) and set(rule.get("verbs") or []) - {"get"}:
                    failures.add(where, f"{describe(o)}: secrets may only be read one by one (get)")
                if "secrets" in (rule.get("resources") or []) and not rule.get("resourceNames"):
                    failures.add(where, f"{describe(o)}: secrets may only be read by name (resourceNames)")
    for o in workloads:
        name = describe(o)
        pod = pod_spec_of(o)
        labels = ((o["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
        psc = pod.get("securityContext") or {}
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            failures.add(where, f"{name}: pod seccompProfile is not RuntimeDefault")
        containers = [("container", c) for c in pod.get("containers") or []]
        containers += [("init container", c) for c in pod.get("initContainers") or []]
        for what, c in containers:
            cname = f"{name} {what} {c.get('name')}"
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                failures.add(where, f"{cname}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                failures.add(where, f"{cname}: readOnlyRootFilesystem is not true")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                failures.add(where, f"{cname}: capabilities do not drop ALL")
            added = set((sc.get("capabilities") or {}).get("add") or [])
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
            # One exception: the init container that hands the hostPath cache to the worker's
            # uid runs as root with CAP_CHOWN alone.
            if what == "init container" and added == {"CHOWN"} and (c.get("command") or [""])[0] == "chown":
                pass
            elif added:
                failures.add(where, f"{cname}: adds capabilities {sorted(added)}")
            elif not non_root:
                failures.add(where, f"{cname}: does not run as non-root")
            if c.get("privileged") or sc.get("privileged"):
                failures.add(where, f"{cname}: privileged")
            res = c.get("resources") or {}
            if not res.get("requests"):
                failures.add(where, f"{cname}: no resource requests")
            image = str(c.get("image", ""))
            if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
                failures.add(where, f"{cname}: image {image!r} has no fixed tag")
            for arg in c.get("args") or []:
                m = re.match(r"^--controller=https?://([^:/]+)", str(arg))
                if m and m.group(1) not in services:
                    failures.add(where, f"{cname}: --controller names {m.group(1)!r}, which is no Service of the chart")
        for arg in [a for c in pod.get("containers") or [] for a in c.get("args") or []]:
            if str(arg).startswith("--lease-name=") and o.get("kind") != "Deployment":
                failures.add(where, f"{name}: leader election outside a Deployment")
        o["_labels"] = labels
    # Every workload's pods are selected by a NetworkPolicy (the chart's default; a chart
    # rendered with networkPolicy.enabled=false is the operator's choice and says so).
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    if policies:
        for w in workloads:
            if not any(all(w["_labels"].get(k) == v for k, v in
                           (((p.get("spec") or {}).get("podSelector") or {}).get("matchLabels") or {}).items())
                       for p in policies):
                failures.add(where, f"{describe(w)}: no NetworkPolicy selects its pods")
    elif workloads:
        failures.add(where, "no NetworkPolicy: workers and etcd are open to every pod (networkPolicy.enabled)")
    # The controller authenticates its callers (--api-keys) and every worker sends a key: a
    # worker listening beyond loopback without one (or TLS) refuses to start, and a controller
    # without keys serves anyone who reaches its Service.
    for w in workloads:
        for c in pod_spec_of(w).get("containers") or []:
            args = [str(a) for a in c.get("args") or []]
            env = {e.get("name") for e in c.get("env") or []}
            if args[:1] == ["controller"] and not any(a.startswith("--tls-cert") for a in args):
                failures.add(where, f"{describe(w)}: the controller serves gRPC and HTTP in plain text (controller.tls.enabled)")
            if args[:1] == ["controller"] and not any(a.startswith("--api-keys") for a in args):
                failures.add(where, f"{describe(w)}: the controller runs without --api-keys (apiKeys.generate)")
            etcd = [a.split("=", 1)[1] for a in args if a.startswith("--etcd=")]
            if args[:1] == ["controller"] and etcd:
                if any(url.startswith("http://") for url in etcd[0].split(",")):
                    failures.add(where, f"{describe(w)}: the controller talks to etcd in plaintext (etcd.tls.enabled)")
                elif not any(a.startswith("--etcd-cert") for a in args):
                    failures.add(where, f"{describe(w)}: the controller shows etcd no client certificate")
            command = [str(a) for a in c.get("command") or []]
            if command[:1] == ["etcd"]:
                for flag in ("--client-cert-auth", "--peer-client-cert-auth"):
                    if flag not in command:
                        failures.add(where, f"{describe(w)}: etcd runs without {flag} (etcd.tls.enabled)")
            tls = any(a.startswith("--tls-cert") for a in args)
            if args[:1] == ["worker"] and "GANTRY_API_KEY" not in env and not tls:
                failures.add(where, f"{describe(w)}: the workers send no API key and serve no TLS (apiKeys.generate)")
    # The leader controller labels its own pod at run time (gantry.dev/leader=true), so that
    # label is matched by the controller's pods though their template cannot carry it.
    runtime_labels = {"gantry.dev/leader": "true"}
    for s in services.values():
        sel = (s.get("spec") or {}).get("selector") or {}
        static = {k: v for k, v in sel.items() if runtime_labels.get(k) != v}
        if not any(all(w["_labels"].get(k) == v for k, v in static.items()) for w in workloads):
            failures.add(where, f"{describe(s)}: its selector {sel} matches no pod template")
    for o in workloads:
        o.pop("_labels", None)


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kube-version", required=True)
    ap.add_argument("--crd", required=True, help="the generated ModelDeployment CRD")
    ap.add_argument("--crd-contract", action="store_true")
    ap.add_argument("--policy", action="store_true")
    ap.add_argument("--expect-invalid", action="store_true")
    ap.add_argument("--label", default=None, help="name for this set of files in messages")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()

    failures = Failures()
    checked = 0
    crd, crd_problem = crd_from(args.crd)
    crd_problem = crd_problem and f"{args.crd}: {crd_problem}"
    crd_schemas = None
    if crd is None and args.crd_contract:
        failures.add(args.crd, crd_problem)
    if crd is not None:
        try:
            crd_schemas = CrdSchemas(crd)
        except jsonschema.SchemaError as e:
            crd_problem = f"{args.crd}: openAPIV3Schema is not a valid schema: {e.message}"
            failures.add(args.crd, crd_problem)
        if args.crd_contract:
            for err in builtin_errors(crd, args.kube_version):
                failures.add(args.crd, f"{describe(crd)}: {err}")
            check_contract(crd, args.crd, failures)
            checked += 1
        if crd_schemas is not None and crd_schemas.cel_rules:
            print(f"note: {args.crd} has x-kubernetes-validations (CEL) rules; they are not "
                  "evaluated offline", file=sys.stderr)

    all_objs = []
    for path in args.files:
        try:
            text, docs = load_docs(path)
        except yaml.YAMLError as e:
            failures.add(path, f"not YAML: {e}")
            continue
        if args.expect_invalid:
            expects = re.findall(r"^#\s*expect:\s*(.+?)\s*$", text, flags=re.M)
            if len(docs) != 1 or not expects:
                failures.add(path, "a negative case holds one object and at least one '# expect:' line")
                continue
            errs = object_errors(docs[0], args.kube_version, crd_schemas, crd_problem)
            checked += 1
            if crd_schemas is None and str(docs[0].get("apiVersion", "")).startswith(GROUP):
                failures.add(path, f"not checked: {crd_problem}")
            elif not errs:
                failures.add(path, f"{describe(docs[0])} was ACCEPTED but must be rejected ({'; '.join(expects)})")
            else:
                joined = " | ".join(errs)
                missing = [x for x in expects if x not in joined]
                if missing:
                    failures.add(path, f"rejected, but not for {missing}: {joined}")
                else:
                    print(f"  rejected as expected: {path}: {joined}", file=sys.stderr)
            continue
        if not docs:
            failures.add(path, "no objects")
        for obj in docs:
            checked += 1
            for err in object_errors(obj, args.kube_version, crd_schemas, crd_problem):
                failures.add(path, f"{describe(obj)}: {err}")
            if isinstance(obj, dict):
                all_objs.append(copy.deepcopy(obj))
    if args.policy:
        check_policy(all_objs, args.label or "rendered chart", failures)

    label = args.label or ", ".join(args.files) or args.crd
    if failures.items:
        print(f"  {label}: {len(failures.items)} problem(s) in {checked} object(s):", file=sys.stderr)
        for item in failures.items:
            print(f"    - {item}", file=sys.stderr)
        return 1
    kind = "rejected" if args.expect_invalid else "valid"
    print(f"  ok: {label}: {checked} object(s) {kind} (Kubernetes {args.kube_version})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
