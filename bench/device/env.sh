# Sourced first by every command on the lent GPU machine (after bench/device/pack.sh here and
# `carry: [".device"]` in the call): installs the carried wheels, points facecurate at the carried
# models and images, and writes results to $OUT (the folder the device tool brings back).
# FACECURATE_DEVICE_SMOKE=1: a dry run of the scripts here, with the python on PATH (no wheels installed).
if [ -z "${FACECURATE_DEVICE_SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 FACECURATE_SHARED=$PWD/.device/shared
export OUT=${OUT:-$PWD/out/device} && mkdir -p "$OUT"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi") | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
