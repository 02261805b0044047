# worldmodel: the commands a new user runs. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := data/shards/sample

.PHONY: setup procgen-env demo atari atari-long atari-lam coinrun latent-stages test test-fast lint bench clean

$(BIN)/worldmodel: pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a CPU-only machine must never pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$$(grep '^torch==' requirements-lock.txt)"
	$(BIN)/pip install --quiet -c requirements-lock.txt -e ".[dev]"
	touch $(BIN)/worldmodel

setup: $(BIN)/worldmodel

# procgen (CoinRun) pins numpy<2 and gym<1: `worldmodel prepare coinrun` records with this separate
# interpreter (worldmodel/data/sources/coinrun.py).
PROCGEN_VENV := .venv-procgen
$(PROCGEN_VENV)/bin/python:
	$(PYTHON) -m venv $(PROCGEN_VENV)
	$(PROCGEN_VENV)/bin/pip install --quiet procgen-mirror==0.10.7 numpy==1.26.4 gym==0.26.2 gym3==0.3.3

procgen-env: $(PROCGEN_VENV)/bin/python

DEMO := outputs/demo

# Each demo starts afresh: training refuses a run_dir that holds an earlier run's checkpoints.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/worldmodel prepare sample --out $(SAMPLE)
	$(BIN)/worldmodel inspect $(SAMPLE) --batches 2 --batch-size 4 --workers 2
	$(BIN)/python train.py experiment=demo_tokenizer run_dir=$(DEMO)/tokenizer
	$(BIN)/python train.py experiment=demo_dynamics run_dir=$(DEMO)/dynamics \
		task.tokenizer_checkpoint=$(DEMO)/tokenizer/checkpoints/last.ckpt
	$(BIN)/worldmodel eval $(DEMO)/dynamics/checkpoints/last.ckpt --data $(SAMPLE) \
		--context 4 --horizon 4 --clips 8 --steps 4 --out $(DEMO)/eval
	@echo
	@echo "demo done. Tokenizer: $(DEMO)/tokenizer, dynamics: $(DEMO)/dynamics"
	@echo "  checkpoints/  last.ckpt and every 100 steps;   media/  preview mp4s (truth | model)"
	@echo "  wandb/        offline run logs: .venv/bin/wandb sync $(DEMO)/dynamics/wandb/offline-run-*"

# The real-data proof (README "Results on Atari"): record game play, train both stages, evaluate
# on held-out episodes; about 55-60 minutes on 2 CPU cores. The recipe is the same for every game:
# `make atari GAMES=Pong,Seaquest OUT=outputs/atari-other`. ATARI_RECORD (prepare options),
# ATARI_TRAIN (Hydra overrides for both stages) and ATARI_EVAL (eval options), EPISODES and
# MAX_STEPS exist for ablations and short trial runs.
GAMES ?= Boxing,Riverraid
OUT ?= outputs/atari
EPISODES ?= 48
MAX_STEPS ?= 500
ATARI_RECORD ?=
ATARI_TRAIN ?=
ATARI_TOKENIZER ?=
ATARI_DYNAMICS ?=
ATARI_EVAL ?=
atari: setup
	$(BIN)/worldmodel prepare atari --games $(GAMES) --episodes $(EPISODES) --max-steps $(MAX_STEPS) \
		--frames 16 --size 64 --out $(OUT)/data $(ATARI_RECORD)
	$(BIN)/python train.py experiment=atari_cpu/tokenizer run_dir=$(OUT)/tokenizer data.root=$(OUT)/data \
		$(ATARI_TRAIN) $(ATARI_TOKENIZER)
	$(BIN)/python train.py experiment=atari_cpu/dynamics run_dir=$(OUT)/dynamics data.root=$(OUT)/data \
		task.tokenizer_checkpoint=$(OUT)/tokenizer/checkpoints/last.ckpt $(ATARI_TRAIN) $(ATARI_DYNAMICS)
	$(BIN)/worldmodel eval $(OUT)/dynamics/checkpoints/last.ckpt --data $(OUT)/data \
		--context 4 --horizon 8 --clips 128 --steps 4 --guidance 1 --out $(OUT)/eval $(ATARI_EVAL)

