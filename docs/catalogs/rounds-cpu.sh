set -e
cd "$(dirname "$0")/../.."
FC=.venv/bin/facecurate
W=docs/catalogs/wild-only.yaml
date
time $FC build --catalog $W
time $FC train --catalog $W --dataset wild@v1 --max-steps 150 --batch-size 32 --checkpoint-dir out/checkpoints/r1 --num-workers 1
R1=$(ls out/checkpoints/r1/step-*.pt | tail -1)
time $FC round --catalog $W --checkpoint $R1 --round 1
time $FC train --catalog $W --dataset wild@v2 --max-steps 150 --batch-size 32 --checkpoint-dir out/checkpoints/r2 --num-workers 1
R2=$(ls out/checkpoints/r2/step-*.pt | tail -1)
for C in teacher $R1 $R2; do $FC evaluate --checkpoint $C --data ${FACECURATE_SHARED:-../shared}/data/aflw2000-dev --json out/eval-$(basename $C .pt).json --device cpu; done
$FC build --catalog docs/catalogs/dev-only.yaml
$FC rescore --catalog docs/catalogs/dev-only.yaml --dataset devscore@v1 --checkpoint $R2 --round 2
date
