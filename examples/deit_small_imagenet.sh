#!/usr/bin/env bash
# DeiT-S/16 on ImageNet-1K (the Self-Routing paper's vision setup), one MoE router per RECIPE,
# launched with torchrun on one or many nodes.
#
#   DATA_PATH=/data/imagenet RECIPE=self-routing bash examples/deit_small_imagenet.sh  # 8 experts top-2, Self-Routing
#   RECIPE=learned|random|hash|routing-free|dense ...                                 # the other routers, same model
#   Multi node: run on every node with NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) set.
#   CPU toy run (Fashion-MNIST, downloaded once): SIZE=toy GPUS_PER_NODE=2 EP=2 RECIPE=self-routing bash examples/deit_small_imagenet.sh
#
# DATA_PATH holds train/<class>/*.JPEG and val/<class>/*.JPEG (or a datasets.save_to_disk dir).
# DeiT recipe (Touvron et al. 2021): 12 layers, hidden 384, 6 heads, 224x224, patch 16, 300 epochs,
# AdamW lr 5e-4 x batch/512, weight decay 0.05, cosine to 1e-5, 5 warmup epochs, label smoothing 0.1,
# Mixup 0.8, CutMix 1.0, RandAugment m9-mstd0.5, random erasing 0.25, drop path 0.1, repeated
# augmentation 3. MoE: 8 experts top-2 in every layer (MOE_LAYER_FREQ=2: every other layer, as V-MoE).
# Every other pretrain_vit.py flag can be appended.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-self-routing}
EXTRA=()
case "$RECIPE" in
  self-routing) ROUTER=self ;;
  learned)      ROUTER=learned; EXTRA+=(--moe-aux-loss-coeff 1e-2) ;;
  random)       ROUTER=random ;;
  hash)         ROUTER=hash ;;
  routing-free) ROUTER=routing-free; EXTRA+=(--routing-free-rank 32 --routing-free-density-target 0.25) ;;
  dense)        ROUTER=dense ;;
  *) echo "error: unknown RECIPE '$RECIPE'" >&2; exit 2 ;;
esac
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}
[ "${GPUS_PER_NODE}" -ge 1 ] 2>/dev/null || GPUS_PER_NODE=1
NNODES=${NNODES:-${SLURM_NNODES:-1}}; NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-6000}
TP=${TP:-1}; EP=${EP:-1}
NUM_EXPERTS=${NUM_EXPERTS:-8}; TOPK=${TOPK:-2}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python

if [ "${SIZE:-full}" = toy ]; then  # a few iterations of a tiny ViT on Fashion-MNIST (the demo's data)
  MODEL_ARGS="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 --img-h 28 --img-w 28 --num-channels 1 --patch-dim 7 --num-classes 10 --vit-pool mean"
  DATA_ARGS=""
  GLOBAL_BATCH=${GLOBAL_BATCH:-16}; MICRO_BATCH=${MICRO_BATCH:-4}; TRAIN_ITERS=${TRAIN_ITERS:-4}
  LR=${LR:-1e-3}; WARMUP=${WARMUP:-1}; LOG_INTERVAL=1; EVAL_INTERVAL=1000; EVAL_ITERS=1; SAVE_INTERVAL=1000
  AUG_ARGS="--mixup 0.8 --cutmix 1.0 --smoothing 0.1 --reprob 0.25 --drop-path 0.1 --num-workers 1"
else
  MODEL_ARGS="--num-layers 12 --hidden-size 384 --num-attention-heads 6 --ffn-hidden-size 1536 --img-h 224 --img-w 224 --num-channels 3 --patch-dim 16 --num-classes 1000"
  DATA_ARGS="--data-path ${DATA_PATH:?set DATA_PATH to an ImageNet folder with train/ and val/}"
  GLOBAL_BATCH=${GLOBAL_BATCH:-1024}; MICRO_BATCH=${MICRO_BATCH:-128}
  ITERS_PER_EPOCH=$(( (1281167 + GLOBAL_BATCH - 1) / GLOBAL_BATCH ))
  TRAIN_ITERS=${TRAIN_ITERS:-$(( 300 * ITERS_PER_EPOCH ))}; WARMUP=${WARMUP:-$(( 5 * ITERS_PER_EPOCH ))}
  LR=${LR:-$(python3 -c "print(5e-4 * ${GLOBAL_BATCH} / 512)")}
  LOG_INTERVAL=${LOG_INTERVAL:-50}; EVAL_INTERVAL=${EVAL_INTERVAL:-${ITERS_PER_EPOCH}}
  EVAL_ITERS=${EVAL_ITERS:-$(( 50000 / GLOBAL_BATCH ))}; SAVE_INTERVAL=${SAVE_INTERVAL:-${ITERS_PER_EPOCH}}
  AUG_ARGS="--mixup 0.8 --cutmix 1.0 --smoothing 0.1 --auto-augment rand-m9-mstd0.5-inc1 --reprob 0.25 --drop-path 0.1 --repeated-aug 3 --num-workers ${NUM_WORKERS:-10}"
fi
MOE_ARGS="--num-experts ${NUM_EXPERTS} --moe-router-topk ${TOPK} --moe-router-type ${ROUTER} --moe-layer-freq ${MOE_LAYER_FREQ:-1} --moe-token-dispatcher-type alltoall"
[ "${ROUTER}" = dense ] && MOE_ARGS=""
PAR_ARGS="--tensor-model-parallel-size ${TP} --expert-model-parallel-size ${EP}"
[ "${TP}" -gt 1 ] && PAR_ARGS="${PAR_ARGS} --sequence-parallel"
RUN_NAME=${RUN_NAME:-deit-s16-${RECIPE}}

exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node "${GPUS_PER_NODE}" --nnodes "${NNODES}" --node_rank "${NODE_RANK}" \
  --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" \
  pretrain_vit.py ${MODEL_ARGS} ${MOE_ARGS} ${PAR_ARGS} ${DATA_ARGS} ${AUG_ARGS} \
  --micro-batch-size "${MICRO_BATCH}" --global-batch-size "${GLOBAL_BATCH}" --train-iters "${TRAIN_ITERS}" \
  --lr "${LR}" --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters "${WARMUP}" \
  --weight-decay 0.05 --clip-grad 0 --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-8 --init-method-std 0.02 \
  --hidden-dropout 0 --attention-dropout 0 --disable-bias-linear \
  --log-interval "${LOG_INTERVAL}" --eval-interval "${EVAL_INTERVAL}" --eval-iters "${EVAL_ITERS}" \
  --save "${SAVE_DIR:-checkpoints/${RUN_NAME}}" --load "${SAVE_DIR:-checkpoints/${RUN_NAME}}" \
  --save-interval "${SAVE_INTERVAL}" --tensorboard-dir "${TB_DIR:-runs/${RUN_NAME}}" \
  "${EXTRA[@]}" "$@"
