"""Clips from WebDataset shards made by other tools: samples whose video member (`mp4`, `webm`,
`mkv`, `avi`, `mov`, or `data.video_member`) is a whole video of any length, size and frame rate,
with or without a json of their own (video2dataset writes `{key}.mp4`, `{key}.json` with url,
key, status, caption, duration, ... and often `{key}.txt`, the caption).

A window of `frames` frames is cut from the video at `fps` (frames nearest to evenly spaced
times; or every `stride`-th frame without a rate), starting at a random time in training (every
visit of a long video gives another window) and at its start in validation (the same windows on
every run); each frame is resized so its short side is `size` and centre-cropped. The caption
comes from the `txt` member, or from `data.caption_field` of the json.
"""

from __future__ import annotations

import io
import json

import av
import numpy as np

from worldmodel.data import NULL_ACTION
from worldmodel.data.video import resize_short_side_center_crop

VIDEO_MEMBERS = ("mp4", "webm", "mkv", "avi", "mov")


class ForeignVideoError(Exception):
    """The sample cannot give a clip: `cause` (a skip cause of the loader) and what happened."""

    def __init__(self, cause: str, detail: str):
        super().__init__(f"{cause}: {detail}")
        self.cause, self.detail = cause, detail


def video_member(sample: dict, extra: str | None = None) -> str | None:
    """The name of the sample's video member, if it has one."""
    names = (extra, *VIDEO_MEMBERS) if extra else VIDEO_MEMBERS
    return next((name for name in names if sample.get(name)), None)


def foreign_clip(sample: dict, spec, rng: np.random.Generator | None) -> dict:
    """{key, video (T, size, size, 3) uint8, actions (T,) NULL, source, text} of a foreign sample,
    `spec` a ClipSpec with `size` set. Raises ForeignVideoError."""
    member = video_member(sample, spec.video_member)
    if member is None:
        raise ForeignVideoError("video", f"no video member ({', '.join(VIDEO_MEMBERS)})")
    meta = own_json(sample)
    frames = decode_window(sample[member], lambda stored, rate: window_indices(stored, rate, spec, rng))
    video = np.stack([resize_short_side_center_crop(frame, spec.size) for frame in frames])
    return {
        "key": sample["__key__"],
        "video": video,  # (T, size, size, 3)
        "actions": np.full(spec.frames, NULL_ACTION, dtype=np.int64),
        "source": str(meta.get("url", "")),
        "text": caption(sample, meta, spec.caption_field),
    }


def window_indices(stored: int, rate: float, spec, rng: np.random.Generator | None) -> list[int]:
    """Indices of the window's frames in a video of `stored` frames at `rate` fps: at `spec.fps`
    (the frame nearest to each time) or every `spec.stride`-th frame; a random start with `rng`."""
    step = rate / spec.fps if spec.fps else float(spec.stride)  # source frames per window frame
    span = (spec.frames - 1) * step  # source frames from the first frame of the window to its last
    if round(span) >= stored:
        raise ForeignVideoError("video", f"{stored} frames at {rate:g} fps, a window needs {round(span) + 1}")
    start = float(rng.uniform(0, stored - 1 - span)) if rng is not None else 0.0
    return [min(stored - 1, round(start + k * step)) for k in range(spec.frames)]


def caption(sample: dict, meta: dict, field: str | None) -> str:
    """The sample's caption: `field` of its json when given, else its `txt` member, else ""."""
    if field:
        return str(meta.get(field) or "")
    text = sample.get("txt")
    return text.decode("utf-8", "replace").strip() if isinstance(text, bytes) else str(text or "").strip()


def own_json(sample: dict) -> dict:
    """The other tool's json, when there is a readable one; never required."""
    try:
        meta = json.loads(sample.get("json") or b"{}")
    except (ValueError, TypeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def decode_window(data: bytes, choose) -> np.ndarray:
    """The frames `choose(stored frames, fps)` picks from a video, (T, H, W, 3) uint8: decord
    (seeks, decodes only what is asked), or PyAV where decord cannot open the container."""
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        stored, rate = len(reader), float(reader.get_avg_fps())
    except (decord.DECORDError, RuntimeError):
        return _decode_with_pyav(data, choose)
    indices = choose(stored, rate)
    try:
        return reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError) as error:
        raise ForeignVideoError("video", f"decord: {str(error).splitlines()[-1][:200]}") from error


def _decode_with_pyav(data: bytes, choose) -> np.ndarray:
    """Every frame decoded, then chosen from (the frame count of such containers is not trusted)."""
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError, ValueError) as error:
        raise ForeignVideoError("video", f"PyAV: {error}") from error
    if not frames or rate <= 0:
        raise ForeignVideoError("video", f"unreadable: {len(frames)} frames, frame rate {rate:g}")
    return np.stack([frames[index] for index in choose(len(frames), rate)])
