"""`worldmodel eval`: score checkpoints on held-out clips; write metrics.json, plots and videos.

Per checkpoint, in `out/<checkpoint name>/`: `metrics.json` (every metric per horizon step and
averaged, at horizons 1/4/8, and what was skipped and why), `metrics.png` (each metric against
the horizon, model vs copy-last-frame), `rollouts.mp4` (truth | prediction for a few clips) and
`rollouts.png` (the same clips as still rows: truth above prediction, horizon steps left to right).
A model of latent actions also gets `latent_actions.png` / `.mp4` (the same context rolled out
holding each latent action) and, where the data has actions, how much the latent actions say
about them (`latent_actions` in metrics.json). With several checkpoints, `out/comparison.md`
puts them side by side. A tokenizer checkpoint is
scored for reconstruction: PSNR and SSIM per frame, `reconstructions.mp4` / `.png`.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from worldmodel.data.pipeline import ClipSpec, ClipStream
from worldmodel.data.shards import TOKENS_FORMAT, read_index, shard_paths
from worldmodel.data.video import encode_mp4
from worldmodel.eval.metrics import psnr, ssim
from worldmodel.eval.rollout import RolloutSettings, score_batch, world_model_from
from worldmodel.training.checkpoint import CheckpointError, lam_from, read_stage_checkpoint, tokenizer_from

REPORTED_HORIZONS = (1, 4, 8)
VIDEO_CLIPS = 4


class EvalError(ValueError):
    """Data or settings a checkpoint cannot be evaluated with; the message names the mismatch."""


def trained_stride(trained_on: dict, index: dict) -> int:
    """Clips are sampled as the model was trained: at its frame rate where both are known, else
    at its recorded stride (1 for checkpoints that recorded neither)."""
    if trained_on.get("fps") and index.get("fps"):
        return max(1, round(index["fps"] / trained_on["fps"]))
    return int(trained_on.get("stride") or 1)


def check_compatible(
    trained_on: dict, num_actions: int | None, index: dict, settings: RolloutSettings, data: Path
):
    """`num_actions` None: the model's actions are latent (read off the frames), any data goes."""
    needed = settings.context + settings.horizon
    stride = trained_stride(trained_on, index)
    span = (needed - 1) * stride + 1
    if settings.context < 1:
        raise EvalError(f"--context must be >= 1, got {settings.context}")
    if span > index["frames_per_clip"]:
        raise EvalError(
            f"--context {settings.context} + --horizon {settings.horizon} = {needed} frames at the "
            f"trained stride {stride} span {span} stored frames, but clips in {data} have "
            f"{index['frames_per_clip']}: lower --horizon"
        )
    if trained_on.get("height") and (trained_on["height"], trained_on["width"]) != (
        index["height"],
        index["width"],
    ):
        raise EvalError(
            f"{data} holds {index['height']}x{index['width']} clips; the model was trained on "
            f"{trained_on['height']}x{trained_on['width']}"
        )
    data_actions = index["num_actions"] or 0
    if num_actions is not None and data_actions > num_actions:
        raise EvalError(
            f"{data} has {data_actions} actions; the model knows {num_actions}: another action space"
        )


def held_out_batches(data: Path, index: dict, frames: int, clips: int, batch_size: int, stride: int = 1):
    """Batches of `clips` held-out clips spread evenly over the val split (from its first clip to
    its last), so a split written game by game or video by video is scored across all of them;
    `frames` frames every `stride` stored frames from each clip's start."""
    total = index["splits"]["val"]["clips"]
    wanted = set(np.linspace(0, total - 1, min(clips, total)).round().astype(int).tolist())
    stream = ClipStream(shard_paths(data, "val"), ClipSpec(frames, stride), batch_size=1, train=False)
    chosen = (sample for position, sample in enumerate(stream) if position in wanted)
    while group := list(itertools.islice(chosen, batch_size)):
        yield {
            "video": torch.cat([sample["video"] for sample in group]),  # (b, T, H, W, 3)
            "actions": torch.cat([sample["actions"] for sample in group]),  # (b, T)
            "key": [key for sample in group for key in sample["key"]],
            "source": [source for sample in group for source in sample["source"]],
        }


