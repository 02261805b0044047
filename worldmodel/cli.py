"""The `worldmodel` command: prepare shards, tokenize them, look inside them, size up models, export
checkpoints."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

DEVICE_HELP = "cpu, cuda, cuda:1 (default: cuda if there is one)"
GUIDANCE_HELP = (
    "classifier-free guidance on the actions, w in logits + w * (logits - action-free logits); "
    "for models trained with task.action_dropout > 0 (default 0: none)"
)


def default_device(device: str | None) -> str:
    """The device to run on; on a GPU, fp32 matmuls (the logits) run on tensor cores (TF32)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    return device


def _add_shard_options(parser: argparse.ArgumentParser, frames: int, size: int) -> None:
    parser.add_argument("--out", required=True, help="output folder for shards and dataset.json")
    parser.add_argument("--frames", type=int, default=frames, help="frames per clip")
    parser.add_argument("--size", type=int, default=size, help="clip height and width in pixels")
    parser.add_argument("--shard-size", type=int, default=256, help="clips per shard")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation")
    parser.add_argument("--workers", type=int, default=2, help="processes that cut / record clips")


def _add_video_options(parser: argparse.ArgumentParser) -> None:
    """How videos (files or other tools' shards) are cut into clips and split."""
    parser.add_argument("--fps", type=float, default=10.0, help="clip frame rate")
    parser.add_argument(
        "--hop", type=int, default=None, help="frames between clip starts (default: --frames)"
    )
    parser.add_argument("--crf", type=int, default=18, help="h264 quality (0 = lossless)")
    parser.add_argument(
        "--split-by",
        choices=("file", "time"),
        default="file",
        help="hold out whole videos (file), or the last --val-fraction of every video (time: "
        "for a few long videos; windows across the cut are dropped)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldmodel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="build WebDataset shards").add_subparsers(
        dest="source", required=True
    )
    folder = prepare.add_parser("folder", help="every video under a folder")
    folder.add_argument("src", help="folder searched recursively for mp4/avi/mkv/webm/mov")
    _add_shard_options(folder, frames=16, size=64)
    _add_video_options(folder)

    atari = prepare.add_parser("atari", help="record random-policy Atari game play")
    atari.add_argument("--games", required=True, help="comma-separated, e.g. Breakout,Pong")
    atari.add_argument("--episodes", type=int, required=True, help="episodes per game")
    _add_shard_options(atari, frames=16, size=64)
    atari.add_argument("--frameskip", type=int, default=4)
    atari.add_argument(
        "--sticky", type=float, default=0.0, help="repeat_action_probability (0: actions run as recorded)"
    )
    atari.add_argument(
        "--max-hold",
        type=int,
        default=1,
        help="the random policy holds each action 1..N steps (1: new every step)",
    )
    atari.add_argument("--max-steps", type=int, default=2000, help="steps per episode at most")
    atari.add_argument("--seed", type=int, default=0)

    coinrun = prepare.add_parser("coinrun", help="record random-action CoinRun episodes (procgen)")
    coinrun.add_argument("--episodes", type=int, required=True)
    _add_shard_options(coinrun, frames=16, size=64)
    coinrun.add_argument("--max-steps", type=int, default=1000, help="steps per episode at most")
    coinrun.add_argument("--distribution-mode", default="hard", choices=("easy", "hard"))
    coinrun.add_argument("--seed", type=int, default=0)
    coinrun.add_argument(
        "--recorder-python",
        default=None,
        help="a Python with procgen (default: WORLDMODEL_PROCGEN_PYTHON or .venv-procgen)",
    )

    shards = prepare.add_parser("shards", help="WebDataset shards of other tools (e.g. video2dataset)")
    shards.add_argument("urls", nargs="+", help="shard paths, brace patterns or URLs")
    _add_shard_options(shards, frames=16, size=64)
    _add_video_options(shards)
    shards.add_argument("--caption-field", default=None, help="json field with the caption (default: txt)")
    shards.add_argument("--video-member", default=None, help="a video member besides mp4/webm/mkv/avi/mov")

    sample = prepare.add_parser("sample", help="the embedded default dataset (real footage, offline)")
    sample.add_argument("--out", required=True)

    tokenize = commands.add_parser(
        "tokenize", help="encode a prepared folder once into token shards for the dynamics stage"
    )
    tokenize.add_argument("checkpoint", help="a tokenizer checkpoint (file, DeepSpeed folder or export)")
    tokenize.add_argument("--data", required=True, help="prepared video folder (with dataset.json)")
    tokenize.add_argument("--out", required=True, help="token folder; run again to continue it")
    tokenize.add_argument(
        "--devices", type=int, default=1, help="processes, one GPU each where there are GPUs"
    )
    tokenize.add_argument("--batch-size", type=int, default=16, help="windows encoded at once")
    tokenize.add_argument(
        "--frames", type=int, default=None, help="frames per window (default: as the tokenizer trained)"
    )
    tokenize.add_argument("--stride", type=int, default=None, help="default: as the tokenizer trained")
    tokenize.add_argument(
        "--hop", type=int, default=1, help="encode every hop-th window only (1: all, as from video)"
    )
    tokenize.add_argument(
        "--weights", choices=("ema", "raw"), default="ema", help="the EMA where training kept one, or raw"
    )
    tokenize.add_argument(
        "--lam",
        default=None,
        help="a latent action model checkpoint: also store its latent actions of every window "
        "(for dynamics runs with task.action_source latent or both)",
    )

    info = commands.add_parser("info", help="parameters, FLOPs and per-GPU memory of a model preset")
    info.add_argument("model", help="a preset name, e.g. dynamics_l or tokenizer_m")
    info.add_argument("--frames", type=int, default=16, help="frames per clip (T)")
    info.add_argument("--size", type=int, default=256, help="frame height and width in pixels")
    info.add_argument("--downsample", type=int, default=16, help="tokenizer's spatial reduction")
    info.add_argument("--vocab", type=int, default=64000, help="tokenizer vocabulary (FSQ codebook)")
    info.add_argument("--micro-batch", type=int, default=1, help="clips per GPU per forward")
    info.add_argument("--gpus", type=int, default=8, help="GPUs in the job")
    info.add_argument("--precision", choices=("bf16-mixed", "32-true"), default="bf16-mixed")
    info.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU, for the fits column")

    evaluate = commands.add_parser("eval", help="roll checkpoints out on held-out clips and score them")
    evaluate.add_argument(
        "checkpoints", nargs="+", help="dynamics checkpoints (files, DeepSpeed folders, exports)"
    )
    evaluate.add_argument("--data", required=True, help="prepared folder; its val split is used")
    evaluate.add_argument("--context", type=int, default=4, help="real frames given")
    evaluate.add_argument("--horizon", type=int, default=12, help="frames generated and scored")
    evaluate.add_argument("--clips", type=int, default=64, help="held-out clips to score")
    evaluate.add_argument("--steps", type=int, default=8, help="MaskGIT iterations per frame")
    evaluate.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy, the most likely rollout"
    )
    evaluate.add_argument("--top-k", type=int, default=None)
    evaluate.add_argument("--guidance", type=float, default=0.0, help=GUIDANCE_HELP)
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", default="eval", help="output folder")
    evaluate.add_argument("--device", default=None, help=DEVICE_HELP)
    evaluate.add_argument("--i3d", default=None, help="I3D weights file for FVD (see worldmodel/eval/i3d.py)")
    evaluate.add_argument(
        "--lpips", default=None, help="LPIPS-AlexNet weights (see worldmodel/eval/lpips.py)"
    )
    evaluate.add_argument(
        "--wandb", choices=("offline", "online"), default=None, help="also log results to wandb"
    )
    evaluate.add_argument(
        "--weights", choices=("ema", "raw"), default="ema", help="the EMA where training kept one, or raw"
    )

    generate = commands.add_parser("generate", help="play the world model: continue a video under actions")
    generate.add_argument("checkpoint", help="a dynamics checkpoint")
    generate.add_argument(
        "--context", required=True, help="a video file whose first frames start the rollout"
    )
    generate.add_argument("--context-frames", type=int, default=4, help="how many of its frames to give")
    generate.add_argument("--actions", help="comma-separated action ids, one per new frame")
    generate.add_argument(
        "--latent-actions",
        help="comma-separated latent action ids, one per new frame (a model of task.action_source=latent)",
    )
    generate.add_argument("--frames", type=int, default=None, help="new frames (default: one per action)")
    generate.add_argument("--steps", type=int, default=8, help="MaskGIT iterations per frame")
    generate.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--guidance", type=float, default=0.0, help=GUIDANCE_HELP)
    generate.add_argument("--device", default=None, help=DEVICE_HELP)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument(
        "--weights", choices=("ema", "raw"), default="ema", help="the EMA where training kept one, or raw"
    )
    generate.add_argument("--out", default="rollout.mp4")

    export = commands.add_parser(
        "export", help="consolidate a checkpoint into one file (no DeepSpeed needed)"
    )
    export.add_argument("checkpoint", help="a checkpoint file or DeepSpeed checkpoint folder")
    export.add_argument("out", help="the consolidated .pt file to write")

    scaling = commands.add_parser("scaling", help="fit loss scaling laws over finished runs or sweeps")
    scaling.add_argument(
        "runs", nargs="+", help="run folders (with summary.json) or sweep folders above them"
    )
    scaling.add_argument("--out", default="scaling", help="folder for scaling.json, scaling.md, scaling.png")

    verify = commands.add_parser(
        "verify", help="check a prepared folder: shard sha256s and every sample's checksums"
    )
    verify.add_argument("root", help="folder with dataset.json")

    inspect = commands.add_parser("inspect", help="stream a few batches from a prepared folder or shards")
    inspect.add_argument("root", nargs="+", help="folder with dataset.json, or shard paths / URLs")
    inspect.add_argument("--size", type=int, default=None, help="resize shards of other tools to this")
    inspect.add_argument("--fps", type=float, default=None, help="their frame rate for the window")
    inspect.add_argument("--split", choices=("train", "val"), default="train")
    inspect.add_argument("--batches", type=int, default=4)
    inspect.add_argument("--batch-size", type=int, default=4)
    inspect.add_argument("--frames", type=int, default=16)
    inspect.add_argument("--workers", type=int, default=2)
    return parser


