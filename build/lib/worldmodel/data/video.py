"""Everything that touches codecs: read source videos, resize frames, encode and decode clips.

Clips are stored as h264 mp4 inside shards. Decoding prefers decord (fast random access from
bytes in memory) and falls back to PyAV, which decodes any codec FFmpeg knows and stops at the
real end of a stream, so a container that over-reports its frame count cannot hang a worker.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


class VideoDecodeError(Exception):
    """A clip's bytes could not be decoded into the frames asked for."""


@dataclass(frozen=True)
class EncodeSettings:
    """How clips are compressed. The defaults keep natural video at >= 35 dB PSNR at 64x64.

    yuv420p would halve chroma resolution, which at 64x64 costs more than the compression
    itself; yuv444p (High 4:4:4) keeps it. `LOSSLESS` (libx264rgb, crf 0) is bit-exact and is
    what game play uses, so that replays can be checked frame for frame.
    """

    codec: str = "libx264"
    pix_fmt: str = "yuv444p"
    crf: int = 18


LOSSLESS = EncodeSettings(codec="libx264rgb", pix_fmt="rgb24", crf=0)


def _as_rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def encode_mp4(frames: np.ndarray, fps: float, settings: EncodeSettings = EncodeSettings()) -> bytes:
    """Encode uint8 frames (T, H, W, 3) into mp4 bytes; one keyframe per clip (GOP = T)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(settings.codec, rate=_as_rate(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = settings.pix_fmt
        stream.options = {"crf": str(settings.crf), "g": str(len(frames))}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-resample an RGB frame (H, W, 3) to (height, width, 3)."""
    video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    resized = video_frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
    return resized.to_ndarray()


def resize_short_side_center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """Resize so the short side is `size`, then cut the centered size x size square."""
    height, width = frame.shape[:2]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = resize_frame(frame, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


@dataclass(frozen=True)
class SourceInfo:
    fps: float
    width: int
    height: int


def probe(path: str) -> SourceInfo:
    """Frame rate and size of a video file's first video stream."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise VideoDecodeError(f"{path}: the video stream has no frame rate")
        return SourceInfo(fps=float(rate), width=stream.width, height=stream.height)


def iter_frames(path: str, fps: float | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (time in seconds, RGB frame) from a video file, resampled to `fps` when given.

    Resampling keeps the source frame nearest to each target time k / fps (a frame is
    repeated when the target rate is above the source's).
    """
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source_fps = float(stream.average_rate or stream.guessed_rate or 0) or None
        half_frame = 0.5 / source_fps if source_fps else 0.0
        next_index = 0
        first_time = None  # streams need not start at t = 0; target times count from the first frame
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            first_time = frame.time if first_time is None else first_time
            if fps is None:
                yield frame.time, frame.to_ndarray(format="rgb24")
                continue
            rgb = None
            while frame.time - first_time + half_frame >= next_index / fps:
                rgb = frame.to_ndarray(format="rgb24") if rgb is None else rgb
                yield next_index / fps, rgb
                next_index += 1


def decode_mp4(data: bytes, indices: Sequence[int], expected_frames: int) -> np.ndarray:
    """Decode the frames at `indices` from clip bytes into uint8 (len(indices), H, W, 3).

    `expected_frames` is the frame count recorded when the clip was written. decord is used
    when the container agrees with it; otherwise (decord cannot open the codec, or the
    container over-reports its frames, which hangs decord) PyAV decodes sequentially and
    stops at the last index or at the real end of the stream, whichever comes first.
    """
    if not data:
        raise VideoDecodeError("empty video bytes")
    if max(indices) >= expected_frames:
        raise VideoDecodeError(f"frame {max(indices)} asked of a {expected_frames}-frame clip")
    try:
        frames = _decode_with_decord(data, indices, expected_frames)
    except _DecordUnsuitable:
        frames = None
    if frames is None:
        frames = _decode_with_pyav(data, indices)
    return frames


class _DecordUnsuitable(Exception):
    pass


def _decode_with_decord(data: bytes, indices: Sequence[int], expected_frames: int) -> np.ndarray:
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    except (decord.DECORDError, RuntimeError) as error:  # decord raises both on bad input
        raise _DecordUnsuitable(str(error)) from error
    if len(reader) != expected_frames:
        raise _DecordUnsuitable(f"container reports {len(reader)} frames, expected {expected_frames}")
    try:
        return reader.get_batch(list(indices)).asnumpy()
    except (decord.DECORDError, RuntimeError) as error:
        raise VideoDecodeError(f"decord: {str(error).splitlines()[-1][:200]}") from error


def _decode_with_pyav(data: bytes, indices: Sequence[int]) -> np.ndarray:
    wanted = sorted(set(indices))
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(data)) as container:
            for position, frame in enumerate(container.decode(video=0)):
                if position in wanted:
                    found[position] = frame.to_ndarray(format="rgb24")
                if position >= wanted[-1]:
                    break
    except (av.error.FFmpegError, IndexError, ValueError) as error:
        raise VideoDecodeError(f"PyAV: {error}") from error
    missing = [i for i in wanted if i not in found]
    if missing:
        raise VideoDecodeError(f"stream ends before frame {missing[0]} ({len(found)} decoded)")
    return np.stack([found[i] for i in indices])
