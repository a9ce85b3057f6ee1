# Issue 6 in one call (about 6 minutes on an H100): the GPU path's tests, then every speed bench
# with its baseline in the same process. Results: $OUT/*.json and $OUT/speed.log.
set -uo pipefail
source bench/device/env.sh
IMAGES=${IMAGES:-8192} FAN_IMAGES=${FAN_IMAGES:-187}  # smaller for a smoke run
{
  python3 -m pytest -q -p no:cacheprovider tests/test_device_path.py tests/test_detectors.py
  python3 bench/default_chain.py --images $IMAGES --cpu-images 256 --batch 256 --threads 4 --json "$OUT/default_chain.json"
  python3 bench/default_chain.py --images $IMAGES --cpu-images 256 --batch 256 --threads 1 --json "$OUT/default_chain_t1.json"
  python3 bench/fan_chain.py --images $FAN_IMAGES --batch 128 --json "$OUT/fan_chain.json"
  python3 bench/label_throughput.py --images $FAN_IMAGES --json "$OUT/label_throughput.json"
} 2>&1 | tee "$OUT/speed.log"
