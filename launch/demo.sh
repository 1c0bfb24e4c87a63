#!/usr/bin/env bash
# The main job on the embedded default data: synthesize three small domains, build their shards,
# verify them, stream training batches through tokenizer and image transforms, pretrain a tiny multimodal
# model on two of them under DeepSpeed (checkpoints, TensorBoard, validation against popularity, export), and
# transfer it to the third with LoRA, ranked over that domain's whole catalog; then a small scaling study (source
# data sizes against no pretraining, the ID baseline) that ends in results.csv, a figure, a table and TensorBoard
# curves. Each step prints its time. Output: runs/demo/ (override with MOMREC_DEMO_DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup.sh
OUT="${MOMREC_DEMO_DIR:-runs/demo}"
DOMAINS=(books movies fashion)
START=$SECONDS STEP_START=$SECONDS  # after the set-up (installs on the first run)
took() {  # print the time of the step that just ended
    echo "[demo]     ($((SECONDS - STEP_START)) s)"
    STEP_START=$SECONDS
}

echo "[demo] 1/7 synthesize the default data into $OUT/data"
python -m shards synth --out "$OUT/data"

took
echo "[demo] 2/7 build shards into $OUT/shards"
for d in "${DOMAINS[@]}"; do
    python -m shards build --format generic --input "$OUT/data/$d" --out "$OUT/shards/$d" \
        --image-size 64 --samples-per-shard 32 --overwrite --no-progress
done

took
echo "[demo] 3/7 verify every shard against its manifest"
for d in "${DOMAINS[@]}"; do python -m shards verify "$OUT/shards/$d"; done

took
echo "[demo] 4/7 stream training batches from all three domains (2 data workers)"
python -m shards stream "${DOMAINS[@]/#/$OUT/shards/}" --batch-size 16 --batches 3 --image-size 64 --num-workers 2
took
echo "[demo] 5/7 pretrain the tiny config on books and movies (DeepSpeed, CPU): $OUT/pretrain"
rm -rf "$OUT/pretrain" "$OUT/finetune"  # fresh runs (both commands refuse to overwrite a run's checkpoints)
export HF_HUB_OFFLINE=1
python -m pretrain --config launch/configs/tiny.toml \
    "data.domains=$OUT/shards/books,$OUT/shards/movies" "run.out_dir=$OUT/pretrain"

took
echo "[demo] 6/7 transfer it to fashion with LoRA, then rank the fashion test users: $OUT/finetune"
python -m finetune --from "$OUT/pretrain/model" --data "$OUT/shards/fashion" --mode lora \
    "run.out_dir=$OUT/finetune" optim.max_steps=20 optim.warmup_steps=2 run.eval_every=10 run.log_every=5
python - "$OUT/finetune/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
t = s["test"]
print(f"[demo] fashion test, full ranking over the catalog ({int(t['test/users'])} users): "
      f"NDCG@10 {t['test/full/ndcg@10']:.4f}, HR@10 {t['test/full/hr@10']:.4f}; popularity ranker: "
      f"NDCG@10 {t['test/full/pop/ndcg@10']:.4f}, HR@10 {t['test/full/pop/hr@10']:.4f}; "
      f"{s['params']['all']['trainable']:,} of {s['params']['all']['total']:,} parameters trained")
PY

took
echo "[demo] 7/7 scaling study: sources at 0/50/100 % of their users -> fashion, plus SASRec: $OUT/scaling"
rm -rf "$OUT/scaling"
python -m finetune.scaling --config launch/studies/demo.toml --no-progress \
    "scaling.sources=$OUT/shards/books,$OUT/shards/movies" "scaling.target=$OUT/shards/fashion" \
    "scaling.out_dir=$OUT/scaling"
took
echo "[demo] done in $((SECONDS - START)) s (+ $START s of set-up)"
echo "[demo]       data in $OUT/data, shards in $OUT/shards, pretrained model in $OUT/pretrain/model,"
echo "[demo]       finetuned model in $OUT/finetune/best, scaling study in $OUT/scaling (scaling.png, scaling.md,"
echo "[demo]       results.csv); TensorBoard: tensorboard --logdir $OUT"
