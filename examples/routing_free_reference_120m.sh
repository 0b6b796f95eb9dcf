#!/usr/bin/env bash
# The Routing-Free MoE authors' 120M recipe (RoutingFreeMoE@9cce561: pretrain.sh, 120M.config.json,
# init.py) in one flag, `--routing-free-preset reference`: theta 0.2, rho* 0.25, eta 0.2 with the
# quadratic lambda rule updated every micro-batch, mu 0.5, rank 16, 12 experts of width 128, gate
# scale 1 and bias 1e-6 at init, SiLU AoE experts (--swiglu), N(0, 0.02) init, lambda0 1e-5, the
# first layer dense (--moe-layer-freq "([0]+[1]*(L-1))" unless given); around
# it their 12 layers of width 512, sequence 512, AdamW lr 5e-4, weight decay 0.01, bf16.
# Differences that remain (Megatron GPT attention instead of MLA, ...) are in README.md, "Routing-Free MoE: the loss and the authors' code".
#
#   DATA_PATH=... bash examples/routing_free_reference_120m.sh
#   SIZE=toy GPUS_PER_NODE=2 bash examples/routing_free_reference_120m.sh      # a few steps on a CPU box
set -euo pipefail
cd "$(dirname "$0")/.."
export ROUTER=routing-free NUM_EXPERTS=12 TOPK=3 LR=${LR:-5e-4} MIN_LR=${MIN_LR:-5e-5}
if [ "${SIZE:-full}" = toy ]; then
  export MODEL_ARGS="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64"
  export DATA_ARGS=${DATA_ARGS:---mock-data --tokenizer-type NullTokenizer --vocab-size 512}
  export TRAIN_ITERS=${TRAIN_ITERS:-4} MICRO_BATCH=${MICRO_BATCH:-2} GLOBAL_BATCH=${GLOBAL_BATCH:-4}
  export LOG_INTERVAL=1 EVAL_INTERVAL=1000 EVAL_ITERS=1 SAVE_INTERVAL=1000 WARMUP=1
  PREC=()
else
  export MODEL_ARGS="--num-layers 12 --hidden-size 512 --num-attention-heads 8 --seq-length 512 --max-position-embeddings 512"
  PREC=(--bf16)
fi
export RUN_NAME=${RUN_NAME:-routing-free-reference-120m}
exec bash examples/train_gpt_distributed.sh --routing-free-preset reference --weight-decay 0.01 "${PREC[@]}" "$@"
