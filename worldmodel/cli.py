"""The `worldmodel` command: prepare shards and look inside them."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _add_shard_options(parser: argparse.ArgumentParser, frames: int, size: int) -> None:
    parser.add_argument("--out", required=True, help="output folder for shards and dataset.json")
    parser.add_argument("--frames", type=int, default=frames, help="frames per clip")
    parser.add_argument("--size", type=int, default=size, help="clip height and width in pixels")
    parser.add_argument("--shard-size", type=int, default=256, help="clips per shard")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation")
    parser.add_argument("--workers", type=int, default=2, help="processes that cut / record clips")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldmodel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="build WebDataset shards").add_subparsers(
        dest="source", required=True
    )
    folder = prepare.add_parser("folder", help="every video under a folder")
    folder.add_argument("src", help="folder searched recursively for mp4/avi/mkv/webm/mov")
    _add_shard_options(folder, frames=16, size=64)
    folder.add_argument("--fps", type=float, default=10.0, help="clip frame rate")
    folder.add_argument(
        "--hop", type=int, default=None, help="frames between clip starts (default: --frames)"
    )
    folder.add_argument("--crf", type=int, default=18, help="h264 quality (0 = lossless)")

    atari = prepare.add_parser("atari", help="record random-policy Atari game play")
    atari.add_argument("--games", required=True, help="comma-separated, e.g. Breakout,Pong")
    atari.add_argument("--episodes", type=int, required=True, help="episodes per game")
    _add_shard_options(atari, frames=16, size=64)
    atari.add_argument("--frameskip", type=int, default=4)
    atari.add_argument("--sticky", type=float, default=0.25, help="repeat_action_probability")
    atari.add_argument("--max-steps", type=int, default=2000, help="steps per episode at most")
    atari.add_argument("--seed", type=int, default=0)

    sample = prepare.add_parser("sample", help="the embedded default dataset (real footage, offline)")
    sample.add_argument("--out", required=True)

    inspect = commands.add_parser("inspect", help="stream a few batches from a prepared folder")
    inspect.add_argument("root", help="folder with dataset.json")
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
    if args.source == "folder":
        from worldmodel.data.sources.folder import ClipSettings, prepare_folder
        from worldmodel.data.video import LOSSLESS, EncodeSettings

        encode = LOSSLESS if args.crf == 0 else EncodeSettings(crf=args.crf)
        settings = ClipSettings(args.frames, args.size, args.fps, args.hop, encode)
        return prepare_folder(args.src, args.out, settings, **common)
    from worldmodel.data.sources.atari import AtariSettings, prepare_atari

    settings = AtariSettings(args.frames, args.size, args.frameskip, args.sticky, args.max_steps, args.seed)
    games = [game.strip() for game in args.games.split(",") if game.strip()]
    return prepare_atari(games, args.episodes, args.out, settings, **common)


def _inspect(args: argparse.Namespace) -> None:
    from worldmodel.config import DataConfig
    from worldmodel.data.datamodule import VideoDataModule

    config = DataConfig(
        root=args.root,
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
        video, actions = batch["video"], batch["actions"]
        clips += len(video)
        print(
            f"batch {number}: video {tuple(video.shape)} {video.dtype} "
            f"mean {video.float().mean():.1f}, actions {tuple(actions.shape)} "
            f"{actions[0].tolist()}, keys {batch['key'][:2]}..."
        )
    elapsed = time.perf_counter() - started
    print(f"read {clips} clips in {elapsed:.2f} s; skipped by cause: {loader.skip_counts()}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        index = _prepare(args)
        splits = ", ".join(
            f"{name} {split['clips']} clips in {len(split['shards'])} shards"
            for name, split in index["splits"].items()
        )
        print(f"wrote {Path(args.out) / 'dataset.json'}: {splits}")
    elif args.command == "inspect":
        _inspect(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