def _prepare(args: argparse.Namespace) -> dict:
    if args.source == "sample":
        from worldmodel.data.sources.sample import prepare_sample

        return prepare_sample(args.out)
    common = dict(val_fraction=args.val_fraction, clips_per_shard=args.shard_size, workers=args.workers)
    if args.source in ("folder", "shards"):
        common["split_by"] = args.split_by
        from worldmodel.data.sources.folder import ClipSettings, prepare_folder
        from worldmodel.data.video import LOSSLESS, EncodeSettings

        encode = LOSSLESS if args.crf == 0 else EncodeSettings(crf=args.crf)
        settings = ClipSettings(args.frames, args.size, args.fps, args.hop, encode)
        if args.source == "folder":
            return prepare_folder(args.src, args.out, settings, **common)
        from worldmodel.data.datamodule import expand_shards
        from worldmodel.data.sources.shards import prepare_shards

        member = dict(caption_field=args.caption_field, video_member_name=args.video_member)
        return prepare_shards(expand_shards(args.urls), args.out, settings, **common, **member)
    if args.source == "coinrun":
        from worldmodel.data.sources.coinrun import CoinRunSettings, prepare_coinrun

        settings = CoinRunSettings(args.frames, args.size, args.max_steps, args.distribution_mode, args.seed)
        return prepare_coinrun(args.episodes, args.out, settings, **common, recorder=args.recorder_python)
    from worldmodel.data.sources.atari import AtariSettings, prepare_atari

    settings = AtariSettings(
        args.frames, args.size, args.frameskip, args.sticky, args.max_hold, args.max_steps, args.seed
    )
    games = [game.strip() for game in args.games.split(",") if game.strip()]
    return prepare_atari(games, args.episodes, args.out, settings, **common)