def evaluate_checkpoint(
    path: str | os.PathLike,
    data: str | os.PathLike,
    settings: RolloutSettings,
    clips: int,
    out: Path,
    batch_size: int,
    i3d=None,
    lpips=None,
    device: str = "cpu",
    weights: str = "ema",
) -> dict:
    data = Path(data)
    index = read_index(data)
    if index["format"] == TOKENS_FORMAT:  # scores are in pixels: the frames are needed
        video = index["source"]["video"]
        raise ValueError(f"--data {data} holds tokens; evaluate on the video folder {video}")
    checkpoint, config = read_stage_checkpoint(path)
    trained_on = checkpoint.get("data") or {}
    stride = trained_stride(trained_on, index)
    if config["task"]["stage"] == "tokenizer":
        check_compatible(trained_on, index["num_actions"] or 0, index, settings, data)
        tokenizer = tokenizer_from(checkpoint, config, weights).to(device)
        return evaluate_tokenizer(tokenizer, path, data, index, settings, clips, out, stride)
    if config["task"]["stage"] == "lam":
        check_compatible(trained_on, None, index, settings, data)
        lam = lam_from(checkpoint, config, weights).to(device)
        return evaluate_lam(lam, path, data, index, settings, clips, out, stride)
    model = world_model_from(checkpoint, config, path, weights).to(device)
    del checkpoint
    latent = model.lam is not None
    true_actions = model.num_actions  # how many of the data's actions the model knows
    if model.action_source == "latent":
        true_actions = None  # none: its actions are read off the frames, any data goes
    elif model.action_source == "both":
        true_actions //= model.lam.num_latents  # each paired with every latent action
    check_compatible(model.trained_on, true_actions, index, settings, data)
    read_actions: list[tuple[torch.Tensor, torch.Tensor]] = []  # latent model: (latent, true) per clip
    per_clip: dict[str, list[torch.Tensor]] = {}
    sources: list[str] = []
    shown: dict[str, list[torch.Tensor]] = {}  # every clip's frames; a few go into videos and stills
    real_clips, generated_clips = [], []  # whole clips (context + horizon), for FVD
    progress = tqdm(total=clips, unit="clip", desc=f"eval {Path(path).name}")
    for batch in held_out_batches(
        data, index, settings.context + settings.horizon, clips, batch_size, stride
    ):
        scores, frames = score_batch(model, batch, settings, lpips)
        if latent and not shown:
            grid = latent_action_grid(model, batch, settings)
        if latent and index["num_actions"]:  # how the latent actions relate to the true ones
            span = batch["video"][:, : settings.context + settings.horizon]
            latent_ids = model.lam.infer(span.to(device)).cpu()  # (B, span - 1)
            read_actions += zip(latent_ids, batch["actions"][:, : span.shape[1] - 1], strict=True)
        for name, values in scores.items():
            per_clip.setdefault(name, []).append(values)
        sources += batch["source"]
        span = batch["video"][:, : settings.context + settings.horizon]
        real_clips.append(span)
        generated_clips.append(torch.cat([span[:, : settings.context], frames["model"]], dim=1))
        for name, clip_frames in frames.items():
            shown.setdefault(name, []).extend(clip_frames)  # each (horizon, H, W, 3)
        progress.update(len(batch["key"]))
    progress.close()
    if not per_clip:
        raise EvalError(f"{data} has no validation clips")
    per_clip = {name: torch.cat(values) for name, values in per_clip.items()}
    report = summarize(per_clip, settings)
    report["by_source"] = {
        source: summarize(
            {name: values[[s == source for s in sources]] for name, values in per_clip.items()}, settings
        )
        for source in sorted(set(sources))
    }
    if read_actions:
        report["latent_actions"] = agreement_by_source(read_actions, sources)
    report["checkpoint"] = str(path)
    report["folder"] = str(out)
    report["fvd"] = video_distance(i3d, torch.cat(real_clips), torch.cat(generated_clips))
    if lpips is None:
        report["lpips"] = {"skipped": "no LPIPS weights given (--lpips FILE; see worldmodel/eval/lpips.py)"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "metrics.png")
    save_clips([shown["truth"], shown["model"]], out, "rollouts", index["fps"])
    if "random_actions" in shown:  # the same context under the true and under random actions
        save_clips(
            [shown["truth"], shown["model"], shown["random_actions"]], out, "controllability", index["fps"]
        )
    if latent:
        save_clips(grid, out, "latent_actions", index["fps"])
    return report


