#!/usr/bin/env bash
# The GPT-2-small-scale setups of the two source papers, one per router, on top of
# train_gpt_distributed.sh (so torchrun, multi-node and SLURM work the same way).
#
#   RECIPE=self-routing   bash examples/gpt2_small_recipes.sh   # 12L, H768, 8 experts top-2 (Self-Routing paper scale)
#   RECIPE=learned        bash examples/gpt2_small_recipes.sh   # same, Megatron TopKRouter + aux loss 1e-2
#   RECIPE=random|hash    bash examples/gpt2_small_recipes.sh   # same, 0-parameter baselines
#   RECIPE=dense          bash examples/gpt2_small_recipes.sh   # same model, dense MLP
#   RECIPE=routing-free   bash examples/gpt2_small_recipes.sh   # 12L, D512, 12 experts, rank 32, rho*=1/4 (Routing-Free "S")
#   RECIPE=topk-baseline  bash examples/gpt2_small_recipes.sh   # 12L, D512, 12 experts, top-3 learned (its baseline)
#
# Toy size on a CPU box: SIZE=toy GPUS_PER_NODE=2 RECIPE=self-routing bash examples/gpt2_small_recipes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-self-routing}
EXTRA=()
case "$RECIPE" in
  self-routing)  export ROUTER=self NUM_EXPERTS=8 TOPK=2 ;;
  learned)       export ROUTER=learned NUM_EXPERTS=8 TOPK=2; EXTRA+=(--moe-aux-loss-coeff 1e-2) ;;
  random)        export ROUTER=random NUM_EXPERTS=8 TOPK=2 ;;
  hash)          export ROUTER=hash NUM_EXPERTS=8 TOPK=2 ;;
  dense)         export ROUTER=dense ;;
  routing-free)  export ROUTER=routing-free NUM_EXPERTS=12 TOPK=3
                 EXTRA+=(--routing-free-rank 32 --routing-free-density-target 0.25 --routing-free-mu 0.5) ;;
  topk-baseline) export ROUTER=learned NUM_EXPERTS=12 TOPK=3; EXTRA+=(--moe-aux-loss-coeff 1e-2) ;;
  *) echo "error: unknown RECIPE '$RECIPE'" >&2; exit 2 ;;
esac
case "$RECIPE" in
  routing-free|topk-baseline) H=512; HEADS=8; FFN=1024 ;;
  *) H=768; HEADS=12; FFN=3072 ;;
esac
if [ "${SIZE:-full}" = toy ]; then
  export MODEL_ARGS="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 --moe-ffn-hidden-size 64"
  export DATA_ARGS=${DATA_ARGS:---mock-data --tokenizer-type NullTokenizer --vocab-size 512}
  export TRAIN_ITERS=${TRAIN_ITERS:-4} MICRO_BATCH=${MICRO_BATCH:-2} GLOBAL_BATCH=${GLOBAL_BATCH:-4}
  export LOG_INTERVAL=1 EVAL_INTERVAL=1000 EVAL_ITERS=1 SAVE_INTERVAL=1000 WARMUP=1
else
  export MODEL_ARGS="--num-layers 12 --hidden-size $H --num-attention-heads $HEADS --ffn-hidden-size $FFN --moe-ffn-hidden-size $FFN --seq-length 1024 --max-position-embeddings 1024"
fi
export RUN_NAME=${RUN_NAME:-gpt2s-${RECIPE}}
exec bash examples/train_gpt_distributed.sh "${EXTRA[@]}" "$@"
