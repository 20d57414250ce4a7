#!/usr/bin/env bash
# The whole pipeline on an embedded synthetic default, on 2 CPU processes:
#   synth -> prep -> train (recipes/tiny_cpu.py, 2 processes) -> extract (2 processes) -> diagnose
#   -> local pattern matching (2 processes) -> tune-post (with the fusion) -> submission.csv -> local score
#   -> report.
# Re-running skips finished stages. Usage: bash launch/demo.sh [--fast] [--dir DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FAST=0
DEMO="${DEMO_DIR:-$ROOT/demo}"
while [ $# -gt 0 ]; do
  case "$1" in
    --fast) FAST=1 ;;
    --dir) DEMO="$2"; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument '$1' (expected --fast or --dir DIR)" >&2; exit 2 ;;
  esac
  shift
done
source "$ROOT/launch/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [ "$FAST" = 1 ]; then
  SYNTH=(--identities 8 --train-images 160 --test-images 24 --size 128)
  TRAIN=(train.epochs=4 train.eval_every=2 model.img_size=[48,96])
else
  SYNTH=(--identities 16 --train-images 400 --test-images 60 --size 192)
  TRAIN=()
fi
RAW="$DEMO/raw"; SHARDS="$DEMO/shards"; RUN="$DEMO/run"
# One folder holds one variant: the full demo would otherwise skip the fast demo's data and then refuse
# to resume its run with another model.img_size.
VARIANT=$([ "$FAST" = 1 ] && echo fast || echo full)
mkdir -p "$DEMO"
if [ -f "$DEMO/variant" ] && [ "$(cat "$DEMO/variant")" != "$VARIANT" ]; then
  echo "demo.sh: $DEMO holds the $(cat "$DEMO/variant") demo; run this one in another folder" \
       "(bash launch/demo.sh$([ "$FAST" = 1 ] && echo " --fast") --dir DIR) or remove $DEMO first" >&2
  exit 2
fi
echo "$VARIANT" > "$DEMO/variant"
LAUNCH=(accelerate launch --config_file "$ROOT/launch/cpu_2proc.yaml")
stage() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s)

stage "1/10 synthetic jaguars -> $RAW"
[ -f "$RAW/test_labels.csv" ] && echo "exists, skipped" || jaguar synth "$RAW" "${SYNTH[@]}" --seed 0
stage "2/10 prepare shards -> $SHARDS"
[ -f "$SHARDS/manifest.json" ] && echo "exists, skipped" || jaguar prep "$RAW" "$SHARDS" --max-side 256 --workers 2
stage "3/10 train recipes/tiny_cpu.py on 2 CPU processes -> $RUN"
"${LAUNCH[@]}" recipes/tiny_cpu.py data.shards="$SHARDS" run.dir="$RUN" train.resume=auto "${TRAIN[@]}"
stage "4/10 extract validation and test features on 2 processes"
"${LAUNCH[@]}" -m jaguar.cli.main extract "$RUN" --split val
"${LAUNCH[@]}" -m jaguar.cli.main extract "$RUN" --split test
stage "5/10 does the model see the coat? (shortcut diagnostics on validation and test)"
jaguar diagnose "$RUN" --split val
jaguar diagnose "$RUN" --split test
stage "6/10 local pattern evidence: each image's coat matched against its global shortlist, on 2 processes"
"${LAUNCH[@]}" -m jaguar.cli.main match "$RUN" --split val
"${LAUNCH[@]}" -m jaguar.cli.main match "$RUN" --split test
stage "7/10 tune post-processing on the validation split (QE, re-ranking, fusion with the local matches)"
jaguar tune-post "$RUN"
stage "8/10 write the submission for every ordered test pair"
jaguar submit "$RUN" --test-csv "$RAW/test.csv" -o "$RUN/submission.csv"
stage "9/10 score it locally against the hidden labels"
jaguar score "$RUN" --test-csv "$RAW/test.csv" --labels "$RAW/test_labels.csv"
stage "10/10 report"
jaguar report "$RUN" --test-labels "$RAW/test_labels.csv"

cat <<EOT

Done in $(( $(date +%s) - t0 )) s.
  run:         $RUN
  submission:  $RUN/submission.csv
  report:      $RUN/report/index.html
  TensorBoard: tensorboard --logdir $RUN/tb
EOT