def _inspect(args: argparse.Namespace) -> None:
    from worldmodel.config import DataConfig
    from worldmodel.data.datamodule import VideoDataModule

    folder = len(args.root) == 1 and Path(args.root[0]).is_dir()  # else shards, ours or other tools'
    config = DataConfig(
        root=args.root[0] if folder else None,
        train_shards=None if folder else args.root,
        val_shards=None if folder else args.root,
        size=args.size,
        fps=None if folder else args.fps,
        frames=args.frames,
        global_batch_size=args.batch_size,
        num_workers=args.workers,
        batches_per_epoch=args.batches,
    )
    data = VideoDataModule(config)
    loader = data.train_dataloader() if args.split == "train" else data.val_dataloader()
    started = time.perf_counter()
    clips = 0
    for number, batch in enumerate(loader):
        if number == args.batches:
            break
        payload = "tokens" if "tokens" in batch else "video"  # a token folder gives tokens
        content, actions = batch[payload], batch["actions"]
        clips += len(content)
        print(
            f"batch {number}: {payload} {tuple(content.shape)} {content.dtype} "
            f"mean {content.float().mean():.1f}, actions {tuple(actions.shape)} "
            f"{actions[0].tolist()}, keys {batch['key'][:2]}..."
            + (f", captions {batch['text'][:2]}" if any(batch["text"]) else "")
        )
    elapsed = time.perf_counter() - started
    print(f"read {clips} clips in {elapsed:.2f} s; skipped by cause: {loader.skip_counts()}")


