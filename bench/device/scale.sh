# Issue 6's scale-out in one call (about 3 minutes): the build's batches on a dask_cuda
# LocalCUDACluster (one worker per GPU, the chain loaded once per worker), and data-parallel
# training under torchrun on the one GPU (the same code path as several).
set -uo pipefail
source bench/device/env.sh
IMAGES=${IMAGES:-2048} STEPS=${STEPS:-50}  # smaller for a smoke run
{
  python3 bench/device/dask_cuda_build.py --images $IMAGES --json "$OUT/dask_cuda_build.json"
  python3 -m flows.cli build --catalog docs/catalogs/wild-only.yaml --in-process
  python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m flows.cli train \
    --catalog docs/catalogs/wild-only.yaml --dataset wild@v1 --max-steps $STEPS --batch-size 128 \
    --num-workers 4 --checkpoint-dir out/checkpoints/ddp
} 2>&1 | tee "$OUT/scale.log"
