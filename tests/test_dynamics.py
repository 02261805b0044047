import torch

from worldmodel.models.dynamics import Dynamics, DynamicsConfig
from worldmodel.models.layers import STBlock, rotary_1d, rotary_2d

DEBUG = DynamicsConfig(vocab_size=16, num_actions=4, dim=32, depth=2, heads=2)


def tokens_and_actions(batch=2, frames=4, size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, DEBUG.vocab_size, (batch, frames, size, size), generator=generator)
    actions = torch.randint(0, DEBUG.num_actions, (batch, frames), generator=generator)
    return tokens, actions


def test_outputs_for_frames_up_to_t_ignore_later_frames_and_actions_reach_the_next_frame():
    torch.manual_seed(0)
    model = Dynamics(DEBUG).eval()
    tokens, actions = tokens_and_actions()
    changed = tokens.clone()
    changed[:, 2:] = (changed[:, 2:] + 1) % DEBUG.vocab_size
    base, after = model(tokens, actions), model(changed, actions)
    assert torch.equal(base[:, :2], after[:, :2]) and not torch.allclose(base[:, 2:], after[:, 2:])
    other_actions = actions.clone()
    other_actions[:, 1] = (other_actions[:, 1] + 1) % DEBUG.num_actions
    acted = model(tokens, other_actions)  # action 1 leads to frame 2: frames 0 and 1 must not see it
    assert torch.equal(base[:, :2], acted[:, :2]) and not torch.allclose(base[:, 2], acted[:, 2])


def test_spatial_attention_mixes_only_within_a_frame():
    torch.manual_seed(0)
    block = STBlock(dim=32, heads=2).eval()
    torch.nn.init.zeros_(block.temporal.out.weight)  # leave only the spatial path and the MLP
    x = torch.randn(1, 3, 4, 4, 32)
    changed = x.clone()
    changed[:, 1, 0, 0] += torch.randn(32)  # not a constant shift, which LayerNorm would remove
    angles = rotary_2d(4, 4, 16), rotary_1d(3, 16)
    base, after = block(x, *angles), block(changed, *angles)
    assert torch.equal(base[:, 0], after[:, 0]) and torch.equal(base[:, 2], after[:, 2])
    assert not torch.allclose(base[:, 1, 3, 3], after[:, 1, 3, 3])  # every position of that frame moves


def test_null_actions_and_out_of_range_actions():
    model = Dynamics(DEBUG)
    tokens, actions = tokens_and_actions()
    assert model(tokens, torch.full_like(actions, -1)).shape == (2, 4, 4, 4, 16)
    try:
        model(tokens, torch.full_like(actions, DEBUG.num_actions))
    except ValueError as error:
        assert f"[0, {DEBUG.num_actions})" in str(error)
    else:
        raise AssertionError("an action id past num_actions must be rejected")


def test_generation_returns_valid_ids_of_the_requested_shape_deterministic_under_a_seed():
    torch.manual_seed(0)
    model = Dynamics(DEBUG).eval()
    tokens, actions = tokens_and_actions(frames=6)

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.generate(tokens[:, :2], actions, frames=3, steps=4, top_k=8, generator=generator)

    first, again, other = run(1), run(1), run(2)
    assert first.shape == (2, 3, 4, 4) and first.dtype == torch.int64
    assert first.min() >= 0 and first.max() < DEBUG.vocab_size
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_greedy_generation_ignores_the_seed_and_a_window_drops_older_frames():
    torch.manual_seed(0)
    model = Dynamics(DEBUG).eval()
    torch.nn.init.normal_(model.head.weight, std=2.0)  # an untrained head favours one token everywhere
    tokens, actions = tokens_and_actions(frames=8)

    def greedy(context, acts, seed=0, window=None):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(context, acts, 3, steps=2, temperature=0, generator=generator, window=window)

    assert torch.equal(greedy(tokens[:, :4], actions), greedy(tokens[:, :4], actions, seed=1))
    # A window of 3 frames sees 2 past frames: the first new frame equals a rollout from the last 2 alone
    # (positions are relative), and the rollout goes on past the window.
    windowed = greedy(tokens[:, :4], actions, window=3)
    cropped = greedy(tokens[:, 2:4], actions[:, 2:], window=3)
    assert torch.equal(windowed, cropped) and not torch.equal(windowed, greedy(tokens[:, :4], actions))


def test_overfitting_one_batch_cuts_the_loss_by_ninety_percent():
    torch.manual_seed(0)
    model = Dynamics(DEBUG)
    tokens, actions = tokens_and_actions(batch=2, frames=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(400):
        loss, _ = model.training_loss(tokens, actions, generator)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert sum(losses[-20:]) / 20 < 0.1 * sum(losses[:5]) / 5, (losses[:5], losses[-20:])
