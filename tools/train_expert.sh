#!/usr/bin/env bash
# Rebuild the shipped toy expert (weights/toy/expert.safetensors) from the shipped general model: three
# fine-tuning rounds of tools/train_toy.py, 3,000 steps each, every round starting from the last round's file with a
# seed of its own (so it trains on new renders and batches); the third paints half of the animals' backdrops as smooth
# fields of random colours (--backdrop-detail 4). About 80 minutes on a 2-core CPU; the log is
# weights/toy/expert-finetune.log. A whole `python tools/train_toy.py` run (90 minutes for every model) trains
# round 1 only.
#
#     bash tools/train_expert.sh [OUT [OPTION...]]   # OUT: where expert.safetensors goes (default: weights/toy);
#                                                  # OPTIONs go to every round (e.g. --quiet, --device cuda)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/weights/toy}
shift || true
general=$root/weights/toy/general.safetensors
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(--threads 2 --vae-from "$general" --models expert --judge-steps 0 --expert-backdrops 0.5 "$@")
python "$root/tools/train_toy.py" "${common[@]}" --out "$work/1" --init-from "$general"
python "$root/tools/train_toy.py" "${common[@]}" --out "$work/2" --init-from "$work/1/expert.safetensors" --seed 1
python "$root/tools/train_toy.py" "${common[@]}" --out "$work/3" --init-from "$work/2/expert.safetensors" --seed 2 \
    --backdrop-detail 4
mkdir -p "$out"
mv "$work/3/expert.safetensors" "$out/expert.safetensors"
echo "wrote $out/expert.safetensors" >&2
