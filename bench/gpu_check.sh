#!/usr/bin/env bash
# The one prepared GPU check, for a session that is lent the `device` tool's H200 (Python 3.12,
# torch 2.11 there; no megatron-core or DeepSpeed, nothing fetched there). Two halves:
#
#   bash bench/gpu_check.sh prepare     # HERE (CPU, network to PyPI): writes .whl/ (gitignored):
#       wheels for Python 3.12 (megatron-core, DeepSpeed built here as a pure-Python wheel, pydantic,
#       hjson) and ref/<router>/: a 1-iteration CPU checkpoint and the fp32 losses of 6 more
#       iterations from it on the CPU.
#   device run: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 540
#       1. versions and the GPU;
#       2. fp32 (TF32 off): the same 6 iterations from the same checkpoint on the GPU; prints each
#          loss beside the CPU's and the largest relative difference (learned and self routers);
#       3. bf16 throughput of learned vs self (bench/train_throughput.py, GPT-2-small-scale MoE,
#          local spec: TransformerEngine is not installed there), tokens/s and MFU;
#       4. expert/tensor parallel on one GPU does not apply (one rank per GPU under NCCL): said so.
#   Every stage runs under its own timeout and the next one runs whatever happened.
#
# On a CPU box `GPU_CHECK_ON_CPU=1 bash bench/gpu_check.sh` runs the device half here (toy throughput
# size): a rehearsal of the plumbing, whose fp32 differences must be 0.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHL=$REPO/.whl
ROUTERS="learned self"
TINY=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64
      --micro-batch-size 4 --global-batch-size 8 --num-experts 4 --moe-router-topk 2 --lr 3e-3
      --lr-warmup-iters 0 --log-interval 1 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0
      --disable-bias-linear --mock-data --tokenizer-type NullTokenizer --vocab-size 255 --seed 1234)

losses_json() {  # losses_json TBDIR OUT.json: {"step": lm loss} from TensorBoard
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1]); ea.Reload()
json.dump({e.step: e.value for e in ea.Scalars("lm loss")}, open(sys.argv[2], "w"))
EOF
}

if [ "${1:-}" = "prepare" ]; then
  PY=${PY:-.venv/bin/python}
  rm -rf "$WHL.tmp" && mkdir -p "$WHL.tmp/ref"
  plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$WHL.tmp" megatron-core==0.16.1 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 || exit 1
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$WHL.tmp" deepspeed==0.19.8 || exit 1
  for r in $ROUTERS; do
    d=$WHL.tmp/ref/$r
    "$PY" pretrain_gpt.py "${TINY[@]}" --moe-router-type "$r" --train-iters 1 --save "$d/ckpt" > "$d.log" 2>&1 || { tail "$d.log"; exit 1; }
    "$PY" pretrain_gpt.py "${TINY[@]}" --moe-router-type "$r" --train-iters 6 --finetune --load "$d/ckpt" \
      --tensorboard-dir "$d/tb" >> "$d.log" 2>&1 || { tail "$d.log"; exit 1; }
    losses_json "$d/tb" "$d/cpu_losses.json" && rm -rf "$d/tb"
  done
  rm -rf "$WHL" && mv "$WHL.tmp" "$WHL"
  du -sh "$WHL"; ls "$WHL"
  exit 0
fi

# ------------------------------------------------------------------ the device half
PY=${PY:-python3}
[ -d "$WHL/ref" ] || { echo "error: $WHL/ref missing: run 'bash bench/gpu_check.sh prepare' here first, then carry .whl"; exit 2; }
if [ -z "${GPU_CHECK_ON_CPU:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$REPO
  SIZE=gpt2-small
else
  PY=.venv/bin/python
  SIZE=toy
fi
export NVIDIA_TF32_OVERRIDE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"

echo "== 1. versions"
"$PY" -c "import torch, megatron.core, deepspeed, sys; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-',
'| megatron-core', megatron.core.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | grep -v -i warn

echo "== 2. fp32 losses from the CPU's checkpoint, 6 iterations (TF32 off)"
for r in $ROUTERS; do
  d=$WHL/ref/$r
  timeout 240 "$PY" pretrain_gpt.py "${TINY[@]}" --moe-router-type "$r" --train-iters 6 --finetune --load "$d/ckpt" \
    --tensorboard-dir "$OUT/tb_$r" > "$OUT/fp32_$r.log" 2>&1 || { echo "FAILED: fp32 $r"; tail -25 "$OUT/fp32_$r.log"; continue; }
  losses_json "$OUT/tb_$r" "$OUT/losses_$r.json"
  "$PY" - "$d/cpu_losses.json" "$OUT/losses_$r.json" "$r" <<'EOF'
import json, sys
cpu, dev = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
worst = 0.0
for k in sorted(cpu, key=int):
    rel = abs(dev[k] - cpu[k]) / abs(cpu[k])
    worst = max(worst, rel)
    print(f"  {sys.argv[3]:8s} iteration {k}: cpu {cpu[k]:.7f}  device {dev[k]:.7f}  rel {rel:.2e}")
print(f"  {sys.argv[3]}: largest relative difference {worst:.2e} ({'OK' if worst < 1e-4 else 'DIFFERS'}, bound 1e-4)")
EOF
done

echo "== 3. bf16 throughput, learned vs self ($SIZE, local spec)"
prec=--bf16; [ -n "${GPU_CHECK_ON_CPU:-}" ] && prec=
timeout 420 "$PY" bench/train_throughput.py --routers learned,self --size "$SIZE" $prec 2>&1 | grep -v -i warn | tail -8 \
  || echo "FAILED: throughput"

echo "== 4. expert/tensor parallel: one GPU holds one NCCL rank; EP/TP > 1 needs 2+ GPUs (CPU: tests/distributed, gloo)"