def _info(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from worldmodel.models.flops import (
        dynamics_flops_per_token,
        dynamics_parameters,
        lam_flops_per_token,
        lam_parameters,
        tokenizer_parameters,
    )
    from worldmodel.models.lam import LatentActionConfig
    from worldmodel.models.memory import STRATEGIES, training_memory
    from worldmodel.models.presets import preset
    from worldmodel.models.tokenizer import TokenizerConfig

    config = preset(args.model)
    if isinstance(config, LatentActionConfig):
        grid = args.size // config.patch
        flops = lam_flops_per_token(config, args.frames, grid * grid)
        print(
            f"{args.model}: {lam_parameters(config) / 1e6:.1f}M parameters, {config.num_latents} latent "
            f"actions, {args.size}x{args.size} frames -> {grid}x{grid} patches; training "
            f"{flops / 1e6:.2f} MFLOP per patch of {args.frames}-frame clips"
        )
        return
    if isinstance(config, TokenizerConfig):
        grid = args.size // config.downsample
        print(
            f"{args.model}: {tokenizer_parameters(config) / 1e6:.1f}M parameters, vocabulary "
            f"{config.levels} = {math.prod(config.levels)} codes, {args.size}x{args.size} frames -> "
            f"{grid}x{grid} tokens"
        )
        return
    config = replace(config, vocab_size=args.vocab)
    grid = args.size // args.downsample
    tokens = args.frames * grid * grid
    flops = dynamics_flops_per_token(config, args.frames, grid * grid, clean_context=True)  # as trained
    step_tokens = tokens * args.micro_batch * args.gpus
    print(
        f"{args.model}: {dynamics_parameters(config) / 1e6:.1f}M parameters (width {config.dim}, depth "
        f"{config.depth}, {config.heads} heads, vocabulary {args.vocab})\n"
        f"{args.frames} frames x {grid}x{grid} tokens = {tokens} tokens per clip; training "
        f"{flops / 1e9:.2f} GFLOP per token, {flops * step_tokens / 1e15:.2f} PFLOP per step "
        f"({args.micro_batch} clip(s) x {args.gpus} GPUs)\n"
        f"per-GPU memory in GB, {args.precision}, Adam, micro-batch {args.micro_batch} "
        f"(plus ~1-3 GB CUDA context; frozen tokenizer not counted):"
    )
    header = ("strategy", "weights", "grads", "optim", "activ.", "total", "activ.+ckpt", "total+ckpt", "fits")
    print("  ".join(f"{column:>11}" for column in header))
    for strategy in STRATEGIES:
        plain, checkpointed = (
            training_memory(
                config,
                frames=args.frames,
                tokens_per_frame=grid * grid,
                micro_batch=args.micro_batch,
                gpus=args.gpus,
                strategy=strategy,
                precision=args.precision,
                checkpointing=ckpt,
            )
            for ckpt in (False, True)
        )
        fits = (
            "yes"
            if plain.total / 1e9 <= args.gpu_memory
            else ("with ckpt" if checkpointed.total / 1e9 <= args.gpu_memory else "no")
        )
        numbers = (
            plain.weights,
            plain.gradients,
            plain.optimizer,
            plain.activations,
            plain.total,
            checkpointed.activations,
            checkpointed.total,
        )
        print(f"{strategy:>11}  " + "  ".join(f"{n / 1e9:>11.1f}" for n in numbers) + f"  {fits:>11}")


def _generate(args: argparse.Namespace) -> None:
    from worldmodel.data.video import encode_mp4
    from worldmodel.eval.rollout import RolloutSettings, generate_from_video, load_world_model

    model = load_world_model(args.checkpoint, args.weights).to(default_device(args.device))
    actions = generate_actions(model, args.actions, args.latent_actions, args.checkpoint)
    frames = args.frames or len(actions)
    actions = (actions * frames)[:frames]  # repeat the given sequence to the requested length
    settings = RolloutSettings(
        maskgit_steps=args.steps,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        guidance=args.guidance,
    )
    video = generate_from_video(model, args.context, actions, args.context_frames, settings)
    Path(args.out).write_bytes(encode_mp4(video.numpy(), fps=model.config["data"].get("fps") or 10.0))
    print(f"wrote {args.out}: {args.context_frames} real frames + {frames} generated")


def generate_actions(model, actions: str | None, latent_actions: str | None, checkpoint: str) -> list[int]:
    """The action ids that drive `model`, from what `generate` was given: --actions for a model of
    the data's actions, --latent-actions for one of latent actions, both (paired, one id per
    (true, latent) pair) for a model of both."""
    needs = {
        "true": ("--actions",),
        "latent": ("--latent-actions",),
        "both": ("--actions", "--latent-actions"),
    }
    wanted = needs[model.action_source]
    given = tuple(
        flag for flag, value in (("--actions", actions), ("--latent-actions", latent_actions)) if value
    )
    if given != wanted:
        raise SystemExit(
            f"{checkpoint} was trained with task.action_source={model.action_source}: drive it with "
            f"{' and '.join(wanted)}, got {' and '.join(given) or 'neither'}"
        )

    def ids(text: str) -> list[int]:
        return [int(value) for value in text.split(",") if value.strip()]

    if model.action_source != "both":
        return ids(actions or latent_actions)
    true, latent = ids(actions), ids(latent_actions)
    if len(true) != len(latent) or any(not 0 <= value < model.lam.num_latents for value in latent):
        raise SystemExit(
            f"--actions and --latent-actions must pair up: as many of each, latent ids in "
            f"[0, {model.lam.num_latents}); got {true} and {latent}"
        )
    return [action * model.lam.num_latents + code for action, code in zip(true, latent, strict=True)]


def _splits(index: dict) -> str:
    """What a written dataset.json holds, in one line."""
    return ", ".join(
        f"{name} {split['clips']} clips in {len(split['shards'])} shards"
        for name, split in index["splits"].items()
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except (KeyError, ValueError, FileNotFoundError, NotADirectoryError) as error:  # user input, not a bug
        print(f"worldmodel {args.command}: error: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.command == "prepare":
        index = _prepare(args)
        print(f"wrote {Path(args.out) / 'dataset.json'}: {_splits(index)}")
    elif args.command == "tokenize":
        from worldmodel.data.tokens import tokenize

        if min(args.devices, args.batch_size, args.hop) < 1:
            raise ValueError("--devices, --batch-size and --hop must be >= 1")
        index = tokenize(
            args.checkpoint,
            args.data,
            args.out,
            devices=args.devices,
            batch_size=args.batch_size,
            frames=args.frames,
            stride=args.stride,
            hop=args.hop,
            weights=args.weights,
            lam_checkpoint=args.lam,
        )
        skipped = {cause: count for cause, count in index["skipped"].items() if count}
        print(f"wrote {Path(args.out) / 'dataset.json'}: {_splits(index)}; skipped: {skipped or 'none'}")
    elif args.command == "info":
        _info(args)
    elif args.command == "inspect":
        _inspect(args)
    elif args.command == "verify":
        from worldmodel.data.verify import verify_folder

        problems, samples = verify_folder(args.root)
        for problem in problems:
            print(problem)
        print(f"{args.root}: {samples} samples checked, {len(problems)} problem(s)")
        if problems:
            raise SystemExit(1)
    elif args.command == "eval":
        from worldmodel.eval.report import evaluate, table
        from worldmodel.eval.rollout import RolloutSettings

        settings = RolloutSettings(
            args.context, args.horizon, args.steps, args.temperature, args.top_k, args.seed, args.guidance
        )
        reports = evaluate(
            args.checkpoints,
            args.data,
            settings,
            args.clips,
            args.out,
            args.batch_size,
            i3d_weights=args.i3d,
            lpips_weights=args.lpips,
            wandb_mode=args.wandb,
            device=default_device(args.device),
            weights=args.weights,
        )
        for report in reports:
            print(f"{report['checkpoint']}:")
            print(table(report), end="")
            pictures = [
                name
                for name in ("rollouts.png", "controllability.png", "reconstructions.png")
                if (Path(report["folder"]) / name).exists()
            ]
            print(f"pictures: {', '.join(str(Path(report['folder']) / name) for name in pictures)}")
        print(f"wrote {args.out}/")
    elif args.command == "generate":
        _generate(args)
    elif args.command == "scaling":
        from worldmodel.eval.scaling import analyze

        print(analyze(args.runs, args.out)["text"], end="")
        print(f"wrote {args.out}/scaling.json, scaling.md, scaling.png")
    elif args.command == "export":
        from worldmodel.training.checkpoint import export

        print(f"wrote {export(args.checkpoint, args.out)}")


if __name__ == "__main__":
    sys.exit(main())
