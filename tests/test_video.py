import struct
import time

import numpy as np
import pytest

from tests.conftest import moving_frames
from worldmodel.data.video import (
    LOSSLESS,
    VideoDecodeError,
    decode_mp4,
    encode_mp4,
    resize_short_side_center_crop,
)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_default_encoding_keeps_quality_and_decodes_every_frame():
    frames = moving_frames(16, 64)
    decoded = decode_mp4(encode_mp4(frames, fps=10), range(16), expected_frames=16)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert psnr(decoded, frames) >= 35


def test_lossless_encoding_is_bit_exact_and_indices_select_frames():
    frames = (np.random.default_rng(0).random((8, 32, 32, 3)) * 255).astype(np.uint8)
    data = encode_mp4(frames, fps=15, settings=LOSSLESS)
    np.testing.assert_array_equal(decode_mp4(data, [1, 3, 5], 8), frames[[1, 3, 5]])


def _over_report_frame_count(mp4: bytes, extra: int) -> bytes:
    """Claim `extra` more frames in the mp4 sample table (stts) than the stream holds."""
    data = bytearray(mp4)
    at = data.find(b"stts")
    count, delta = struct.unpack(">II", data[at + 12 : at + 20])
    data[at + 12 : at + 16] = struct.pack(">I", count + extra)
    return bytes(data)


def test_container_that_over_reports_frames_decodes_promptly_without_hanging():
    frames = moving_frames(8, 32)
    data = _over_report_frame_count(encode_mp4(frames, fps=10, settings=LOSSLESS), extra=100)
    started = time.perf_counter()
    np.testing.assert_array_equal(decode_mp4(data, range(8), expected_frames=8), frames)
    assert time.perf_counter() - started < 5
    with pytest.raises(VideoDecodeError, match="asked of a 8-frame clip"):
        decode_mp4(data, [20], expected_frames=8)


def test_metadata_that_over_reports_frames_falls_back_and_fails_cleanly():
    data = encode_mp4(moving_frames(8, 32), fps=10)
    with pytest.raises(VideoDecodeError, match="stream ends before frame 12"):
        decode_mp4(data, [0, 12], expected_frames=16)


@pytest.mark.parametrize("data", [b"", b"not a video at all" * 10])
def test_unreadable_bytes_raise_a_decode_error(data):
    with pytest.raises(VideoDecodeError):
        decode_mp4(data, [0], expected_frames=4)


def test_truncated_clip_raises_a_decode_error():
    data = encode_mp4(moving_frames(8, 32), fps=10)
    with pytest.raises(VideoDecodeError):
        decode_mp4(data[: len(data) // 2], range(8), expected_frames=8)


def test_resize_short_side_then_center_crop():
    frame = np.zeros((90, 160, 3), np.uint8)
    frame[:, 75:85] = 255  # a bright bar in the middle survives the crop
    out = resize_short_side_center_crop(frame, 45)
    assert out.shape == (45, 45, 3)
    assert out[:, 20:25].mean() > 200 and out[:, :10].mean() < 10
