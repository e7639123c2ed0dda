#!/usr/bin/env bash
# Builds the C++ peer Gantry's benchmarks compare with: llama.cpp's own `llama-bench` (single
# stream: prefill and decode) and `llama-server` (concurrent streams, continuous batching), from
# the llama.cpp sources the llama-cpp-python 0.3.36 sdist on PyPI vendors (llama.cpp commit
# 0c1e57098bba43ac29e6e3b677cdceebdd22334f), into bench/peer/.llama.cpp/ (git-ignored).
# Nothing is installed system-wide: cmake and ninja come from PyPI into a venv beside the build.
#
# The flags: a native (-march=native) build dies with SIGILL in ggml's AMX kernel on this
# machine's CPU, so the build is pinned to AVX2/FMA/F16C/AVX-512 with AMX off (the same flags
# as scripts/goldens/install-peer.sh).
#
#   bench/peer/build-llamacpp.sh          # build (skipped when the same build is there)
#   bench/peer/build-llamacpp.sh --path   # print the bin/ folder
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$root/bench/peer/.llama.cpp"
bin="$out/bin"
if [[ "${1:-}" == --path ]]; then
  echo "$bin"
  exit 0
fi

VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
stamp="llama-cpp-python==$VERSION ${FLAGS[*]}"
say() { printf 'build-llamacpp: %s\n' "$*" >&2; }

if [[ -x "$bin/llama-bench" && -x "$bin/llama-server" && "$(cat "$out/.stamp" 2>/dev/null)" == "$stamp" ]]; then
  say "llama-bench and llama-server already built in $bin"
  exit 0
fi

mkdir -p "$out"
tools="$out/venv"
if [[ ! -x "$tools/bin/cmake" || ! -x "$tools/bin/ninja" ]]; then
  say "installing cmake and ninja from PyPI into $tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q --disable-pip-version-check cmake==4.4.5 ninja==1.13.2
fi

src="$out/src"
if [[ ! -f "$src/CMakeLists.txt" ]]; then
  dl="$(mktemp -d)"
  trap 'rm -rf "$dl"' EXIT
  say "downloading the llama-cpp-python $VERSION sdist"
  # From PyPI's simple index (what pip reads), not `pip download`: pip would build the sdist's
  # metadata first, and that compiles cmake from source.
  python3 - "$VERSION" "$dl" <<'PY'
import re, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
name = f"llama_cpp_python-{version}.tar.gz"
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/", timeout=60).read().decode()
urls = [u for u in re.findall(r'href="([^"]+)"', index) if u.split("#")[0].endswith("/" + name)]
if not urls:
    sys.exit(f"build-llamacpp: {name} is not on PyPI's simple index")
with urllib.request.urlopen(urls[0].split("#")[0], timeout=600) as r, open(f"{dest}/{name}", "wb") as f:
    while chunk := r.read(1 << 20):
        f.write(chunk)
PY
  tarball=("$dl"/llama_cpp_python-"$VERSION".tar.gz)
  got="$(sha256sum "${tarball[0]}" | cut -d' ' -f1)"
  [[ "$got" == "$SDIST_SHA256" ]] || { say "the sdist's SHA-256 is $got, not $SDIST_SHA256"; exit 1; }
  tar -xzf "${tarball[0]}" -C "$dl"
  rm -rf "$src"
  mv "$dl/llama_cpp_python-$VERSION/vendor/llama.cpp" "$src"
fi

say "configuring and building llama-bench and llama-server (a few minutes on 2 cores)"
"$tools/bin/cmake" -S "$src" -B "$out/build" -G Ninja -DCMAKE_MAKE_PROGRAM="$tools/bin/ninja" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON "${FLAGS[@]}" >"$out/configure.log"
"$tools/bin/cmake" --build "$out/build" --target llama-bench llama-server -j 2 >"$out/build.log"
mkdir -p "$bin"
cp "$out/build/bin/llama-bench" "$out/build/bin/llama-server" "$bin/"
printf '%s\n' "$stamp" >"$out/.stamp"
say "built $bin/llama-bench and $bin/llama-server"
