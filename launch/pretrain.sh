#!/usr/bin/env bash
# Pretrain through DeepSpeed's launcher (`deepspeed --module pretrain ...`): one machine, or the nodes of a hostfile.
#
#   NPROC=2 launch/pretrain.sh --config launch/configs/tiny.toml                  # 2 ranks on this machine
#   NPROC=2 launch/pretrain.sh --config launch/configs/tiny.toml --config launch/ds/zero3.toml optim.max_steps=5
#   NPROC=2 launch/pretrain.sh --config launch/configs/tiny.toml --resume         # continue from the latest checkpoint
#   HOSTFILE=launch/hostfile.example NPROC=8 launch/pretrain.sh --config ...      # every node of the hostfile
#
#   MODULE=finetune NPROC=2 launch/pretrain.sh --from runs/x/model --data data/target --mode lora  # finetune too
#   NPROC=2 launch/pretrain.sh --module finetune --from ...                       # the same (as launch/scaling.sh does)
#
# Arguments go to `python -m pretrain` (or $MODULE) unchanged (see `python -m pretrain --help`); the launcher appends
# --local_rank=N, which pretrain accepts and ignores (the rank comes from the environment it sets).
#
# Environment:
#   MODULE       the module to launch: pretrain (default) or finetune; a first argument `--module NAME` wins
#   NPROC        ranks per node (default: the GPUs of this machine, or 1 without GPU)
#   HOSTFILE     several nodes: DeepSpeed's hostfile ("host slots=N" per line). Needs passwordless ssh and pdsh,
#                the same checkout and .venv path on every node, and a shared file system for run.out_dir
#                (checkpoints). The variables below reach the other nodes through a DS_ENV_FILE written here.
#   NNODES       use only the first NNODES hosts of HOSTFILE (default: all)
#   MASTER_ADDR  rendezvous host (default: localhost, or the first host of HOSTFILE); MASTER_PORT (default 29500)
# Without a GPU: DS_ACCELERATOR=cpu (DeepSpeed's CPU accelerator, gloo) and OMP_NUM_THREADS=1 per rank unless set:
# ranks sharing the cores each with a full thread pool ran 4-10x slower.
#
# torchrun works as well (no pdsh/ssh: start it on every node):
#   torchrun --nproc_per_node 2 -m pretrain --config launch/configs/tiny.toml
#   torchrun --nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 --nproc_per_node 2 \
#       -m pretrain --config ...            # and --node_rank 1 on the second node; Slurm: sbatch launch/slurm.sbatch
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x .venv/bin/python ]; then
    export PATH="$PWD/.venv/bin:$PATH"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--module" ]; then
    MODULE="$2"
    shift 2
fi

GPUS="$(python -c 'import torch; print(torch.cuda.device_count())')"
FORWARD=(HF_HUB_OFFLINE TRANSFORMERS_OFFLINE TOKENIZERS_PARALLELISM)
if [ "$GPUS" = 0 ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    FORWARD+=(DS_ACCELERATOR OMP_NUM_THREADS)
    NPROC="${NPROC:-1}"
else
    NPROC="${NPROC:-$GPUS}"
fi

ARGS=(--num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
    ARGS+=(--hostfile "$HOSTFILE")
    if [ -n "${NNODES:-}" ]; then ARGS+=(--num_nodes "$NNODES"); fi
    if [ -n "${MASTER_ADDR:-}" ]; then ARGS+=(--master_addr "$MASTER_ADDR"); fi
    # DeepSpeed's pdsh runner exports to the other nodes what DS_ENV_FILE lists (an absolute path works)
    DS_ENV_FILE="$(mktemp "${TMPDIR:-/tmp}/momrec-deepspeed-env.XXXXXX")"
    export DS_ENV_FILE
    trap 'rm -f "$DS_ENV_FILE"' EXIT
    for name in "${FORWARD[@]}"; do echo "$name=${!name}" >> "$DS_ENV_FILE"; done
    deepspeed "${ARGS[@]}" --module "${MODULE:-pretrain}" "$@"
else
    ARGS+=(--num_nodes 1)
    if [ -n "${MASTER_ADDR:-}" ]; then ARGS+=(--master_addr "$MASTER_ADDR"); fi
    exec deepspeed "${ARGS[@]}" --module "${MODULE:-pretrain}" "$@"
fi
