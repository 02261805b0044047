"""The dynamics stage trained from token shards against from video shards, in one run.

    python benchmarks/tokens.py                         # tokenizer_debug/64x64 and tokenizer_m/128x128
    python benchmarks/tokens.py --settings tokenizer_debug:64 --steps 20

For each setting (tokenizer preset, clip size): the sample footage prepared at that size, a
tokenizer of that preset (one training step: what it costs to encode does not depend on its
weights), and its token shards (`worldmodel tokenize`, every `--hop`-th window). Then, with the
same dynamics model (dynamics_xs), batch, clips and seed:
- a dynamics step: wall time per optimizer step from the trainer's own telemetry
  (perf/clips_per_s), median over the steps after warm-up, from video and from tokens;
- the tokenizer's share of a step from video: its encode of one batch timed alone, over that
  step time (from tokens the tokenizer is never called);
- the loaders alone: clips/s of the video loader (decode, sample, batch) and the token loader.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worldmodel.config import DataConfig  # noqa: E402
from worldmodel.data.datamodule import VideoDataModule  # noqa: E402
from worldmodel.data.sources.folder import prepare_videos  # noqa: E402
from worldmodel.data.sources.sample import SAMPLE_FILES, SAMPLE_SETTINGS, sample_footage_dir  # noqa: E402
from worldmodel.data.tokens import tokenize  # noqa: E402
from worldmodel.training.checkpoint import load_tokenizer  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "tokens"
FRAMES, BATCH = 8, 8


def train(run_dir: Path, *overrides: str, steps: int) -> subprocess.CompletedProcess:
    shutil.rmtree(run_dir, ignore_errors=True)  # its log is read back: no run of an earlier call
    command = [sys.executable, "train.py", "logger=csv", f"run_dir={run_dir}", "trainer.log_every_n_steps=1"]
    command += ["trainer.checkpoint_every_n_steps=0", "trainer.video_every_n_steps=0"]
    command += ["trainer.val_every_n_steps=100000", f"trainer.max_steps={steps}", "data.num_workers=1"]
    command += [f"data.frames={FRAMES}", f"data.global_batch_size={BATCH}", *overrides]  # later wins
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result


def step_seconds(run_dir: Path, warmup: int) -> float:
    """Median wall time of an optimizer step after `warmup` steps, from the run's CSV log."""
    rates = []
    with open(next((run_dir / "logs").glob("version_*/metrics.csv"))) as handle:
        for row in csv.DictReader(handle):
            if row.get("perf/clips_per_s") and int(row["step"]) >= warmup:
                rates.append(float(row["perf/clips_per_s"]))
    return BATCH / statistics.median(rates)


def encode_seconds(checkpoint: Path, data: VideoDataModule, repeats: int = 5) -> float:
    """The frozen tokenizer's encode of one training batch, as the dynamics stage runs it (fp32)."""
    tokenizer = load_tokenizer(checkpoint)
    video = next(iter(data.train_dataloader()))["video"]
    tokenizer.encode(video)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        tokenizer.encode(video)
    return (time.perf_counter() - started) / repeats


def loader_clips_per_s(root: Path, batches: int) -> float:
    config = DataConfig(
        root=str(root), frames=FRAMES, global_batch_size=BATCH, num_workers=1, batches_per_epoch=batches
    )
    iterator = iter(VideoDataModule(config).train_dataloader())
    next(iterator)  # worker start-up is paid once per epoch: not counted
    started = time.perf_counter()
    clips = sum(len(batch["key"]) for batch in iterator)
    return clips / (time.perf_counter() - started)


def measure(preset: str, size: int, steps: int, hop: int) -> dict:
    folder = OUT / f"{preset}_{size}"
    video_dir, token_dir = folder / "video", folder / "tokens"
    if not (video_dir / "dataset.json").exists():
        settings = replace(SAMPLE_SETTINGS, size=size)
        footage = sample_footage_dir()
        prepare_videos(
            [footage / name for name in SAMPLE_FILES], footage, video_dir, settings, clips_per_shard=32
        )
    tokenizer = folder / "tokenizer" / "checkpoints" / "last.ckpt"
    if not tokenizer.exists():
        # One step on one 2-frame clip: tokenizer_m's backward pass at 128x128 on a full batch
        # would need ~19 GB; encoding (no gradients) is what is measured.
        weights = ("task=tokenizer", f"model={preset}", f"data.root={video_dir}")
        train(folder / "tokenizer", *weights, "data.frames=2", "data.global_batch_size=1", steps=1)
    started = time.perf_counter()
    if not (token_dir / "dataset.json").exists():
        tokenize(tokenizer, video_dir, token_dir, frames=FRAMES, hop=hop)
    tokenize_s = time.perf_counter() - started
    dynamics = ("task=dynamics", "model=dynamics_xs", "seed=0")
    train(
        folder / "from_video",
        *dynamics,
        f"task.tokenizer_checkpoint={tokenizer}",
        f"data.root={video_dir}",
        steps=steps,
    )
    train(folder / "from_tokens", *dynamics, "data=tokens", f"data.root={token_dir}", steps=steps)
    warmup = min(5, steps // 3)
    from_video, from_tokens = (step_seconds(folder / name, warmup) for name in ("from_video", "from_tokens"))
    data = VideoDataModule(
        DataConfig(root=str(video_dir), frames=FRAMES, global_batch_size=BATCH, num_workers=0)
    )
    return {
        "setting": f"{preset} / {size}x{size}",
        "step_video_s": from_video,
        "step_tokens_s": from_tokens,
        "speedup": from_video / from_tokens,
        "tokenizer_share": encode_seconds(tokenizer, data) / from_video,
        "video_loader": loader_clips_per_s(video_dir, 40),
        "token_loader": loader_clips_per_s(token_dir, 40),
        "tokenize_s": tokenize_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default="tokenizer_debug:64,tokenizer_m:128", help="preset:size,...")
    parser.add_argument("--steps", type=int, default=15, help="dynamics steps per run (a third warm up)")
    parser.add_argument("--hop", type=int, default=8, help="tokenize every hop-th window (1: all)")
    args = parser.parse_args()
    print(
        "| setting | step from video | step from tokens | tokens / video | tokenizer share (video) "
        "| video loader | token loader | tokenize (once) |\n|---|---|---|---|---|---|---|---|"
    )
    for setting in args.settings.split(","):
        preset, size = setting.split(":")
        r = measure(preset, int(size), args.steps, args.hop)
        cells = (
            r["setting"],
            f"{r['step_video_s']:.3f} s",
            f"{r['step_tokens_s']:.3f} s",
            f"{r['speedup']:.2f}x",
            f"{r['tokenizer_share']:.0%}",
            f"{r['video_loader']:.0f} clips/s",
            f"{r['token_loader']:.0f} clips/s",
            f"{r['tokenize_s']:.0f} s",
        )
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
