#!/usr/bin/env bash
# (Kept as it ran on 2026-11-27. Since then fine-tuning the expert from the general model is train_toy.py's default,
# and the old --expert-from-general flag is gone: --expert-from-scratch asks for the old recipe.)
# Train toy-world recipe variants side by side on one CUDA GPU and score each with the evaluation.
#
#   bash tools/gpu_toy.sh OUT                      # on a machine with a CUDA GPU (about 9 minutes on an H100)
#   DEVICE=cpu SMALL=1 bash tools/gpu_toy.sh /tmp/o # a dry run of the plumbing, tiny and on the CPU
#
# Each variant is one `python tools/train_toy.py --device cuda ...` (the whole recipe: VAE, both UNets, judge)
# followed by `python tools/eval_toy.py` over the key settings first and then every other one, until the time
# runs out (each part under `timeout`; the evaluation writes its JSON after each setting, so what finished is
# kept). Written to OUT: summary.md (a table per variant), results.tar.gz (every JSON and log), and the
# checkpoints of the two variants with the best "both right" in any SNB row (NAME-general.safetensors, ...).
set -u
OUT=${1:?usage: bash tools/gpu_toy.sh OUT}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}   # seconds from the start until every evaluation stops
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
T0=$(date +%s)
if [ -n "${SMALL:-}" ]; then
  TRAIN_SIZE="--per-animal 2 --per-pair 1 --vae-steps 3 --decoder-steps 2 --unet-steps 3 --judge-steps 2 --judge-images 64"
  EVAL_SIZE="--seeds 1"
else
  TRAIN_SIZE=""; EVAL_SIZE=""
fi
declare -A VARIANTS=(
  [frozen]="--frozen-text both"
  [frozen-general]="--frozen-text general"
  [finetune]="--expert-from-general"
  [finetune-frozen]="--expert-from-general --frozen-text both"
)
KEY=("general alone" "expert alone" "SNB (defaults)" "average blend (Fig" "SNB, own-unconditional saliency"
     "SNB 850->-1, expert outside, own-unconditional" "")
for v in "${!VARIANTS[@]}"; do
  (
    timeout 420 python tools/train_toy.py --device "$DEVICE" --threads 3 --quiet --out "$WORK/$v" \
      ${VARIANTS[$v]} $TRAIN_SIZE > "$WORK/$v.train.log" 2>&1
    echo "train rc=$? at $(( $(date +%s) - T0 )) s" >> "$WORK/$v.train.log"
    left=$(( T0 + BUDGET - $(date +%s) ))
    [ "$left" -gt 10 ] && timeout "$left" python tools/eval_toy.py --device "$DEVICE" --threads 3 --quiet \
      --weights "$WORK/$v" --json "$WORK/$v.json" --examples "" $EVAL_SIZE --settings "${KEY[@]}" \
      > "$WORK/$v.eval.log" 2>&1
    echo "eval rc=$? at $(( $(date +%s) - T0 )) s" >> "$WORK/$v.eval.log"
  ) &
done
wait
nvidia-smi --query-gpu=name,memory.used --format=csv > "$WORK/gpu.txt" 2>&1
python - "$WORK" "$OUT" <<'PY'
import json, shutil, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
lines, best = [], {}
for f in sorted(work.glob("*.json")):
    r = json.loads(f.read_text())
    lines += [f"## {f.stem}", "| setting | animal | scene | both | n | s |", "|---|---|---|---|---|---|"]
    for k, v in r.items():
        if isinstance(v, dict) and "both" in v:
            lines.append(f"| {k} | {v['animal']:.0%} | {v['scene']:.0%} | {v['both']:.0%} | {v['n']} | {v['seconds']} |")
    snb = [v["both"] for k, v in r.items() if isinstance(v, dict) and k.startswith("SNB")]
    best[f.stem] = max(snb, default=-1)
for f in sorted(work.glob("*.log")):
    lines += [f"### {f.name}", "```", *f.read_text().splitlines()[-6:], "```"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
for name in sorted(best, key=best.get, reverse=True)[:2]:
    for part in ("general", "expert", "judge"):
        src = work / name / f"{part}.safetensors"
        if src.exists():
            shutil.copy(src, out / f"{name}-{part}.safetensors")
PY
tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='tokenizer' .
echo "done in $(( $(date +%s) - T0 )) s"
