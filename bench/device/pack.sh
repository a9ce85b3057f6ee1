#!/usr/bin/env bash
# Here (a machine with pip access): fill the git-ignored .device/ folder that travels to a lent GPU
# machine with `carry: [".device"]` - the wheels it lacks (Python 3.12, x86-64; see KINDS.md of the
# device tool for what it has) and the models and images the GPU runs read. Checks the 64 MiB limit.
# Usage: bash bench/device/pack.sh        (FACECURATE_SHARED defaults to ../shared)
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED="${FACECURATE_SHARED:-../shared}"
rm -rf .device && mkdir -p .device/whl .device/shared/models .device/shared/data

# pipeline/ + trainer/ need pydantic; the FAN bench face-alignment; the baseline CPU path insightface;
# the dask-cuda scale-out dask, distributed, dask-cuda and what they need that the device lacks.
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        face-alignment==1.5.0 insightface==2.1
        dask==2026.8.0 distributed==2026.8.0 dask-cuda==26.10.0 partd==1.4.2 locket==1.0.0
        tornado==6.6.1 zict==3.0.0 tblib==3.2.2)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
  -d .device/whl "${WHEELS[@]}"

M=.device/shared/models
mkdir -p $M/3ddfa_v2 $M/bfm $M/insightface-det $M/peppa
cp "$SHARED"/models/SHA256SUMS $M/
cp "$SHARED"/models/3ddfa_v2/mb05_120x120.pth "$SHARED"/models/3ddfa_v2/param_mean_std_62d_120x120.pkl $M/3ddfa_v2/
cp "$SHARED"/models/bfm/* $M/bfm/
cp "$SHARED"/models/insightface-det/*.onnx $M/insightface-det/
cp "$SHARED"/models/peppa/slim_160_latest.onnx $M/peppa/
cp -r "$SHARED"/models/blazeface $M/  # face-alignment builds its detector even when given boxes
cp -r "$SHARED"/data/aflw2000-dev "$SHARED"/data/scenes "$SHARED"/data/aflw-wild-crops .device/shared/data/

TREE=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
CARRY=$(du -sb .device | cut -f1)
TOTAL=$(( (TREE + CARRY) / 1048576 ))
echo "tracked tree $((TREE / 1048576)) MiB + .device $((CARRY / 1048576)) MiB = ${TOTAL} MiB (limit 64)"
[ "$TOTAL" -lt 63 ] || { echo "too big to travel: trim .device/shared/data" >&2; exit 1; }
