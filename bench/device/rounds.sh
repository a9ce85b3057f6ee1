# Issue 4 in one call (about 9 minutes on an H100): two rounds over aflw-wild-crops (build, train
# from the teacher, rescore, build the next version, train again), evaluation of the teacher and
# both rounds on aflw2000-dev (never trained on), a dev-only version rescored with round 2 (how well
# the score finds bad labels), and the trainer's throughput for both backbones.
# STEPS per round (default 2000) and BATCH (default 128) can be set in the environment.
set -uo pipefail
source bench/device/env.sh
STEPS=${STEPS:-2000} BATCH=${BATCH:-128}
FC="python3 -m flows.cli"
W=docs/catalogs/wild-only.yaml
{
  set -x
  $FC build --catalog $W --in-process
  $FC train --catalog $W --dataset wild@v1 --max-steps $STEPS --batch-size $BATCH --num-workers 8 --checkpoint-dir out/checkpoints/r1
  R1=$(ls out/checkpoints/r1/step-*.pt | tail -1)
  $FC round --catalog $W --checkpoint $R1 --round 1 --in-process
  $FC train --catalog $W --dataset wild@v2 --max-steps $STEPS --batch-size $BATCH --num-workers 8 --checkpoint-dir out/checkpoints/r2
  R2=$(ls out/checkpoints/r2/step-*.pt | tail -1)
  for NAME_CKPT in teacher=teacher r1=$R1 r2=$R2; do
    $FC evaluate --checkpoint ${NAME_CKPT#*=} --data $FACECURATE_SHARED/data/aflw2000-dev --json "$OUT/eval-${NAME_CKPT%%=*}.json"
  done
  $FC build --catalog docs/catalogs/dev-only.yaml --in-process
  $FC rescore --catalog docs/catalogs/dev-only.yaml --dataset devscore@v1 --checkpoint $R2 --round 2 --json "$OUT/score_auc.json"
  python3 bench/trainer_throughput.py --dataset wild@v2 --batch $BATCH --steps 20 --workers 8 --json "$OUT/trainer_throughput.json"
} 2>&1 | tee "$OUT/rounds.log"