GRID_CLIPS = 2


def latent_action_grid(model, batch: dict, settings: RolloutSettings) -> list[list[torch.Tensor]]:
    """What each latent action does: for the first GRID_CLIPS clips of a batch, the truth and the
    same context rolled out holding each latent action k at every step (with both sources, k
    beside the clip's true actions). Rows as `save_clips` takes them: [truth clips, clips under
    latent action 0, under 1, ...], each (horizon, H, W, 3)."""
    from worldmodel.eval.rollout import rollout

    steps = settings.context + settings.horizon
    video = batch["video"][:GRID_CLIPS, :steps].to(model.device)
    tokens = model.tokenizer.encode(video[:, : settings.context])  # (clips, context, h, w)
    rows = [list(video[:, settings.context :].cpu())]
    for action in range(model.lam.num_latents):
        held = torch.full((len(video), steps), action, device=model.device)  # (clips, steps)
        if model.action_source == "both":  # the clip's true actions, each paired with this one
            held = batch["actions"][:GRID_CLIPS, :steps].to(model.device) * model.lam.num_latents + held
        generator = torch.Generator(model.device).manual_seed(settings.seed)
        rows.append(list(rollout(model, tokens, held, settings, generator).cpu()))
    return rows


def agreement_by_source(read_actions: list[tuple[torch.Tensor, torch.Tensor]], sources: list[str]) -> dict:
    """Normalized mutual information and best-mapping accuracy of latent against true actions,
    over all clips and per source (game): each entry of `read_actions` is one clip's (latent,
    true) actions of its transitions."""
    from worldmodel.eval.metrics import action_agreement

    def over(chosen: list[int]) -> dict:
        latent = torch.cat([read_actions[i][0] for i in chosen])
        true = torch.cat([read_actions[i][1] for i in chosen])
        return {**action_agreement(latent, true), "transitions": len(latent)}

    clips = range(len(read_actions))
    by_source = {source: over([i for i in clips if sources[i] == source]) for source in sorted(set(sources))}
    return {**over(list(clips)), "by_source": by_source}


