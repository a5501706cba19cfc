#!/usr/bin/env bash
# Downloads, on a machine with PyPI access, the wheels tools/gpu_check.sh installs on an
# offline GPU host into .whl/ (git-ignored), at the versions pinned in constraints.txt.
#
#   tools/fetch_gpu_wheels.sh          # then copy the repo, .whl/ included, to the GPU host
#
# The GPU host is assumed to have Python 3.12 (x86-64) with jax (CUDA), flax, optax,
# orbax-checkpoint, msgpack, etils, cloudpickle, protobuf, PyYAML, pillow, opencv-python-headless,
# tqdm, psutil, torch and timm already; it lacks only the packages below (our Grain input
# pipeline and configs).
# Override with GPU_PYTHON_VERSION=3.11 etc. for another host Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET_PY=${GPU_PYTHON_VERSION:-3.12}
PACKAGES=(grain array_record ml_collections clu portpicker)

pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i "^${name}==" constraints.txt || true)
  [[ -n "$pin" ]] || { echo "fetch_gpu_wheels: no pin for $name in constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done

rm -rf .whl
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$TARGET_PY" --implementation cp "${platforms[@]}" -d .whl "${pins[@]}" \
  2> >(sed '/^WARNING: Location .* is ignored/d' >&2)
ls -l .whl
du -sh .whl
