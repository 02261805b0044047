import copy

import torch

from worldmodel.models.tokenizer import FSQ, Tokenizer, TokenizerConfig

DEBUG = TokenizerConfig(levels=[8, 5, 5, 5], downsample=4, channels=16, dim=32, depth=1, heads=2)


def test_fsq_ids_and_codes_round_trip_over_the_whole_codebook():
    fsq = FSQ([8, 5, 5, 5])
    ids = torch.arange(fsq.codebook_size)
    codes = fsq.ids_to_codes(ids)
    assert codes.shape == (1000, 4) and codes.abs().max() <= 1
    assert torch.equal(fsq.codes_to_ids(codes), ids)
    quantized = fsq(torch.randn(64, 4) * 3)
    assert torch.equal(fsq.ids_to_codes(fsq.codes_to_ids(quantized)), quantized)


def test_fsq_in_a_bf16_network_rounds_in_fp32_to_the_codes_of_fp32_inference():
    fsq = FSQ([8, 5, 5, 5])
    z = (torch.randn(20000, 4, generator=torch.Generator().manual_seed(0)) * 2).bfloat16()
    pure = copy.deepcopy(fsq).to(torch.bfloat16)  # the whole network cast, as DeepSpeed's bf16 does
    codes = pure(z)
    assert codes.dtype == torch.bfloat16  # what the bf16 decoder takes
    # In bf16, 0.5% of these ids moved across a rounding boundary.
    assert torch.equal(pure.codes_to_ids(codes), fsq.codes_to_ids(fsq(z.float())))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fsq.codes_to_ids(fsq(z)), fsq.codes_to_ids(fsq(z.float())))


def test_fsq_passes_gradients_straight_through_to_the_encoder():
    torch.manual_seed(0)
    tokenizer = Tokenizer(DEBUG)
    video = torch.randint(0, 256, (1, 2, 16, 16, 3), dtype=torch.uint8)
    loss, _ = tokenizer.training_loss(video)
    loss.backward()
    for name, parameter in tokenizer.named_parameters():
        if name.startswith(("down.", "encoder.", "to_code.")):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_tokens_of_a_frame_do_not_depend_on_later_frames():
    torch.manual_seed(0)
    tokenizer = Tokenizer(DEBUG).eval()
    video = torch.randint(0, 256, (1, 4, 16, 16, 3), dtype=torch.uint8)
    changed = video.clone()
    changed[:, 2:] = 255 - changed[:, 2:]
    codes, changed_codes = tokenizer.encode_codes(video), tokenizer.encode_codes(changed)
    assert torch.equal(codes[:, :2], changed_codes[:, :2])
    assert not torch.equal(codes[:, 2:], changed_codes[:, 2:])
    decoded, changed_decoded = (
        tokenizer.decode(tokenizer.encode(video)),
        tokenizer.decode(tokenizer.encode(changed)),
    )
    assert torch.equal(decoded[:, :2], changed_decoded[:, :2])


def test_encode_decode_shapes():
    tokenizer = Tokenizer(DEBUG)
    video = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    ids = tokenizer.encode(video)
    assert ids.shape == (2, 3, 8, 8) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size
    out = tokenizer.decode(ids)
    assert out.shape == video.shape and out.dtype == torch.uint8


def test_overfitting_one_batch_cuts_the_loss_by_ninety_percent():
    torch.manual_seed(0)
    tokenizer = Tokenizer(DEBUG)
    video = torch.randint(0, 256, (2, 2, 16, 16, 3), dtype=torch.uint8)
    video = torch.nn.functional.avg_pool2d(video.float().flatten(0, 1).permute(0, 3, 1, 2), 3, 1, 1)
    video = video.permute(0, 2, 3, 1).reshape(2, 2, 16, 16, 3).to(torch.uint8)  # smooth, learnable images
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss, diagnostics = tokenizer.training_loss(video)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first, (first, loss.item(), diagnostics)


def test_every_gradient_has_its_parameters_layout():
    # DDP's buckets are views laid out like the parameters; a gradient laid out otherwise (a
    # convolution fed a channels-last view gives a channels-last weight gradient) is copied at
    # every step, with the warning "Grad strides do not match bucket view strides".
    from worldmodel.models.presets import preset

    model = Tokenizer(preset("tokenizer_debug"))
    video = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    model.training_loss(video)[0].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad.stride() == parameter.stride(), name