# The same recipe trained longer (README "Results on Atari": the learning curve says why): 3x the
# tokenizer's steps, 8x the dynamics model's, a checkpoint every 1300 steps for the curve. About
# 6 hours on 2 CPU cores; on a GPU add ATARI_TRAIN="trainer.accelerator=gpu trainer.devices=1".
# Interrupted, it continues with ATARI_TRAIN=resume=last: the recording is seeded (made again
# byte for byte), a finished stage resumes as done, the unfinished one from its newest checkpoint.
atari-long:
	$(MAKE) atari OUT=$(if $(filter outputs/atari,$(OUT)),outputs/atari-long,$(OUT)) \
		ATARI_TOKENIZER="trainer.max_steps=3000 $(ATARI_TOKENIZER)" \
		ATARI_DYNAMICS="trainer.max_steps=10400 trainer.checkpoint_every_n_steps=1300 \
		trainer.val_every_n_steps=1300 trainer.video_every_n_steps=10400 $(ATARI_DYNAMICS)"

# The Atari proof with the true actions hidden from training (README "Latent actions"): the same
# recording and tokenizer, a latent action model learns the actions from the frames alone, the
# dynamics model trains on its latent actions; eval scores ΔtPSNR under them and how much they say
# about the recorded actions. Accepts the variables of `make atari` (ATARI_LAM: overrides of the
# LAM's stage); OUT defaults to outputs/atari-lam.
ATARI_LAM ?=
atari-lam: setup
	$(eval LAM_OUT := $(if $(filter outputs/atari,$(OUT)),outputs/atari-lam,$(OUT)))
	$(BIN)/worldmodel prepare atari --games $(GAMES) --episodes $(EPISODES) --max-steps $(MAX_STEPS) \
		--frames 16 --size 64 --out $(LAM_OUT)/data $(ATARI_RECORD)
	$(MAKE) latent-stages LAM_OUT=$(LAM_OUT)

# Genie's CoinRun study on 2 CPU cores (README "Latent actions"): random-action CoinRun episodes
# (COINRUN_EPISODES of at most MAX_STEPS steps), then the stages of `make atari-lam` unchanged.
# At the reproductions' size on GPUs: experiment=coinrun/tokenizer, coinrun/lam, coinrun/dynamics.
COINRUN_EPISODES ?= 96
coinrun: setup procgen-env
	$(eval LAM_OUT := $(if $(filter outputs/atari,$(OUT)),outputs/coinrun,$(OUT)))
	$(BIN)/worldmodel prepare coinrun --episodes $(COINRUN_EPISODES) --max-steps $(MAX_STEPS) \
		--frames 16 --size 64 --out $(LAM_OUT)/data
	$(MAKE) latent-stages LAM_OUT=$(LAM_OUT)

# The stages of `make atari-lam` and `make coinrun` on the shards in $(LAM_OUT)/data.
latent-stages: setup
	$(BIN)/python train.py experiment=atari_cpu/tokenizer run_dir=$(LAM_OUT)/tokenizer \
		data.root=$(LAM_OUT)/data $(ATARI_TRAIN) $(ATARI_TOKENIZER)
	$(BIN)/python train.py experiment=atari_lam/lam run_dir=$(LAM_OUT)/lam data.root=$(LAM_OUT)/data \
		$(ATARI_TRAIN) $(ATARI_LAM)
	$(BIN)/python train.py experiment=atari_lam/dynamics run_dir=$(LAM_OUT)/dynamics data.root=$(LAM_OUT)/data \
		task.tokenizer_checkpoint=$(LAM_OUT)/tokenizer/checkpoints/last.ckpt \
		task.lam_checkpoint=$(LAM_OUT)/lam/checkpoints/last.ckpt $(ATARI_TRAIN) $(ATARI_DYNAMICS)
	$(BIN)/worldmodel eval $(LAM_OUT)/dynamics/checkpoints/last.ckpt --data $(LAM_OUT)/data \
		--context 4 --horizon 8 --clips 128 --steps 4 --guidance 1 --out $(LAM_OUT)/eval $(ATARI_EVAL)

test: setup procgen-env
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check worldmodel tests benchmarks train.py

bench: setup
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) data/shards outputs multirun .pytest_cache
