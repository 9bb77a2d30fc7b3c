#!/usr/bin/env bash
# Prepare everything a GPU machine needs to run `neox-mlc gpu_check` in one call, in .gpu-ship/
# (git-ignored; name it in the device tool's `carry`). That machine has Python 3.12 with torch,
# transformers, numpy, ml_dtypes and the CUDA driver, but no apache-tvm and no network, and at most
# 64 MiB travel, so TVM goes runtime-only:
#   .gpu-ship/site/tvm   the apache-tvm package without lib/libtvm_compiler.so, 3rdparty, include, src, web
#   .gpu-ship/wheels/    apache-tvm-ffi's cp312 manylinux wheel (the version installed here)
#   .gpu-ship/check/     `gpu_check prepare`: fixture + speed-shape libraries (CUDA sm_90, iPhone proxy)
# Usage (build machine, needs nvcc; compiling the speed shapes takes tens of minutes on 2 cores):
#   scripts/gpu_ship.sh [gpu_check prepare options, e.g. --shapes 162m,3.6b --quants q0f16,q4f16_0,q4f16_1]
# It ends by printing the command to run on the GPU machine (writes $OUT/gpu-check.json there).
set -euo pipefail
cd "$(dirname "$0")/.."
SHIP=.gpu-ship
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LIMIT_MIB=64

rm -rf "$SHIP.tmp" && mkdir -p "$SHIP.tmp/site" "$SHIP.tmp/wheels"
tvm_dir=$("$PY" -c 'import os, tvm; print(os.path.dirname(tvm.__file__))')
ffi_version=$("$PY" -c 'from importlib.metadata import version; print(version("apache-tvm-ffi"))')
# the runtime-only TVM package
(cd "$(dirname "$tvm_dir")" && tar -cf - --exclude=tvm/lib/libtvm_compiler.so --exclude=tvm/3rdparty --exclude=tvm/include \
    --exclude=tvm/src --exclude=tvm/web --exclude='__pycache__' tvm) | tar -xf - -C "$SHIP.tmp/site"
# tvm-ffi has a compiled extension: fetch the build for the GPU machine's CPython 3.12
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$SHIP.tmp/wheels" "apache-tvm-ffi==$ffi_version"
# the libraries and fixtures
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m neox_mlc.cli gpu_check prepare "$SHIP.tmp/check" --device cuda "$@" > /dev/null
rm -rf "$SHIP" && mv "$SHIP.tmp" "$SHIP"

size_kib=$(du -sk "$SHIP" | cut -f1)
tree_kib=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "$SHIP: $((size_kib / 1024)) MiB (+ working tree $((tree_kib / 1024)) MiB; limit $LIMIT_MIB MiB)" >&2
if [ $(((size_kib + tree_kib) / 1024)) -ge $LIMIT_MIB ]; then
    echo "error: $SHIP plus the working tree exceed $LIMIT_MIB MiB; prepare fewer shapes or quantizations" >&2
    exit 2
fi
cat <<EOF
python3 -m pip install -q --no-index --no-deps --target /tmp/site $SHIP/wheels/*.whl && cp -r $SHIP/site/tvm /tmp/site/ && PYTHONPATH=/tmp/site:\$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1 python3 -m neox_mlc.cli gpu_check run $SHIP/check --device cuda -o \$OUT/gpu-check.json 2>&1 | tee \$OUT/gpu-check.log
EOF
