import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.training_helpers import left_in_group

ROOT = Path(__file__).resolve().parents[1]
WORLDMODEL = Path(sys.executable).with_name("worldmodel")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_prepare_sample_then_inspect_from_the_command_line(tmp_path):
    out = tmp_path / "sample"
    prepared = run(str(WORLDMODEL), "prepare", "sample", "--out", str(out))
    assert prepared.returncode == 0, prepared.stderr
    assert "train 74 clips in 3 shards, val 26 clips in 1 shards" in prepared.stdout
    inspected = run(
        str(WORLDMODEL), "inspect", str(out), "--batches", "2", "--batch-size", "3", "--workers", "2"
    )
    assert inspected.returncode == 0, inspected.stderr
    assert "batch 1: video (3, 16, 64, 64, 3) torch.uint8" in inspected.stdout
    assert "read 6 clips" in inspected.stdout


def test_prepare_atari_rejects_an_unknown_game_by_name(tmp_path):
    result = run(
        str(WORLDMODEL),
        "prepare",
        "atari",
        "--games",
        "Pong,NotAGame",
        "--episodes",
        "1",
        "--out",
        str(tmp_path),
    )
    assert result.returncode != 0 and "NotAGame" in result.stderr


def test_prepare_killed_outright_leaves_no_recording_process_behind(tmp_path):
    command = [str(WORLDMODEL), "prepare", "atari", "--games", "Breakout", "--episodes", "400"]
    command += ["--max-steps", "500", "--frames", "16", "--size", "64", "--workers", "2"]
    command += ["--out", str(tmp_path)]
    recording = subprocess.Popen(command, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(psutil.Process(recording.pid).children()) < 2:
        time.sleep(0.1)  # until both recording processes run
    recording.kill()
    recording.wait(timeout=30)
    assert not (tmp_path / "dataset.json").exists()  # it stopped midway
    assert left_in_group(recording.pid) == []


def test_prepare_folder_reports_unreadable_files(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3 not really")
    result = run(str(WORLDMODEL), "prepare", "folder", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "skipped broken.webm" in result.stderr
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert list(report["failed"]) == ["broken.webm"]


def test_train_entry_point_fails_at_startup_naming_the_bad_field(tmp_path):
    result = run(sys.executable, "train.py", "data.frames=0")
    assert result.returncode != 0 and "data.frames: must be >= 1" in result.stderr


def test_info_shows_parameters_flops_and_which_strategies_fit():
    result = run(str(WORLDMODEL), "info", "dynamics_7b", "--gpus", "8", "--micro-batch", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dynamics_7b: 6967.4M parameters")
    assert "GFLOP per token" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[4:]}
    assert rows["ddp"][-1] == "no" and rows["zero3"][-1] == "yes"
    tokenizer = run(str(WORLDMODEL), "info", "tokenizer_m", "--size", "256")
    assert "64000 codes" in tokenizer.stdout and "32x32 tokens" in tokenizer.stdout
    lam = run(str(WORLDMODEL), "info", "lam_m", "--size", "128")
    assert "8 latent actions" in lam.stdout and "8x8 patches" in lam.stdout
    unknown = run(str(WORLDMODEL), "info", "dynamics_huge")
    assert unknown.returncode != 0 and "dynamics_7b" in unknown.stderr


@pytest.mark.slow
def test_make_atari_records_the_given_games_into_the_given_folder(tmp_path):
    """`make atari GAMES=... OUT=...`, shortened: the same targets, tiny settings."""
    out = tmp_path / "atari"
    tiny = (
        "data.frames=4 data.global_batch_size=2 data.num_workers=0 trainer.max_steps=2 "
        "trainer.val_every_n_steps=1 trainer.limit_val_batches=1 trainer.video_every_n_steps=0 logger=csv"
    )
    result = subprocess.run(
        [
            "make",
            "atari",
            "GAMES=Pong,Seaquest",
            f"OUT={out}",
            "EPISODES=2",
            "MAX_STEPS=40",
            f"ATARI_TRAIN={tiny}",
            "ATARI_EVAL=--clips 2 --horizon 2 --context 2 --device cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    index = json.loads((out / "data" / "dataset.json").read_text())
    assert index["source"]["games"] == ["Pong", "Seaquest"]
    report = json.loads((out / "eval" / "last.ckpt" / "metrics.json").read_text())
    assert set(report["by_source"]) == {"atari/Pong", "atari/Seaquest"}
    assert "atari/Pong" in result.stdout and (out / "eval" / "last.ckpt" / "controllability.png").exists()
