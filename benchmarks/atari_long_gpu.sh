#!/bin/bash
# `make atari-long` on one GPU machine without a package index (a short device lease): the same
# recipe and steps as on 2 CPU cores (README "Results on Atari"), run through the Makefile itself
# with the machine's Python standing in for the project's venv, then `worldmodel eval` of every
# checkpoint of the learning curve (horizon 4, as the README's table).
#
#   bash benchmarks/atari_long_gpu.sh [OUT_DIR]     # default: $OUT (the device tool's folder) or outputs/atari-long-gpu
#   SEEDS="0 1" bash benchmarks/atari_long_gpu.sh   # one run per seed, each in OUT_DIR/seedN (default SEEDS=0)
#
# Wheels the machine lacks (ale-py and gymnasium for the recording among them) may be carried in
# .whl/ (installed offline, --no-deps). ATARI_LONG_TINY=1 runs a few steps of everything on the CPU
# (how the tests keep it working).
set -eu
cd "$(dirname "$0")/.."
out="${1:-${OUT:-outputs/atari-long-gpu}}"
python="$(command -v "${PYTHON:-python}")"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline PYTHONUNBUFFERED=1

# The Makefile runs $(BIN)/python and $(BIN)/worldmodel, and builds the venv only when
# $(BIN)/worldmodel is missing or older than pyproject.toml: a fresh folder of two stand-ins is neither.
# (Scripts, not links: a link to a venv's interpreter would start it outside its venv.)
bin="$(mktemp -d)"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$python" > "$bin/python"
printf '#!/bin/sh\nexec "%s" -m worldmodel.cli "$@"\n' "$python" > "$bin/worldmodel"
chmod +x "$bin/python" "$bin/worldmodel"

train="trainer.accelerator=gpu trainer.devices=1 trainer.compile=true data.num_workers=8 logger=csv"
record="--workers $(nproc)"
scored=(--device cuda --clips 128 --batch-size 32)  # wider rollout batches on a GPU
tiny=()
if [[ -n "${ATARI_LONG_TINY:-}" ]]; then
    train="trainer.accelerator=cpu data.num_workers=0 logger=csv"
    record="--workers 2 --val-fraction 0.5"
    scored=(--device cpu --clips 4)
    tiny=(EPISODES=2 MAX_STEPS=40 ATARI_TOKENIZER="trainer.max_steps=2"
        ATARI_DYNAMICS="trainer.max_steps=4 trainer.checkpoint_every_n_steps=2")
fi
for seed in ${SEEDS:-0}; do
    run="$out/seed$seed"
    make atari-long BIN="$bin" OUT="$run" ATARI_RECORD="$record" ATARI_TRAIN="$train seed=$seed" \
        ATARI_EVAL="${scored[*]}" "${tiny[@]}"
    # the learning curve, as the README's table: a report per checkpoint in eval_curve/, side by side in comparison.md
    "$bin/worldmodel" eval "$run"/dynamics/checkpoints/step*.ckpt --data "$run/data" --context 4 --horizon 4 \
        --steps 4 --guidance 1 "${scored[@]}" --out "$run/eval_curve"
done
