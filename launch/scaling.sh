#!/usr/bin/env bash
# The scaling study (python -m finetune.scaling) with every pretraining and finetuning run under DeepSpeed's
# launcher through launch/pretrain.sh: NPROC ranks per run on this machine, or the nodes of HOSTFILE.
#
#   launch/scaling.sh --config launch/studies/demo.toml                                   # after launch/demo.sh
#   NPROC=8 launch/scaling.sh --config launch/studies/ml100k_top.toml \
#       scaling.sources=data/microlens-50k,data/hm scaling.target=data/ml-100k       # 8 GPUs per run
#   HOSTFILE=launch/hostfile.example NPROC=8 launch/scaling.sh --config ...               # every node per run
#
# Arguments go to `python -m finetune.scaling` (see its --help); this script adds scaling.launcher (launch/pretrain.sh
# --module ...) and scaling.ranks (NPROC x nodes, for the step arithmetic of scaling.pretrain_epochs). The
# environment variables are launch/pretrain.sh's (NPROC, HOSTFILE, NNODES, MASTER_ADDR, MASTER_PORT).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x .venv/bin/python ]; then
    export PATH="$PWD/.venv/bin:$PATH"
fi
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
NODES=1
if [ -n "${HOSTFILE:-}" ]; then
    NODES="${NNODES:-$(grep -cE '^[^#[:space:]]' "$HOSTFILE")}"
fi
export NPROC
exec python -m finetune.scaling "$@" 'scaling.launcher=["bash", "launch/pretrain.sh", "--module"]' \
    "scaling.ranks=$((NPROC * NODES))"
