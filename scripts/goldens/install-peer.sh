#!/usr/bin/env bash
# Install the llama.cpp peer (llama-cpp-python, built from source) into
# the repository's .venv-peer (or $PEER_VENV). Idempotent: does nothing when the venv
# already holds the pinned version built with the same CMAKE_ARGS.
#
# Why these flags: a native (-march=native) llama.cpp build on this machine's
# CPU (Sapphire Rapids class, AMX present) dies with SIGILL inside ggml's AMX
# kernel, so the build is pinned to AVX2/FMA/F16C/AVX512 with AMX disabled.
# LLAVA_BUILD=OFF skips the multimodal (mtmd) library, which the goldens and
# benchmark never load; it only saves build time on 2 cores.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PEER_VENV:-$REPO_ROOT/.venv-peer}"
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION="0.3.36"
# sha256 of the PyPI sdist llama_cpp_python-0.3.36.tar.gz (vendors llama.cpp
# commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f).
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"
export MAKEFLAGS="-j2"
export CMAKE_BUILD_PARALLEL_LEVEL=2

# The serving benchmark (bench/worker_vs_llamacpp_server.py) also runs llama-cpp-python's
# OpenAI-compatible server and calls Gantry's worker with grpcio.
EXTRAS=(fastapi==0.165.0 uvicorn==0.54.0 sse-starlette==3.7.0 starlette-context==0.5.1
        pydantic-settings==2.16.3 grpcio==1.85.3 grpcio-tools==1.85.1)
install_extras() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${EXTRAS[@]}"
}

MARKER="$VENV/.llama-cpp-python-build"
WANT_MARKER="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION CMAKE_ARGS=$CMAKE_ARGS"

if [[ -x "$VENV/bin/python" && -f "$MARKER" ]] && [[ "$(cat "$MARKER")" == "$WANT_MARKER" ]] \
   && "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == '$LLAMA_CPP_PYTHON_VERSION' else 1)" 2>/dev/null; then
  install_extras
  echo "install-peer: $VENV already has llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (same build flags) and the server extras"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip >/dev/null

# Requirements file with a hash pins the exact sdist; --no-binary forces a
# source build even if a wheel ever appears; --no-cache-dir stops pip from
# reusing a wheel built earlier with other CMAKE_ARGS.
REQ="$(mktemp)"
trap 'rm -f "$REQ"' EXIT
echo "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION --hash=sha256:$SDIST_SHA256" > "$REQ"

LOG="$VENV/llama-cpp-python-build.log"
echo "install-peer: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (log: $LOG)"
echo "install-peer: CMAKE_ARGS=$CMAKE_ARGS"
start=$(date +%s)
# Install the runtime deps first (without hash checking), then the pinned,
# hash-checked sdist alone with --no-deps.
"$VENV/bin/python" -m pip install "numpy>=1.20.0" "typing-extensions>=4.5.0" "diskcache>=5.6.1" "jinja2>=2.11.3"
"$VENV/bin/python" -m pip install --verbose --no-cache-dir --no-deps --force-reinstall \
  --no-binary llama-cpp-python --require-hashes -r "$REQ" >"$LOG" 2>&1 || {
  echo "install-peer: build failed; last lines of $LOG:" >&2
  tail -n 40 "$LOG" >&2
  exit 1
}
end=$(date +%s)
install_extras
echo "$WANT_MARKER" > "$MARKER"
echo "install-peer: built in $((end - start)) s"
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__); print(llama_cpp.llama_print_system_info().decode())"