def save_clips(rows: list[list[torch.Tensor]], out: Path, stem: str, fps: float, scale: int = 2) -> None:
    """`stem.mp4` and `stem.png` of VIDEO_CLIPS clips spread over `rows`. `rows`: for each kind of frames
    (truth, then predictions), the clips' uint8 frames (T, H, W, 3). The video shows the kinds
    side by side, clips stacked; the still shows, per clip, one row per kind, frames left to right."""
    import matplotlib.pyplot as plt

    chosen = np.linspace(0, len(rows[0]) - 1, min(VIDEO_CLIPS, len(rows[0]))).round().astype(int)
    clips = [[kind[i].numpy() for kind in rows] for i in chosen]  # spread over the split: every game
    side_by_side = [np.concatenate(kinds, axis=2) for kinds in clips]  # each (T, H, kinds * W, 3)
    (out / f"{stem}.mp4").write_bytes(encode_mp4(np.concatenate(side_by_side, axis=1), fps=fps))
    lines = []
    for kinds in clips:
        lines += [np.concatenate(list(frames), axis=1) for frames in kinds]  # each (H, T * W, 3)
        lines.append(np.full((4, lines[-1].shape[1], 3), 255, np.uint8))  # white gap between clips
    image = np.concatenate(lines[:-1], axis=0).repeat(scale, axis=0).repeat(scale, axis=1)
    plt.imsave(out / f"{stem}.png", image)


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer,
    path,
    data: Path,
    index: dict,
    settings: RolloutSettings,
    clips: int,
    out: Path,
    stride: int = 1,
):
    """Reconstruction of held-out clips (context + horizon frames): PSNR and SSIM per frame."""
    frames = settings.context + settings.horizon
    per_clip: dict[str, list[torch.Tensor]] = {"tokenizer_psnr": [], "tokenizer_ssim": []}
    truths, reconstructions, sources = [], [], []
    device = next(tokenizer.parameters()).device
    progress = tqdm(total=clips, unit="clip", desc=f"eval {Path(path).name}")
    for batch in held_out_batches(data, index, frames, clips, batch_size=4, stride=stride):
        video = batch["video"]  # (B, frames, H, W, 3)
        reconstruction = tokenizer.decode(tokenizer.encode(video.to(device))).cpu()
        per_clip["tokenizer_psnr"].append(psnr(reconstruction, video))
        per_clip["tokenizer_ssim"].append(ssim(reconstruction, video))
        truths.extend(video)
        reconstructions.extend(reconstruction)
        sources += batch["source"]
        progress.update(len(batch["key"]))
    progress.close()
    if not per_clip["tokenizer_psnr"]:
        raise EvalError(f"{data} has no validation clips")
    per_clip = {name: torch.cat(values) for name, values in per_clip.items()}  # each (clips, frames)
    per_frame = {name: values.mean(dim=0).tolist() for name, values in per_clip.items()}
    by_source = {
        source: {
            name: float(values[[s == source for s in sources]].mean()) for name, values in per_clip.items()
        }
        for source in sorted(set(sources))
    }
    report = {
        "stage": "tokenizer",
        "clips": len(per_clip["tokenizer_psnr"]),
        "frames": frames,
        "per_frame": per_frame,
        "mean": {name: float(np.mean(values)) for name, values in per_frame.items()},
        "by_source": by_source,  # means over each source's clips and frames
        "checkpoint": str(path),
        "folder": str(out),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    save_clips([truths, reconstructions], out, "reconstructions", index["fps"])
    return report


@torch.no_grad()
def evaluate_lam(
    lam, path, data: Path, index: dict, settings: RolloutSettings, clips: int, out: Path, stride=1
):
    """A latent action model on held-out clips (context + horizon frames): how well its decoder
    predicts each next frame from the true frames before and the latent actions read off the
    clip (PSNR, against copying the frame before), how evenly the latent actions are used, and, where
    the data has actions, how much they say about the true ones."""
    frames = settings.context + settings.horizon
    next_psnr, copy_psnr, read_actions, sources, shown = [], [], [], [], []
    device = next(lam.parameters()).device
    progress = tqdm(total=clips, unit="clip", desc=f"eval {Path(path).name}")
    for batch in held_out_batches(data, index, frames, clips, batch_size=4, stride=stride):
        video = batch["video"].to(device)  # (B, frames, H, W, 3)
        ids = lam.infer(video)  # (B, frames - 1)
        predicted = lam.predict(video[:, :-1], ids)  # frames 1.. as drawn: (B, frames - 1, H, W, 3)
        next_psnr.append(psnr(predicted.cpu(), video[:, 1:].cpu()))
        copy_psnr.append(psnr(video[:, :-1].cpu(), video[:, 1:].cpu()))
        read_actions += zip(ids.cpu(), batch["actions"][:, : frames - 1], strict=True)
        sources += batch["source"]
        if not shown:  # the first clips' frames, then as drawn holding each latent action throughout
            shown = [list(video[:GRID_CLIPS, 1:].cpu())]
            for action in range(lam.num_latents):
                held = torch.full_like(ids[:GRID_CLIPS], action)
                shown.append(list(lam.predict(video[:GRID_CLIPS, :-1], held).cpu()))
        progress.update(len(batch["key"]))
    progress.close()
    if not sources:
        raise EvalError(f"{data} has no validation clips")
    latent = torch.cat([ids for ids, _ in read_actions])
    probabilities = torch.bincount(latent, minlength=lam.num_latents).float() / len(latent)
    used = probabilities[probabilities > 0]
    report = {
        "stage": "lam",
        "clips": len(sources),
        "frames": frames,
        "next_frame_psnr": float(torch.cat(next_psnr).mean()),
        "copy_last_psnr": float(torch.cat(copy_psnr).mean()),
        "latent_action_use": probabilities.tolist(),
        "perplexity": float((-(used * used.log()).sum()).exp()),
        "checkpoint": str(path),
        "folder": str(out),
    }
    if index["num_actions"]:
        report["latent_actions"] = agreement_by_source(read_actions, sources)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    save_clips(shown, out, "latent_actions", index["fps"])
    return report


def video_distance(i3d, real: torch.Tensor, generated: torch.Tensor) -> dict:
    """FVD of context + rollout against the real clips, or why it was skipped."""
    from worldmodel.eval.i3d import MIN_FRAMES, fvd

    if i3d is None:
        return {
            "skipped": "no I3D weights given (--i3d FILE; see worldmodel/eval/i3d.py for where to get them)"
        }
    if real.shape[1] < MIN_FRAMES:
        return {"skipped": f"clips of {real.shape[1]} frames; I3D needs at least {MIN_FRAMES}"}
    if len(real) < 2:
        return {"skipped": "FVD needs at least 2 clips"}
    return {"value": fvd(i3d, real, generated), "clips": len(real), "frames": real.shape[1]}


def summarize(per_clip: dict[str, torch.Tensor], settings: RolloutSettings) -> dict:
    """Per-step means (over clips), overall means, and values at the reported horizons."""
    per_step = {name: values.mean(dim=0).tolist() for name, values in per_clip.items()}
    return {
        "clips": len(next(iter(per_clip.values()))),
        "context": settings.context,
        "horizon": settings.horizon,
        "per_step": per_step,
        "mean": {name: float(np.mean(values)) for name, values in per_step.items()},
        "at_horizon": {
            str(h): {name: values[h - 1] for name, values in per_step.items()}
            for h in REPORTED_HORIZONS
            if h <= settings.horizon
        },
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_step = report["per_step"]
    steps = np.arange(1, report["horizon"] + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, label in (
        ("model_psnr", "model"),
        ("copy_last_psnr", "copy last frame"),
        ("tokenizer_psnr", "tokenizer (ceiling)"),
        ("random_action_psnr", "random actions"),
    ):
        if name in per_step:
            left.plot(steps, per_step[name], marker="o", label=label)
    left.set(xlabel="horizon step", ylabel="PSNR (dB)", title="PSNR")
    for name, label in (("model_ssim", "model"), ("copy_last_ssim", "copy last frame")):
        right.plot(steps, per_step[name], marker="o", label=label)
    right.set(xlabel="horizon step", ylabel="SSIM", title="SSIM")
    for axes in (left, right):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def table(report: dict) -> str:
    """The headline numbers as text: per source (game) and in total, at the reported horizons."""
    if report.get("stage") == "lam":
        lines = [
            f"latent action model on {report['clips']} held-out clips: next frame from the frame before",
            f"and its latent action {report['next_frame_psnr']:.2f} dB (copying the frame before "
            f"{report['copy_last_psnr']:.2f} dB), perplexity of use {report['perplexity']:.2f} of "
            f"{len(report['latent_action_use'])} latent actions",
        ]
        return "\n".join(lines + agreement_lines(report.get("latent_actions"))) + "\n"
    if report.get("stage") == "tokenizer":
        groups = {**report.get("by_source", {}), "all": report["mean"]}
        return f"tokenizer reconstruction of {report['clips']} held-out clips:\n" + "".join(
            f"{source[-22:]:<22} PSNR {mean['tokenizer_psnr']:.2f} dB, SSIM {mean['tokenizer_ssim']:.4f}\n"
            for source, mean in groups.items()
        )
    lines = [
        "PSNR in dB of frames predicted h steps after the context, on held-out clips. The world model",
        "must beat copying the last real frame (gain > 0); ΔtPSNR > 0 means its true actions predict",
        "better than random ones (it responds to actions); the tokenizer's reconstruction is the ceiling.",
        f"{'source':<22}{'clips':>6}{'h':>3}{'model':>8}{'copy':>8}{'gain':>7}{'tokzr':>8}{'ΔtPSNR':>8}"
        f"{'SSIM':>8}{'copy':>8}",
    ]
    groups = (
        {**report.get("by_source", {}), "all": report}
        if len(report.get("by_source", {})) > 1
        else {"all": report}
    )
    agreement = report.get("latent_actions")
    for source, summary in groups.items():
        for horizon, values in summary["at_horizon"].items():
            delta = values.get("delta_t_psnr")
            lines.append(
                f"{source[-22:]:<22}{summary['clips']:>6}{horizon:>3}{values['model_psnr']:>8.2f}"
                f"{values['copy_last_psnr']:>8.2f}{values['model_psnr'] - values['copy_last_psnr']:>+7.2f}"
                f"{values['tokenizer_psnr']:>8.2f}{'-' if delta is None else f'{delta:+.2f}':>8}"
                f"{values['model_ssim']:>8.4f}{values['copy_last_ssim']:>8.4f}"
            )
    return "\n".join(lines + agreement_lines(agreement)) + "\n"


def agreement_lines(agreement: dict | None) -> list[str]:
    """Latent against true actions, per source and in total, as text lines (none without them)."""
    if not agreement:
        return []
    lines = [
        "Latent actions against the true ones (NMI: 0 = unrelated, 1 = one determines the other;",
        "accuracy of the best latent-to-true mapping, and of always guessing the commonest action;",
        "chance: the same ids paired at random, what unrelated actions score on this many transitions):",
    ]
    for source, values in {**agreement["by_source"], "all": agreement}.items():
        lines.append(
            f"{source[-22:]:<22} NMI {values['nmi']:.3f} (chance {values['nmi_chance']:.3f})  "
            f"mapping {values['mapping_accuracy']:.3f} (chance {values['mapping_chance']:.3f})  "
            f"majority {values['majority_accuracy']:.3f}  ({values['transitions']} transitions)"
        )
    return lines


def compare(reports: list[dict], path: Path) -> str:
    """A markdown table of the checkpoints' headline numbers."""
    columns = ["model_psnr", "copy_last_psnr", "model_ssim", "tokenizer_psnr", "delta_t_psnr", "fvd"]
    lines = [
        "| checkpoint | " + " | ".join(f"{c} (mean)" for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for report in reports:
        values = {**report["mean"], "fvd": report.get("fvd", {}).get("value")}
        cells = [f"{values[c]:.3f}" if values.get(c) is not None else "-" for c in columns]
        lines.append(f"| {report['checkpoint']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


def evaluate(
    checkpoints: list[str],
    data: str,
    settings: RolloutSettings,
    clips: int,
    out: str,
    batch_size: int = 4,
    i3d_weights: str | None = None,
    lpips_weights: str | None = None,
    wandb_mode: str | None = None,
    device: str = "cpu",
    weights: str = "ema",
):
    """Evaluate each checkpoint on `device`; `wandb_mode` ("offline" or "online") also logs the
    results to wandb."""
    from worldmodel.eval.i3d import load_i3d
    from worldmodel.eval.lpips import load_lpips

    out = Path(out)
    i3d = load_i3d(i3d_weights) if i3d_weights else None
    lpips = load_lpips(lpips_weights) if lpips_weights else None
    reports = []
    for checkpoint in checkpoints:
        if not Path(checkpoint).exists():
            raise CheckpointError(f"{checkpoint}: no such checkpoint")
        name = (
            Path(checkpoint).name
            if len(checkpoints) == 1
            else f"{len(reports)}_{Path(checkpoint).parent.parent.name}"
        )
        reports.append(
            evaluate_checkpoint(
                checkpoint, data, settings, clips, out / name, batch_size, i3d, lpips, device, weights
            )
        )
    if len(reports) > 1:
        print(compare(reports, out / "comparison.md"))
    if wandb_mode:
        log_to_wandb(reports, out, wandb_mode)
    return reports


def log_to_wandb(reports: list[dict], out: Path, mode: str) -> None:
    import wandb

    run = wandb.init(project="worldmodel", job_type="eval", dir=str(out), mode=mode, name=f"eval-{out.name}")
    for report in reports:
        folder = Path(report["folder"])
        media = {f"{folder.name}/{name}": value for name, value in report["mean"].items()}
        if (folder / "metrics.png").exists():
            media[f"{folder.name}/metrics"] = wandb.Image(str(folder / "metrics.png"))
        for video in ("rollouts", "reconstructions"):
            if (folder / f"{video}.mp4").exists():
                media[f"{folder.name}/{video}"] = wandb.Video(str(folder / f"{video}.mp4"), format="mp4")
        run.log(media)
    run.finish()
