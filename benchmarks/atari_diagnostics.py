"""The measurements behind README "Results on Atari": why the recipe does not beat copy-last yet.

    python benchmarks/atari_diagnostics.py actions outputs/atari/dynamics/checkpoints/last.ckpt DATA
    python benchmarks/atari_diagnostics.py flicker outputs/atari/tokenizer/checkpoints/last.ckpt DATA
    python benchmarks/atari_diagnostics.py policy      # copy-last and still frames per hold length
    python benchmarks/atari_diagnostics.py step-time   # a teacher-forced dynamics_xs step, fp32 / bf16
    python benchmarks/atari_diagnostics.py oracle DATA [--tokenizer CKPT]  # the emulator as a perfect model
    python benchmarks/atari_diagnostics.py reach       # how many pixels one action changes, and when
    python benchmarks/atari_diagnostics.py identifiable  # how much any latent action can say about the action
    python benchmarks/atari_diagnostics.py inverse DATA [--tokenizer CKPT]  # can a LAM encoder see actions?
    python benchmarks/atari_diagnostics.py persistence LAM_CKPT DATA  # what a LAM's codes follow

DATA: the prepared folder `make atari` recorded (outputs/atari/data).

actions: teacher-forced cross-entropy of a dynamics checkpoint on 32 held-out clips with the true,
random and no actions (equal losses: the model ignores its actions). flicker: the share of tokens
whose 4x4 pixel patch did not change between frames but whose id did. policy: copy-last PSNR at
horizons 1 / 4 and the share of exactly repeated frames, over 6 episodes of each game, for random
actions held 1, 4 or 8 steps. step-time: seconds per training step of dynamics_xs (8 clips x 8
frames of 16x16 tokens, clean context) with the fused attention kernel and with plain matmuls for
short temporal attention, in fp32 and under bf16 autocast. oracle: the emulator restored to each
val clip's last context frame and stepped under the recorded and under random actions: how much
the actions change the screen, and the ΔtPSNR of a model perfect up to the tokenizer's tokens.
reach: from states along a random-action episode, the emulator stepped once under each of the 18
actions and then under the same random actions: the share of 64x64 pixels that differ between
two such branches 1..4 frames later (what a latent action model has to see an action by).
identifiable: from states along random-action episodes, the emulator stepped once under each of
the 18 actions; actions whose next frames are equal cannot be told apart by anything that sees
frames t and t + 1 (a LAM's encoder). Under uniformly random actions that bounds inverse dynamics
(best accuracy: distinct outcomes / 18) and the mutual information between any latent action and
the true one (log 18 minus the mean log size of the action's group), and so the NMI eval reports
(arithmetic: 2 I / (H(true) + H(latent)), with H(latent) >= I and, for 8 codes, I <= log 8).
inverse: lam_xs's encoder and a linear probe on its latent trained on the recorded actions
themselves (inverse dynamics: cross-entropy alone, 3 passes over 200 training batches of 8 clips x
8 frames), with the patches' features averaged or max-pooled and with or without the frames'
difference as input, and (--tokenizer) from the frozen tokenizer's quantized codes instead of
pixels, through the same overlapping patches on the token grid (as many positions for the ST
blocks); accuracy on 30 held-out batches (chance 1/18).
persistence: a LAM's latent actions on 128 held-out clips against the recorded actions one step
before, at and after their transition (an agent's answer that comes late would show at +1), and
against the latent action of the transition before: the recorded actions, drawn anew every step,
share nothing with their predecessors, so codes that share much with theirs follow motion that
lasts (an opponent's walk, the river's scroll, an agent's momentum), not the agent's actions. NMI
as eval reports it, with its chance level; DATA may be any recording with actions (CoinRun too).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worldmodel.data.shards import read_index  # noqa: E402
from worldmodel.eval.report import held_out_batches  # noqa: E402


def held_out(data: str) -> dict:
    return next(held_out_batches(Path(data), read_index(data), frames=8, clips=32, batch_size=32))


def actions(checkpoint: str, data: str) -> None:
    from worldmodel.eval.rollout import load_world_model

    model = load_world_model(checkpoint)
    batch = held_out(data)
    tokens, true = model.tokenizer.encode(batch["video"]), batch["actions"]
    kinds = {
        "true": true,
        "random": torch.randint(0, model.num_actions, true.shape, generator=torch.Generator().manual_seed(0)),
        "none": torch.full_like(true, -1),
    }
    for name, acts in kinds.items():
        with torch.no_grad():  # the same 4 masks for every kind of actions
            losses = [
                model.dynamics.training_loss(
                    tokens, acts, torch.Generator().manual_seed(s), clean_context=True
                )[0]
                for s in range(4)
            ]
        print(f"{name:>6} actions: cross-entropy {torch.stack(losses).mean():.4f}")


def flicker(checkpoint: str, data: str) -> None:
    from worldmodel.training.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    video = held_out(data)["video"]  # (B, T, H, W, 3)
    patch = tokenizer.config.downsample
    patches = video.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, T, h, w, 3, p, p)
    moved = (patches[:, 1:] != patches[:, :-1]).flatten(4).any(-1)  # (B, T-1, h, w)
    tokens = tokenizer.encode(video)
    changed = tokens[:, 1:] != tokens[:, :-1]
    print(f"patches that change: {moved.float().mean():.3f}")
    print(f"ids that change where the patch did not: {changed[~moved].float().mean():.3f}")


def policy() -> None:
    from worldmodel.data.sources.atari import AtariSettings, episode_seed, play_episode
    from worldmodel.eval.metrics import psnr

    for game in ("Boxing", "Riverraid"):
        for hold in (1, 4, 8):
            settings = AtariSettings(max_hold=hold, max_steps=500)
            scores = []
            for episode in range(6):
                frames = torch.from_numpy(
                    play_episode(game, episode_seed(settings, game, episode), settings)[0]
                )
                scores.append(
                    (
                        psnr(frames[:-1], frames[1:]).mean(),
                        psnr(frames[:-4], frames[4:]).mean(),
                        (frames[1:] == frames[:-1]).flatten(1).all(-1).float().mean(),
                    )
                )
            copy1, copy4, still = torch.tensor(scores).mean(0).tolist()
            print(
                f"{game:<10} hold 1..{hold}: copy-last {copy1:.1f} / {copy4:.1f} dB, still frames {still:.2f}"
            )


def oracle(data: str, tokenizer: str | None, context: int = 4, horizon: int = 8, draws: int = 4) -> None:
    """The emulator as a perfect world model: from the state at eval's last context frame of every
    val clip, the future under the recorded actions against the futures under `draws` sequences
    of uniformly random actions (as eval draws them). With a tokenizer checkpoint, both futures
    also pass through it: the ΔtPSNR of a model that is perfect up to its tokenizer."""
    import numpy as np

    from worldmodel.data.sources import validation_count
    from worldmodel.data.sources.atari import (
        FULL_ACTION_SET_SIZE,
        AtariSettings,
        episode_seed,
        make_env,
        play_episode,
    )
    from worldmodel.data.video import resize_frame
    from worldmodel.eval.metrics import psnr

    source = read_index(data)["source"]
    fields = AtariSettings.__dataclass_fields__
    settings = AtariSettings(**{key: value for key, value in source.items() if key in fields})
    size = settings.size
    val = range(source["episodes"] - validation_count(source["episodes"], 0.1), source["episodes"])
    draw = np.random.default_rng(0)
    model = None
    if tokenizer:
        from worldmodel.training.checkpoint import read_stage_checkpoint, tokenizer_from

        model = tokenizer_from(*read_stage_checkpoint(tokenizer, "tokenizer")).eval()
    for game in source["games"]:
        truths, randoms = [], []  # (context + horizon, H, W, 3) clips; randoms[i] from truths[i // draws]
        for episode in val:
            seed = episode_seed(settings, game, episode)
            recorded, actions, _ = play_episode(game, seed, settings)
            env = make_env(game, settings)
            observation, _ = env.reset(seed=seed)
            ale = env.unwrapped.ale
            starts = set(range(context - 1, len(recorded) - horizon, settings.frames))
            for step, action in enumerate(actions[: len(recorded) - 1]):
                if not np.array_equal(resize_frame(observation, size, size), recorded[step]):
                    raise RuntimeError(f"{game} episode {episode}: the replay left the recording")
                if step in starts:
                    past = recorded[step + 1 - context : step + 1]
                    truths.append(recorded[step + 1 - context : step + 1 + horizon])
                    state = ale.cloneState()
                    for _ in range(draws):
                        future = [
                            resize_frame(env.step(int(random))[0], size, size)
                            for random in draw.integers(0, FULL_ACTION_SET_SIZE, horizon)
                        ]
                        randoms.append(np.concatenate([past, np.stack(future)]))
                        ale.restoreState(state)
                observation = env.step(int(action))[0]
            env.close()
        truth = torch.from_numpy(np.stack(truths))  # (clips, context + horizon, H, W, 3)
        random = torch.from_numpy(np.stack(randoms))  # (clips * draws, context + horizon, H, W, 3)
        future = truth[:, context:].repeat_interleave(draws, 0)  # each truth beside its draws
        last = truth[:, context - 1 : context]  # the last context frame: (clips, 1, H, W, 3)
        rows = {
            "copy-last": psnr(last.expand_as(truth[:, context:]), truth[:, context:]),
            "emulator, random actions": psnr(random[:, context:], future),
        }
        if model is not None:
            with torch.no_grad():
                decoded = [
                    torch.cat([model.decode(model.encode(batch)) for batch in clips.split(32)])
                    for clips in (truth, random)
                ]
            rows["tokenizer (true actions)"] = psnr(decoded[0][:, context:], truth[:, context:])
            rows["tokenizer, random actions"] = psnr(decoded[1][:, context:], future)
        print(f"{game}: {len(truths)} clips, {draws} random action sequences each; PSNR (dB) at horizon step")
        print(f"  {'':<28}" + "".join(f"{f'h{h}':>8}" for h in (1, 2, 4, 8)))
        for name, values in rows.items():
            means = values.mean(0)
            print(f"  {name:<28}" + "".join(f"{means[h - 1]:8.2f}" for h in (1, 2, 4, 8)))
        if model is not None:
            ceiling = rows["tokenizer (true actions)"].mean(0) - rows["tokenizer, random actions"].mean(0)
            print(f"  {'ΔtPSNR ceiling':<28}" + "".join(f"{ceiling[h - 1]:8.2f}" for h in (1, 2, 4, 8)))


def reach(branch_points: int = 18, later: int = 3) -> None:
    import numpy as np

    from worldmodel.data.sources.atari import FULL_ACTION_SET_SIZE, AtariSettings, make_env
    from worldmodel.data.video import resize_frame

    settings = AtariSettings()
    draw = np.random.default_rng(0)
    for game in ("Boxing", "Riverraid"):
        env = make_env(game, settings)
        env.reset(seed=1)
        ale = env.unwrapped.ale
        changed = []  # per branch point: (later + 1,) shares of pixels differing between branches
        for step in range(20 + 10 * branch_points):  # a branch point every 10 steps after the first 20
            if step >= 20 and step % 10 == 0:
                state = ale.cloneState()
                after = draw.integers(0, FULL_ACTION_SET_SIZE, later).tolist()
                branches = []  # (actions, later + 1, H, W, 3)
                for first in range(FULL_ACTION_SET_SIZE):
                    ale.restoreState(state)
                    branches.append(
                        [resize_frame(env.step(a)[0], settings.size, settings.size) for a in [first, *after]]
                    )
                ale.restoreState(state)
                frames = np.asarray(branches, dtype=np.int16)
                differ = (frames[:, None] != frames[None]).any(-1)  # (actions, actions, later + 1, H, W)
                pairs = FULL_ACTION_SET_SIZE * (FULL_ACTION_SET_SIZE - 1)  # two different actions
                changed.append(differ.mean(axis=(3, 4)).sum(axis=(0, 1)) / pairs)
            env.step(int(draw.integers(0, FULL_ACTION_SET_SIZE)))
        env.close()
        shares = " / ".join(f"{100 * share:.1f}%" for share in np.mean(changed, axis=0))
        print(f"{game:<10} pixels that one action changes, 1..{later + 1} frames later: {shares}")


def step_time() -> None:
    import worldmodel.models.layers as layers
    from worldmodel.models.dynamics import Dynamics
    from worldmodel.models.presets import preset

    tokens, acts = torch.randint(0, 1000, (8, 8, 16, 16)), torch.randint(0, 18, (8, 8))
    for bf16 in (False, True):
        for short in (0, layers.SHORT_SEQUENCE):
            layers.SHORT_SEQUENCE, default = short, layers.SHORT_SEQUENCE
            model = Dynamics(replace(preset("dynamics_xs"), vocab_size=1000))
            optimizer = torch.optim.AdamW(model.parameters())

            def step(model=model, optimizer=optimizer, bf16=bf16):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss, _ = model.training_loss(tokens, acts, clean_context=True)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

            step()  # warm-up
            started = time.perf_counter()
            for _ in range(4):
                step()
            seconds = (time.perf_counter() - started) / 4
            layers.SHORT_SEQUENCE = default
            path = "plain matmuls" if short else "fused kernel"
            print(f"{'bf16' if bf16 else 'fp32'}, temporal attention by {path}: {seconds:.2f} s/step")


def identifiable(episodes: int = 3, every: int = 5, max_steps: int = 500) -> None:
    import math

    import numpy as np

    from worldmodel.data.sources.atari import FULL_ACTION_SET_SIZE, AtariSettings, make_env
    from worldmodel.data.video import resize_frame

    settings = AtariSettings()
    actions = FULL_ACTION_SET_SIZE
    draw = np.random.default_rng(0)
    for game in ("Boxing", "Riverraid"):
        outcomes, information = [], []  # per branch point: distinct next frames, I(action; next frame)
        for episode in range(episodes):
            env = make_env(game, settings)
            env.reset(seed=episode + 1)
            ale = env.unwrapped.ale
            for step in range(max_steps):
                if step % every == 0:
                    state = ale.cloneState()
                    nexts = []
                    for action in range(actions):
                        ale.restoreState(state)
                        nexts.append(
                            resize_frame(env.step(action)[0], settings.size, settings.size).tobytes()
                        )
                    ale.restoreState(state)
                    sizes = np.unique(nexts, return_counts=True)[1]  # (groups,) actions per distinct frame
                    outcomes.append(len(sizes))
                    information.append(math.log(actions) - float((sizes * np.log(sizes)).sum()) / actions)
                _, _, terminated, truncated, _ = env.step(int(draw.integers(0, actions)))
                if terminated or truncated:
                    break
            env.close()
        entropy, mutual = math.log(actions), float(np.mean(information))
        eight = min(mutual, math.log(8))
        print(
            f"{game:<10} {len(outcomes)} states: distinct next frames {np.mean(outcomes):.2f} of {actions} "
            f"(best inverse-dynamics accuracy {np.mean(outcomes) / actions:.3f}); I(action; next frame) "
            f"{mutual:.3f} of {entropy:.3f} nats; NMI at most {2 * mutual / (entropy + mutual):.3f} "
            f"(8 codes: {2 * eight / (entropy + eight):.3f})"
        )


def inverse(data: str, tokenizer: str | None = None, batches: int = 200, passes: int = 3) -> None:
    import itertools

    import torch.nn.functional as F
    from torch import nn

    from worldmodel.config import DataConfig
    from worldmodel.data.datamodule import VideoDataModule
    from worldmodel.models.lam import LatentActionModel
    from worldmodel.models.presets import preset
    from worldmodel.training.checkpoint import load_tokenizer

    def transitions(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["video"], batch["actions"][:, :-1].flatten()  # action t leads frame t to t + 1

    loader = VideoDataModule(
        DataConfig(root=data, frames=8, num_workers=0, batches_per_epoch=batches), rank=0, world_size=1
    )
    loader.setup("fit")
    train = [transitions(b) for b in itertools.islice(loader.train_dataloader(), batches)]
    val = [transitions(b) for b in itertools.islice(loader.val_dataloader(), 30)]
    actions = read_index(data)["num_actions"]
    # (pooling, frames' difference, input): pixels in [-1, 1], or the frozen tokenizer's codes
    variants = [("mean", False, "pixels"), ("max", False, "pixels"), ("max", True, "pixels")]
    splits = {"pixels": (train, val)}
    if tokenizer:
        frozen = load_tokenizer(tokenizer).eval()
        with torch.no_grad():  # each batch's codes (B, T, h, w, C), computed once
            splits["tokens"] = tuple(
                [(frozen.encode_codes(video).float(), truth) for video, truth in split]
                for split in (train, val)
            )
        variants.append(("max", True, "tokens"))
    for pool, difference, source in variants:
        torch.manual_seed(0)
        config = replace(preset("lam_xs"), pool=pool, frame_difference=difference, probe_actions=actions)
        model = LatentActionModel(config)
        if source == "tokens":
            # The same overlapping patches on the token grid: each of lam_xs's 8x8-pixel patches is
            # 8 / downsample tokens a side, so the ST blocks see as many positions as from pixels.
            size = config.patch // frozen.config.downsample
            channels = 3 * len(frozen.config.levels)  # codes of t, t + 1 and their difference
            model.encoder_patches = nn.Conv2d(channels, config.dim, 2 * size, stride=size, padding=size // 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def read(frames: torch.Tensor, model=model) -> torch.Tensor:
            """uint8 frames (B, T, H, W, 3) or codes (B, T, h, w, C) -> logits (B * (T - 1), actions)."""
            pixels = frames.float() / 127.5 - 1.0 if frames.dtype == torch.uint8 else frames
            return model.probe(model.encode(pixels).flatten(0, 1))

        accuracies = []
        train_split, val_split = splits[source]
        for _ in range(passes):
            for video, truth in train_split:
                loss = F.cross_entropy(read(video), truth)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                right = sum(int((read(video).argmax(-1) == truth).sum()) for video, truth in val_split)
            accuracies.append(right / sum(len(truth) for _, truth in val_split))
        seen = f"{source} t, t + 1" + (" and their difference" if difference else "")
        print(
            f"{pool:>4} pooling, {seen:<38} held-out accuracy after each pass: "
            + " / ".join(f"{accuracy:.3f}" for accuracy in accuracies)
            + f" (chance {1 / actions:.3f})"
        )


def persistence(checkpoint: str, data: str, clips: int = 128, frames: int = 8) -> None:
    from worldmodel.eval.metrics import action_agreement
    from worldmodel.training.checkpoint import load_lam

    lam = load_lam(checkpoint).eval()
    latent, true, sources = [], [], []
    for batch in held_out_batches(Path(data), read_index(data), frames, clips, batch_size=8):
        latent.append(lam.infer(batch["video"]))  # (B, frames - 1): transition t -> t + 1
        true.append(batch["actions"])  # (B, frames): action t leads to frame t + 1
        sources += batch["source"]
    latent, true = torch.cat(latent), torch.cat(true)
    middle = slice(1, frames - 2)  # transitions with a recorded action before and after them
    for source in sorted(set(sources)):
        rows = torch.tensor([s == source for s in sources])
        codes, actions = latent[rows], true[rows]  # (clips, frames - 1), (clips, frames)
        scores = {
            f"vs action t{lag:+d}": action_agreement(
                codes[:, middle].flatten(), actions[:, middle.start + lag : middle.stop + lag].flatten()
            )
            for lag in (-1, 0, 1)
        }
        scores["vs latent t-1"] = action_agreement(codes[:, 1:].flatten(), codes[:, :-1].flatten())
        scores["(action t vs action t-1)"] = action_agreement(
            actions[:, 1:-1].flatten(), actions[:, :-2].flatten()
        )
        shown = [f"{name}: NMI {v['nmi']:.3f} ({v['nmi_chance']:.3f})" for name, v in scores.items()]
        print(source, "  ".join(shown))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("actions", "flicker"):
        command = commands.add_parser(name)
        command.add_argument("checkpoint")
        command.add_argument("data")
    commands.add_parser("policy")
    oracle_command = commands.add_parser("oracle")
    oracle_command.add_argument("data")
    oracle_command.add_argument("--tokenizer", help="a tokenizer checkpoint: the ceiling through its tokens")
    commands.add_parser("reach")
    commands.add_parser("identifiable")
    inverse_command = commands.add_parser("inverse")
    inverse_command.add_argument("data")
    inverse_command.add_argument(
        "--tokenizer", help="a tokenizer checkpoint: also read the actions from its codes"
    )
    persistence_command = commands.add_parser("persistence")
    persistence_command.add_argument("checkpoint", help="a latent action model (task=lam)")
    persistence_command.add_argument("data")
    commands.add_parser("step-time")
    args = parser.parse_args()
    if args.command == "actions":
        actions(args.checkpoint, args.data)
    elif args.command == "flicker":
        flicker(args.checkpoint, args.data)
    elif args.command == "policy":
        policy()
    elif args.command == "oracle":
        oracle(args.data, args.tokenizer)
    elif args.command == "reach":
        reach()
    elif args.command == "identifiable":
        identifiable()
    elif args.command == "inverse":
        inverse(args.data, args.tokenizer)
    elif args.command == "persistence":
        persistence(args.checkpoint, args.data)
    else:
        step_time()


if __name__ == "__main__":
    main()
