"""Parameter counts, training FLOPs per token and MFU, from one formula per architecture.

Training FLOPs per token = 6 * (parameters used in matmuls per token) + the attention term:
each layer's QK^T and AV cost 2 * 2 * D flops per attended pair in the forward pass, x3 for
forward + backward. Spatial attention attends over the h*w tokens of a frame, temporal over the
T frames at a position (counted in full, as is usual for causal attention budgets):
12 * layers * D * (h*w + T).
"""

from __future__ import annotations

import math

from worldmodel.models.dynamics import DynamicsConfig
from worldmodel.models.lam import LatentActionConfig
from worldmodel.models.tokenizer import TokenizerConfig


def st_block_parameters(dim: int, mlp_ratio: float = 4.0) -> int:
    """Two attentions (qkv + out, no bias), a 2-layer MLP (no bias), three LayerNorms."""
    hidden = int(dim * mlp_ratio)
    return 2 * 4 * dim * dim + 2 * dim * hidden + 3 * 2 * dim


def st_transformer_parameters(dim: int, depth: int, mlp_ratio: float = 4.0) -> int:
    return depth * st_block_parameters(dim, mlp_ratio) + 2 * dim  # + final LayerNorm


def dynamics_parameters(config: DynamicsConfig) -> int:
    dim = config.dim
    embeddings = (config.vocab_size + 1) * dim + (config.num_actions + 1) * dim
    head = dim * config.vocab_size
    modulation = config.depth * (6 * dim * dim + 6 * dim) if config.action_conditioning == "adaln" else 0
    return embeddings + st_transformer_parameters(dim, config.depth, config.mlp_ratio) + modulation + head


def _conv(c_in: int, c_out: int, kernel: int) -> int:
    return c_in * c_out * kernel * kernel + c_out


def tokenizer_parameters(config: TokenizerConfig) -> int:
    widths = config.stage_channels()
    codes, dim = len(config.levels), config.dim
    convs = _conv(3, widths[0], 3) + _conv(widths[-1], dim, 1)  # encoder stem and projection
    convs += sum(_conv(a, b, 4) for a, b in zip(widths, widths[1:], strict=False))  # downsampling
    convs += _conv(dim, widths[-1], 1) + _conv(widths[0], 3, 3)  # decoder projection and head
    convs += sum(_conv(b, a, 4) for a, b in zip(widths, widths[1:], strict=False))  # upsampling
    linears = (dim * codes + codes) + (codes * dim + dim)  # to and from the FSQ code
    return convs + linears + 2 * st_transformer_parameters(dim, config.depth)


def st_matmul_parameters(dim: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """Parameters of an ST stack that multiply activations (norms only scale them)."""
    return depth * (8 * dim * dim + 2 * dim * int(dim * mlp_ratio))


def st_attention_flops(dim: int, depth: int, frames: int, tokens_per_frame: int) -> int:
    """Training FLOPs per token of QK^T and AV, spatial over h*w tokens and temporal over T frames."""
    return 12 * depth * dim * (tokens_per_frame + frames)


def dynamics_flops_per_token(
    config: DynamicsConfig, frames: int, tokens_per_frame: int, clean_context: bool = False
) -> float:
    """Training FLOPs per token (forward + backward) of the dynamics model, logits everywhere.

    "token" conditioning adds one token per frame; "adaln" one modulation per frame and block.
    `clean_context` (teacher forcing) runs 2T - 1 frame entries instead of T, and the logits
    only where tokens are masked: frames 1..T-1, a 2/pi share of each on average."""
    dim = config.dim
    entries = tokens_per_frame + (config.action_conditioning == "token")  # per frame
    block_flops = 6 * st_matmul_parameters(dim, config.depth, config.mlp_ratio)
    block_flops += st_attention_flops(dim, config.depth, frames, entries)
    block_flops *= entries / tokens_per_frame
    if config.action_conditioning == "adaln":
        block_flops += 6 * config.depth * 6 * dim * dim / tokens_per_frame
    head_flops = 6 * dim * config.vocab_size
    if clean_context:
        block_flops *= (2 * frames - 1) / frames
        head_flops *= (frames - 1) / frames * 2 / math.pi
    return block_flops + head_flops


def tokenizer_flops_per_token(config: TokenizerConfig, frames: int, tokens_per_frame: int) -> float:
    """Training FLOPs per token of the tokenizer: convolutions run at every pixel a token covers.

    A conv applied at `positions` output positions per token costs 2 * weights * positions
    forward; training is 3x forward (as for the matmuls of the ST blocks).
    """
    widths, down, codes = config.stage_channels(), config.downsample, len(config.levels)
    forward = 2 * 3 * widths[0] * 9 * down**2  # encoder stem, full resolution
    forward += 2 * widths[0] * 3 * 9 * down**2  # decoder head, full resolution
    for stage, (wide, narrow_res_wide) in enumerate(zip(widths, widths[1:], strict=False)):
        positions = (down // 2 ** (stage + 1)) ** 2  # positions per token at the stage's lower resolution
        forward += 2 * wide * narrow_res_wide * 16 * positions  # strided 4x4 conv down
        forward += 2 * narrow_res_wide * wide * 16 * positions  # transposed 4x4 conv up (per input position)
    forward += 2 * 2 * widths[-1] * config.dim  # 1x1 projections into and out of the transformer
    forward += 2 * 2 * config.dim * codes  # to and from the FSQ code
    blocks = 2 * st_matmul_parameters(config.dim, config.depth)  # encoder and decoder stacks
    return (
        3 * forward + 6 * blocks + 2 * st_attention_flops(config.dim, config.depth, frames, tokens_per_frame)
    )


def lam_parameters(config: LatentActionConfig) -> int:
    dim, latent, patch_pixels = config.dim, config.latent_dim, 3 * config.patch**2
    stem = _conv(config.encoder_channels, dim, 2 * config.patch)  # overlapping patches
    codes = dim * latent + (latent * dim + dim)  # to and from a latent action
    probe = (latent * config.probe_actions + config.probe_actions) if config.probe_actions else 0
    decoder_io = (patch_pixels * dim + dim) + (dim * patch_pixels + patch_pixels)
    modulation = config.depth * (6 * dim * dim + 6 * dim)
    transformers = 2 * st_transformer_parameters(dim, config.depth, config.mlp_ratio)
    return stem + codes + probe + decoder_io + modulation + transformers


def lam_flops_per_token(config: LatentActionConfig, frames: int, tokens_per_frame: int) -> float:
    """Training FLOPs per token (a patch of a frame) of the latent action model. Each of the T - 1
    transitions runs the encoder on h*w patches of the two frames stacked, and the decoder on the
    h*w patches of frame t with one modulation."""
    dim, depth, patch_pixels = config.dim, config.depth, 3 * config.patch**2
    transitions = (frames - 1) * tokens_per_frame  # tokens of the transitions, in each network
    blocks = 6 * st_matmul_parameters(dim, depth, config.mlp_ratio) + st_attention_flops(
        dim, depth, 1, tokens_per_frame
    )
    # the overlapping-patch stem: forward and weight gradient (pixels need none)
    stem = 4 * config.encoder_channels * (2 * config.patch) ** 2 * dim
    decoder_io = (4 + 6) * patch_pixels * dim  # into the decoder (pixels need no gradient) and out
    per_transition = 6 * (depth * 6 * dim * dim + 2 * config.latent_dim * dim)  # modulation, codes
    total = transitions * (2 * blocks + stem + decoder_io) + (frames - 1) * per_transition
    return total / (frames * tokens_per_frame)


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the hardware's peak."""
    return flops_per_token * tokens_per_second / peak_flops
