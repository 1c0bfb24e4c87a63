#!/usr/bin/env bash
# The main job on the embedded default data: synthesize three small domains, build their shards,
# verify them, stream training batches through tokenizer and image transforms, and pretrain a tiny
# multimodal model on them under DeepSpeed (checkpoints, TensorBoard, validation against popularity, export).
# Output: runs/demo/ (override with MOMREC_DEMO_DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup.sh
OUT="${MOMREC_DEMO_DIR:-runs/demo}"
DOMAINS=(books movies fashion)

echo "[demo] 1/5 synthesize the default data into $OUT/data"
python -m shards synth --out "$OUT/data"

echo "[demo] 2/5 build shards into $OUT/shards"
for d in "${DOMAINS[@]}"; do
    python -m shards build --format generic --input "$OUT/data/$d" --out "$OUT/shards/$d" \
        --image-size 64 --samples-per-shard 32 --overwrite --no-progress
done

echo "[demo] 3/5 verify every shard against its manifest"
for d in "${DOMAINS[@]}"; do python -m shards verify "$OUT/shards/$d"; done

echo "[demo] 4/5 stream training batches from all three domains (2 data workers)"
python -m shards stream "${DOMAINS[@]/#/$OUT/shards/}" --batch-size 16 --batches 3 --image-size 64 --num-workers 2
echo "[demo] 5/5 pretrain the tiny config on the three domains (DeepSpeed, CPU): $OUT/pretrain"
rm -rf "$OUT/pretrain"  # a fresh run each time (python -m pretrain refuses to overwrite a run's checkpoints)
DOMAIN_LIST="$(IFS=,; echo "${DOMAINS[*]/#/$OUT/shards/}")"
HF_HUB_OFFLINE=1 python -m pretrain --config launch/configs/tiny.toml \
    "data.domains=$DOMAIN_LIST" "run.out_dir=$OUT/pretrain"
echo "[demo] done: data in $OUT/data, shards in $OUT/shards, pretrained model in $OUT/pretrain/model"
echo "[demo]       TensorBoard: tensorboard --logdir $OUT/pretrain/tb"
