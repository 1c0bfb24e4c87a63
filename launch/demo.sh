#!/usr/bin/env bash
# The main job on the embedded default data: synthesize three small domains, build their shards,
# inspect and verify them, and stream training batches through tokenizer and image transforms.
# Output: runs/demo/ (override with MOMREC_DEMO_DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup.sh
OUT="${MOMREC_DEMO_DIR:-runs/demo}"
DOMAINS=(books movies fashion)

echo "[demo] 1/4 synthesize the default data into $OUT/data"
python -m shards synth --out "$OUT/data"

echo "[demo] 2/4 build shards into $OUT/shards"
for d in "${DOMAINS[@]}"; do
    python -m shards build --format generic --input "$OUT/data/$d" --out "$OUT/shards/$d" \
        --image-size 64 --samples-per-shard 32 --overwrite --no-progress
done

echo "[demo] 3/4 verify every shard against its manifest"
for d in "${DOMAINS[@]}"; do python -m shards verify "$OUT/shards/$d"; done

echo "[demo] 4/4 stream training batches from all three domains (2 data workers)"
python -m shards stream "${DOMAINS[@]/#/$OUT/shards/}" --batch-size 16 --batches 3 --image-size 64 --num-workers 2
echo "[demo] done: data in $OUT/data, shards in $OUT/shards"
