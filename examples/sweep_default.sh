#!/usr/bin/env bash
# Budget sweep of the default model (resnet8, 73,728 ReLUs, trained on the data
# and cached) on the default synthetic data (groups A/B/C = 70/20/10 %), then the
# HTML report; copies the group-accuracy figure used in the README to
# docs/figures/sweep_group_accuracy.png.  About 10 minutes on 2 CPU cores.
#
#   bash examples/sweep_default.sh            # output in runs/sweep-default/
#   OUT=/tmp/sweep bash examples/sweep_default.sh
#
# Interrupted?  Run it again: finished budgets are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/sweep-default}"

relucomp sweep --data synthetic --budgets 1k,2k,5k,10k,20k \
    --pretrain-epochs 8 --epochs 3 --finetune-epochs 2 --no-progress --no-report --out "$OUT"
relucomp report "$OUT"
mkdir -p docs/figures
cp "$OUT/figures/group_accuracy.png" docs/figures/sweep_group_accuracy.png
echo "figure: docs/figures/sweep_group_accuracy.png   report: $OUT/report.html"
