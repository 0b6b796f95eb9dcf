#!/usr/bin/env bash
# Launch pretrain_gpt.py with torchrun on one or many nodes.
#
# Single node:   GPUS_PER_NODE=8 bash examples/train_gpt_distributed.sh
# Multi node:    run on every node with NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) set,
#                or under SLURM (see slurm_train_gpt.sbatch), where they are read from SLURM_*.
# CPU toy run:   GPUS_PER_NODE=2 TP=1 EP=2 MODEL_ARGS="--num-layers 2 --hidden-size 64 \
#                  --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64" \
#                TRAIN_ITERS=5 WARMUP=1 MICRO_BATCH=2 GLOBAL_BATCH=4 DATA_ARGS="--mock-data --vocab-size 512 \
#                  --tokenizer-type NullTokenizer" bash examples/train_gpt_distributed.sh
#
# Every other pretrain_gpt.py flag can be appended: bash examples/train_gpt_distributed.sh --bf16
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}
[ "${GPUS_PER_NODE}" -ge 1 ] 2>/dev/null || GPUS_PER_NODE=1
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}

TP=${TP:-1}; PP=${PP:-1}; EP=${EP:-1}
ROUTER=${ROUTER:-self}
NUM_EXPERTS=${NUM_EXPERTS:-8}; TOPK=${TOPK:-2}
MICRO_BATCH=${MICRO_BATCH:-8}; GLOBAL_BATCH=${GLOBAL_BATCH:-256}
TRAIN_ITERS=${TRAIN_ITERS:-20000}
RUN_NAME=${RUN_NAME:-gpt-${ROUTER}-e${NUM_EXPERTS}k${TOPK}}
MODEL_ARGS=${MODEL_ARGS:---num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024 --max-position-embeddings 1024}
DATA_ARGS=${DATA_ARGS:---data-path ${DATA_PATH:?set DATA_PATH to a preprocessed prefix, or DATA_ARGS} --tokenizer-type GPT2BPETokenizer --split 969,30,1}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python

MOE_ARGS="--num-experts ${NUM_EXPERTS} --moe-router-topk ${TOPK} --moe-router-type ${ROUTER} --moe-token-dispatcher-type alltoall"
[ "${ROUTER}" = dense ] && MOE_ARGS=""

PAR_ARGS="--tensor-model-parallel-size ${TP} --pipeline-model-parallel-size ${PP} --expert-model-parallel-size ${EP}"
[ "${TP}" -gt 1 ] && PAR_ARGS="${PAR_ARGS} --sequence-parallel"

exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node "${GPUS_PER_NODE}" --nnodes "${NNODES}" --node_rank "${NODE_RANK}" \
  --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" \
  pretrain_gpt.py ${MODEL_ARGS} ${MOE_ARGS} ${PAR_ARGS} ${DATA_ARGS} \
  --micro-batch-size "${MICRO_BATCH}" --global-batch-size "${GLOBAL_BATCH}" --train-iters "${TRAIN_ITERS}" \
  --lr ${LR:-6e-4} --min-lr ${MIN_LR:-6e-5} --lr-decay-style cosine --lr-warmup-iters ${WARMUP:-200} \
  --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.02 --disable-bias-linear \
  --log-interval ${LOG_INTERVAL:-10} --eval-interval ${EVAL_INTERVAL:-500} --eval-iters ${EVAL_ITERS:-20} \
  --save "${SAVE_DIR:-checkpoints/${RUN_NAME}}" --load "${SAVE_DIR:-checkpoints/${RUN_NAME}}" \
  --save-interval ${SAVE_INTERVAL:-1000} --tensorboard-dir "${TB_DIR:-runs/${RUN_NAME}}" \
  "$@"
