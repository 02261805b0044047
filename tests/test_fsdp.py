"""FSDP2 on CPU: the meta-device build starts from the weights a normal build has; a sharded
dynamics run resumes exactly, previews, and its checkpoint folder evaluates and exports."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.training_helpers import preempted_and_resumed
from worldmodel.models.dynamics import Dynamics
from worldmodel.models.lam import LatentActionModel
from worldmodel.models.presets import preset
from worldmodel.models.tokenizer import Tokenizer
from worldmodel.training.checkpoint import read_checkpoint
from worldmodel.training.fsdp import build_on_meta, materialize

NETWORKS = {
    "tokenizer_xs": lambda: Tokenizer(preset("tokenizer_xs")),
    "dynamics_xs adaLN": lambda: Dynamics(replace(preset("dynamics_xs"), action_conditioning="adaln")),
    "dynamics_debug token": lambda: Dynamics(replace(preset("dynamics_debug"), action_conditioning="token")),
    "lam_xs": lambda: LatentActionModel(preset("lam_xs")),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_a_meta_build_initializes_every_weight_as_building_it_on_a_device_does(name):
    torch.manual_seed(3)
    built = NETWORKS[name]()
    torch.manual_seed(3)
    net, constants = build_on_meta(NETWORKS[name])
    assert all(parameter.is_meta for parameter in net.parameters())  # no memory before sharding
    materialize(net, constants, torch.device("cpu"))
    expected = built.state_dict()
    for key, value in net.state_dict().items():
        assert torch.equal(value, expected[key]), key
    for key, value in dict(net.named_buffers()).items():
        assert torch.equal(value, dict(built.named_buffers())[key]), key


@pytest.mark.slow
def test_a_preempted_two_rank_fsdp_dynamics_run_resumes_exactly_and_its_sharded_checkpoint_evaluates(
    tmp_path, atari_dir, tokenizer_checkpoint
):
    dynamics = (
        "task=dynamics",
        "model=dynamics_debug",
        f"task.tokenizer_checkpoint={tokenizer_checkpoint}",
        "strategy=fsdp",
        "trainer.devices=2",
        "optim.schedule_steps=12",
        "trainer.max_steps=12",
        "trainer.checkpoint_every_n_steps=0",
        "trainer.video_every_n_steps=4",  # previews generate outside the root forward
        "data.num_workers=1",
    )
    stopped_at, expected, after = preempted_and_resumed(
        tmp_path / "full", tmp_path / "cut", *dynamics, sample_dir=atari_dir
    )
    assert stopped_at < 12 and sorted(after) == list(range(stopped_at, 12))
    assert [after[step] for step in after] == [expected[step] for step in after]
    last = {run: tmp_path / run / "checkpoints" / "last.ckpt" for run in ("full", "cut")}
    assert all(len(list(path.glob("*.distcp"))) == 2 for path in last.values())
    final_full, final_cut = (read_checkpoint(path) for path in last.values())
    assert "optimizer_states" not in final_full  # the weights alone are gathered
    for name, value in final_full["state_dict"].items():
        assert torch.equal(value, final_cut["state_dict"][name]), name
    assert list((tmp_path / "full" / "media").glob("preview_step*.mp4"))

    worldmodel = str(Path(sys.executable).with_name("worldmodel"))
    settings = ["--data", str(atari_dir), "--clips", "2", "--context", "2", "--horizon", "2", "--steps", "2"]
    exported = tmp_path / "exported.ckpt"
    for command in (
        ["eval", str(last["full"]), *settings, "--out", str(tmp_path / "eval_folder")],
        ["export", str(last["full"]), str(exported)],
        ["eval", str(exported), *settings, "--out", str(tmp_path / "eval_export")],
    ):
        result = subprocess.run([worldmodel, *command], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    reports = [
        json.loads((tmp_path / folder / name / "metrics.json").read_text())
        for folder, name in (("eval_folder", "last.ckpt"), ("eval_export", "exported.ckpt"))
    ]
    assert reports[0]["per_step"] == reports[1]["per_step"]  # the folder and its export: one model


def test_reading_a_checkpoint_file_leaves_its_optimizer_states_on_disk(tokenizer_checkpoint):
    assert torch.load(tokenizer_checkpoint, weights_only=False)["optimizer_states"]
    read = read_checkpoint(tokenizer_checkpoint)
    assert "optimizer_states" not in read and read["state_dict"]


def _build_sharded_rank(rank: int, port: int, config, out: Path) -> None:
    """One of two gloo ranks: build Dynamics(config) sharded; record its peak-memory growth, the
    bytes it holds and its largest parameter's (whole) bytes."""
    import os
    import resource

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from worldmodel.training.fsdp import build_sharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak so far, KiB -> bytes
    net = build_sharded(lambda: Dynamics(config), mesh, torch.device("cpu"))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = sum(parameter.to_local().numel() * 4 for parameter in net.parameters())
    largest = max(parameter.numel() * 4 for parameter in net.parameters())
    report = {"grown": grown, "held": held, "largest": largest}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.slow
def test_no_rank_ever_holds_the_whole_model_while_building_it_sharded(tmp_path):
    import torch.multiprocessing as mp

    from tests.slurm_cluster import free_port
    from worldmodel.models.flops import dynamics_parameters

    config = replace(preset("dynamics_m"), vocab_size=1000)  # the vocabulary of a trained tokenizer
    whole = dynamics_parameters(config) * 4  # 115M parameters: 459 MB in fp32
    mp.spawn(_build_sharded_rank, args=(free_port(), config, tmp_path), nprocs=2)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["held"] == pytest.approx(whole / 2, rel=0.01)  # each rank its half
        # Peak growth while building: the rank's half, plus one whole parameter being drawn and
        # its slice (measured: +0.5x of the model at most); a rank that built the whole model
        # before sharding would have grown by all of it.
        bound = report["held"] + 2 * report["largest"] + 64e6
        assert report["grown"] < bound < 0.8 * whole, (rank, report)
