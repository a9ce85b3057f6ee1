# Issue 6 in one call (about 6 minutes on an H100): the GPU path's tests, then every speed bench
# with its baseline in the same process. Results: $OUT/*.json and $OUT/speed.log.
set -uo pipefail
source bench/device/env.sh
{
  python3 -m pytest -q -p no:cacheprovider tests/test_device_path.py tests/test_detectors.py
  python3 bench/default_chain.py --images 8192 --cpu-images 256 --batch 256 --threads 4 --json "$OUT/default_chain.json"
  python3 bench/default_chain.py --images 8192 --cpu-images 256 --batch 256 --threads 1 --json "$OUT/default_chain_t1.json"
  python3 bench/fan_chain.py --images 187 --batch 128 --json "$OUT/fan_chain.json"
  python3 bench/label_throughput.py --images 187 --json "$OUT/label_throughput.json"
} 2>&1 | tee "$OUT/speed.log"
