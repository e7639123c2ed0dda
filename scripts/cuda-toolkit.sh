#!/usr/bin/env bash
# Lays out a CUDA 13.0 (Update 2) toolkit with NCCL, enough to COMPILE `--features cuda,nccl`
# (candle-kernels' nvcc build, cudarc's link against the CUDA and NCCL libraries), from PyPI
# wheels only: no NVIDIA apt repository, no runfile, no GPU needed.
#
#   scripts/cuda-toolkit.sh [DIR]        # DIR defaults to $GANTRY_CUDA_DIR or .tools/cuda-13.0
#   eval "$(scripts/cuda-toolkit.sh)"    # the last lines it prints on stdout are `export …`
#   cargo build -p gantry-cli --features cuda
#
# Why CUDA 13 and not 12: the CUDA 12 wheels (nvidia-cuda-nvcc-cu12, every 12.x up to 12.9.86)
# carry only ptxas, libnvvm, libdevice and the crt headers, not nvcc, cicc, cudafe++, fatbinary
# or nvlink; the CUDA 13 wheels (nvidia-cuda-nvcc, nvidia-nvvm, nvidia-cuda-crt, …) carry the
# whole compiler and share one prefix, nvidia/cu13/, laid out like a toolkit (bin/, include/,
# lib/, nvvm/). cudarc 0.19 knows CUDA 13.0 to 13.4 (13.0 here: the oldest driver, R580).
#
# What the wheels lack, made here:
#   lib/libX.so -> libX.so.N   the unversioned names `-lcudart`, `-lcublas`, … link against;
#   lib64 -> lib               cudaforge (candle-kernels' build) takes <root>/lib64 as lib dir;
#   lib/stubs/libcuda.so       a stub of the driver library (SONAME libcuda.so.1, every cu*
#                              function of cuda.h returning CUDA_ERROR_STUB_LIBRARY = 34), which
#                              candle's cudarc (feature `dynamic-linking`) links against. At run
#                              time the driver's own libcuda.so.1 is used: never put lib/stubs on
#                              LD_LIBRARY_PATH. Needs gcc.
#
# Idempotent: the wheels are checked against pinned SHA-256s (pip's hash-checking mode, then
# sha256sum again); a folder whose stamp matches the pins is left as it is. About 650 MB of
# wheels (kept in DIR/.wheels; NCCL's adds 200 MB) and 1.4 GB unpacked.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-${GANTRY_CUDA_DIR:-$root/.tools/cuda-13.0}}"
python="${PYTHON:-python3}"
say() { printf 'cuda-toolkit: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# name==version  sha256 of its manylinux x86_64 wheel (the versions of the cuda-toolkit==13.0.2
# meta-package; hashes as PyPI's index gives them).
pins=(
  "nvidia-cuda-nvcc==13.0.88     56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03"
  "nvidia-cuda-crt==13.0.88      2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"
  "nvidia-nvvm==13.0.88          c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0"
  "nvidia-cuda-runtime==13.0.96  7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
  "nvidia-cuda-cccl==13.0.85     e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"
  "nvidia-cuda-nvrtc==13.0.88    ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575"
  "nvidia-cublas==13.1.0.3       ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171"
  "nvidia-curand==10.4.0.35      1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc"
  "nvidia-nccl-cu13==2.32.6      76e7aad00482092baf01e13e66f441d54c96b5cf1e3f143dee27db7f731d41ba"
)
stamp_text="$(printf '%s\n' "${pins[@]}" stub-v1)"

[[ "$(uname -m)" == x86_64 && "$(uname -s)" == Linux ]] || die "pins are for Linux x86_64 only"

if [[ -f "$dir/.gantry-cuda-stamp" && "$(cat "$dir/.gantry-cuda-stamp")" == "$stamp_text" ]]; then
  say "ok: CUDA toolkit already laid out in $dir"
else
  command -v gcc >/dev/null || die "gcc is needed (nvcc's host compiler, and to build the libcuda stub)"
  wheels="$dir/.wheels"
  mkdir -p "$wheels"
  reqs="$wheels/requirements.txt"
  : >"$reqs"
  for p in "${pins[@]}"; do
    read -r req sha <<<"$p"
    printf '%s --hash=sha256:%s\n' "$req" "$sha" >>"$reqs"
  done
  say "downloading the pinned wheels into $wheels (skips those already there)"
  # --platform/--python-version: the wheels are py3-none-manylinux_*; naming the platforms lets
  # pip fetch them whatever this Python is. Hash-checking mode rejects anything not pinned.
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --python-version 3.11 -d "$wheels" -r "$reqs" >&2
  # Check again ourselves: exactly one wheel per pin, with its hash.
  for p in "${pins[@]}"; do
    read -r req sha <<<"$p"
    name="${req%%==*}" ver="${req##*==}"
    files=("$wheels/${name//-/_}-$ver-"*manylinux*x86_64*.whl)
    [[ ${#files[@]} -eq 1 && -f "${files[0]}" ]] || die "no single wheel for $req in $wheels"
    echo "$sha  ${files[0]}" | sha256sum --quiet -c - || die "SHA-256 mismatch: ${files[0]}"
  done

  tmp="$dir.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  say "unpacking into $dir"
  for p in "${pins[@]}"; do
    read -r req _ <<<"$p"
    name="${req%%==*}" ver="${req##*==}"
    "$python" - "$tmp" "$wheels/${name//-/_}-$ver-"*manylinux*x86_64*.whl <<'EOF'
import os, sys, zipfile
dest, whl = sys.argv[1], sys.argv[2]
# The toolkit wheels share nvidia/cu13/; NCCL's has its own nvidia/nccl/ (include/, lib/).
prefixes = ("nvidia/cu13/", "nvidia/nccl/")
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        prefix = next((p for p in prefixes if info.filename.startswith(p)), None)
        if prefix is None or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if not rel or rel.endswith("__init__.py") or "/__pycache__/" in rel:
            continue
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        mode = (info.external_attr >> 16) & 0o777
        os.chmod(out, mode if mode else 0o644)
EOF
  done
  chmod +x "$tmp"/bin/{nvcc,ptxas,cudafe++,fatbinary,nvlink,bin2c} "$tmp/nvvm/bin/cicc"

  # Unversioned names for the linker (the wheels ship only the SONAME files).
  (
    cd "$tmp/lib"
    for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 \
      libnvvm.so.4 libnccl.so.2; do
      [[ -f "$so" ]] || die "the wheels lack lib/$so"
      ln -sfn "$so" "${so%%.so.*}.so"
    done
  )
  ln -sfn lib "$tmp/lib64"
  mkdir -p "$tmp/nvvm/lib64"
  ln -sfn ../../lib/libnvvm.so.4 "$tmp/nvvm/lib64/libnvvm.so"

  # The driver stub: every cu* function that cuda.h declares, before and after its macros map
  # names to their _v2/_v3… versions.
  say "building the libcuda.so stub (lib/stubs)"
  mkdir -p "$tmp/lib/stubs"
  {
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' "$tmp/include/cuda.h"
    gcc -E -P -x c -I"$tmp/include" "$tmp/include/cuda.h" | grep -ohE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\('
  } | tr -d '( \t' | sort -u |
    awk '{ printf "int %s(void) { return 34; }\n", $1 }' >"$tmp/lib/stubs/libcuda-stub.c"
  [[ $(wc -l <"$tmp/lib/stubs/libcuda-stub.c") -gt 300 ]] || die "too few cu* functions found in cuda.h"
  gcc -shared -fPIC -O0 -w -fno-builtin -Wl,-soname,libcuda.so.1 \
    -o "$tmp/lib/stubs/libcuda.so" "$tmp/lib/stubs/libcuda-stub.c"

  "$tmp/bin/nvcc" --version | grep -q 'release 13.0' || die "nvcc does not run from $tmp"
  printf '%s\n' "$stamp_text" >"$tmp/.gantry-cuda-stamp"
  # Keep the downloaded wheels, swap the laid-out folder in.
  mv "$wheels" "$tmp/.wheels"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  trap - EXIT
  say "ok: CUDA 13.0 toolkit laid out in $dir ($(du -sh "$dir" | cut -f1), wheels included)"
fi

# cudaforge (candle-kernels) finds nvcc via $NVCC/PATH and needs CUDA_COMPUTE_CAP when there is
# no nvidia-smi; cudarc reads the version from `nvcc --version` on PATH (or CUDARC_CUDA_VERSION)
# and adds <root>/lib and <root>/lib/stubs to the link search from CUDA_HOME/CUDA_PATH/….
cat <<EOF
export CUDA_HOME='$dir'
export CUDA_PATH='$dir'
export NVCC='$dir/bin/nvcc'
export PATH='$dir/bin':"\$PATH"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
EOF
