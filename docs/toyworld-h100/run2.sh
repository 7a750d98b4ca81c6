# general-model text encoder: trained vs frozen, on the shipped VAE, fused with the shipped expert
# (Kept as it ran on 2026-11-27, with the expert then shipped: trained from scratch, see docs/toyworld-scratch-expert.json.)
export MAGICFUSION_EMOJI_FONT=$PWD/.gpu/NotoColorEmoji.ttf PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-3000}; T0=$(date +%s); END=${END:-290}
declare -A V=([trained]="" [frozen]="--frozen-text general")
for v in "${!V[@]}"; do (
  W=/tmp/g2/$v
  timeout 200 python tools/train_toy.py --device $DEVICE --threads 6 --quiet --vae-from weights/toy/general.safetensors \
    --models general --judge-steps 0 --unet-steps $STEPS --out $W ${V[$v]} ${TRAIN_ARGS:-} > $OUT/$v.train.log 2>&1
  echo "train rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/$v.train.log
  cp $W/general.safetensors $OUT/$v-general.safetensors
  cp weights/toy/expert.safetensors weights/toy/judge.safetensors $W/
  timeout $(( T0 + END - $(date +%s) )) python tools/eval_toy.py --device $DEVICE --threads 6 --quiet --weights $W \
    --json $OUT/$v.json --examples "" ${EVAL_ARGS:-} --settings "general alone" "SNB 850->-1, expert outside, own-unconditional" \
    "SNB (defaults)" "average blend (Fig" > $OUT/$v.eval.log 2>&1
  echo "eval rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/$v.eval.log ) &
done; wait; cat $OUT/*.log; cat $OUT/*.json; echo "total $(( $(date +%s) - T0 )) s"
