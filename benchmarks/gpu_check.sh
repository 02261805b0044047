#!/bin/bash
# Every GPU path of worldmodel, checked in one short run on one GPU (about 8 minutes):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default: $OUT (the device tool's folder) or gpu_check/
#
# Each check runs on its own with a time limit and writes PASS / FAIL with its numbers to
# OUT_DIR/gpu_check.md (its full log beside it); one failure never stops the others. Checks:
#   env          GPU, driver, torch / lightning / deepspeed versions
#   tokenizer    30 steps of the demo tokenizer: bf16-mixed, torch.compile, fused AdamW; steps/s, MFU
#   dynamics     30 steps of the demo dynamics model on that tokenizer, same settings
#   zero2        the tokenizer under DeepSpeed ZeRO-2 in bf16
#   zero3        the tokenizer under ZeRO-3 with torch.compile (works, or is refused at startup)
#   eval         worldmodel eval of the dynamics checkpoint on the GPU (KV-cached rollouts)
#   dynamics_s   30 steps of dynamics_s (99M parameters) on the same tokens: MFU at a real size
#   tokenize     worldmodel tokenize on the GPU, then 30 dynamics steps from the token shards
# Wheels the machine lacks may be carried in .whl/ (installed with --no-deps first).
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
report="$out/gpu_check.md"
work="$(mktemp -d)"
python="${PYTHON:-python}"
echo "# gpu_check $(date -Is)" > "$report"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install --quiet --no-deps .whl/*.whl >> "$out/install.log" 2>&1
fi
"$python" -m pip install --quiet --no-deps -e . >> "$out/install.log" 2>&1
export WANDB_MODE=offline PYTHONUNBUFFERED=1

check() {  # check NAME SECONDS COMMAND...: run it, log it, record PASS/FAIL with its time
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    if timeout "$limit" "$@" > "$out/$name.log" 2>&1; then
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
check sample 300 "$python" -m worldmodel.cli prepare sample --out "$work/sample"

gpu=(trainer=gpu trainer.devices=1 logger=csv data.root="$work/sample" data.num_workers=4
     trainer.max_steps=30 trainer.log_every_n_steps=5 trainer.val_every_n_steps=30
     trainer.limit_val_batches=2 trainer.checkpoint_every_n_steps=30 trainer.video_every_n_steps=30)
check tokenizer 300 "$python" train.py experiment=demo_tokenizer "${gpu[@]}" run_dir="$work/tokenizer"
echo "  tokenizer: MFU $(last_metric "$work/tokenizer" perf/mfu), clips/s $(last_metric "$work/tokenizer" perf/clips_per_s)" >> "$report"
check dynamics 300 "$python" train.py experiment=demo_dynamics "${gpu[@]}" run_dir="$work/dynamics" \
    task.tokenizer_checkpoint="$work/tokenizer/checkpoints/last.ckpt"
echo "  dynamics: MFU $(last_metric "$work/dynamics" perf/mfu), clips/s $(last_metric "$work/dynamics" perf/clips_per_s)" >> "$report"
check zero2 300 "$python" train.py experiment=demo_tokenizer "${gpu[@]}" run_dir="$work/zero2" \
    strategy=deepspeed_zero2 trainer.compile=false
check zero3 300 "$python" train.py experiment=demo_tokenizer "${gpu[@]}" run_dir="$work/zero3" \
    strategy=deepspeed_zero3
check eval 300 "$python" -m worldmodel.cli eval "$work/dynamics/checkpoints/last.ckpt" --data "$work/sample" \
    --context 4 --horizon 4 --clips 16 --device cuda --out "$out/eval"
check dynamics_s 300 "$python" train.py experiment=demo_dynamics "${gpu[@]}" run_dir="$work/dynamics_s" \
    model=dynamics_s data.global_batch_size=16 task.tokenizer_checkpoint="$work/tokenizer/checkpoints/last.ckpt"
echo "  dynamics_s: MFU $(last_metric "$work/dynamics_s" perf/mfu), clips/s $(last_metric "$work/dynamics_s" perf/clips_per_s)" >> "$report"
check tokenize 300 "$python" -m worldmodel.cli tokenize "$work/tokenizer/checkpoints/last.ckpt" \
    --data "$work/sample" --out "$work/tokens" --frames 8 --batch-size 64
check from_tokens 300 "$python" train.py experiment=demo_dynamics "${gpu[@]}" run_dir="$work/from_tokens" \
    data=tokens data.root="$work/tokens" data.frames=8 task.tokenizer_checkpoint=null
echo "  from_tokens: clips/s $(last_metric "$work/from_tokens" perf/clips_per_s)" >> "$report"
cat "$report"
