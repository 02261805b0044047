import json
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import webdataset as wds

from tests.conftest import good_sample, moving_frames, npy_bytes, write_shard
from tests.test_video import _over_report_frame_count
from worldmodel.data import pipeline
from worldmodel.data.pipeline import SKIP_CAUSES, ClipLoader, ClipSpec, ClipStream, TooManyBadSamples
from worldmodel.data.shards import shard_paths
from worldmodel.data.video import LOSSLESS, encode_mp4

SPEC = ClipSpec(frames=4, stride=2)


def train_loader(urls, rank, world_size, workers, batches=5):
    stream = ClipStream(
        urls,
        SPEC,
        batch_size=2,
        train=True,
        rank=rank,
        world_size=world_size,
        seed=7,
        shuffle_buffer=8,
        batches_per_epoch=batches,
    )
    return ClipLoader(stream, num_workers=workers)


def fingerprint(batch) -> list:
    """Keys plus a checksum of the decoded pixels: equal only if the same clips at the same starts."""
    return [(key, int(video.sum())) for key, video in zip(batch["key"], batch["video"], strict=True)]


def take(loader, epochs: int, stop_after: int | None = None) -> list:
    seen = []
    for _ in range(epochs):
        for batch in loader:
            seen.append(fingerprint(batch))
            if stop_after is not None and len(seen) == stop_after:
                return seen
    return seen


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [3, 5])  # mid-epoch, and exactly at the epoch's end
def test_resume_continues_with_exactly_the_batches_an_uninterrupted_run_sees(
    sample_dir, world_size, workers, stop_after
):
    urls = shard_paths(sample_dir, "train")
    for rank in range(world_size):
        uninterrupted = take(train_loader(urls, rank, world_size, workers), epochs=2)
        assert len(uninterrupted) == 10
        first = train_loader(urls, rank, world_size, workers)
        before = take(first, epochs=1, stop_after=stop_after)
        state = json.loads(json.dumps(first.state_dict()))  # must survive serialization
        resumed = train_loader(urls, rank, world_size, workers)
        resumed.load_state_dict(state)
        after = take(resumed, epochs=2 if stop_after < 5 else 1)
        assert before + after == uninterrupted


def test_epochs_differ_and_ranks_read_different_clips(sample_dir):
    urls = shard_paths(sample_dir, "train")
    loader = train_loader(urls, 0, 2, 0)
    epoch0, epoch1 = take(loader, 1), take(loader, 1)
    other_rank = take(train_loader(urls, 1, 2, 0), 1)
    assert epoch0 != epoch1 and epoch0 != other_rank


def test_every_rank_gets_the_same_number_of_batches(sample_dir):
    urls = shard_paths(sample_dir, "train")[:1]  # fewer shards than streams
    counts = [len(take(train_loader(urls, rank, 3, 2, batches=4), 1)) for rank in range(3)]
    assert counts == [4, 4, 4]


def test_loader_workers_outlive_a_stop_signal_sent_to_every_process_of_the_job(sample_dir, monkeypatch):
    # A scheduler signals the whole job; the main process must be able to finish its step and
    # checkpoint, so the workers that feed it must not die (torch's workers arm SIGTERM themselves).
    monkeypatch.setattr(pipeline, "_WORKERS_DEAF_TO", pipeline._WORKERS_DEAF_TO)  # restored after
    pipeline.start_worker_server(deaf_to=(signal.SIGTERM,))
    batches = iter(train_loader(shard_paths(sample_dir, "train"), 0, 1, workers=2, batches=8))
    next(batches)
    workers = [
        child
        for child in psutil.Process().children(recursive=True)
        if "forkserver" in " ".join(child.parent().cmdline())  # the workers, not the server itself
    ]
    assert len(workers) == 2
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert all(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
    assert len(list(batches)) == 7


@pytest.mark.parametrize("root", ["sample_dir", "atari_dir"])
def test_two_ranks_by_two_workers_read_disjoint_samples_covering_validation(root, request):
    folder = request.getfixturevalue(root)
    urls = shard_paths(folder, "val")
    everything = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    parts = []
    for rank in range(2):
        stream = ClipStream(urls, ClipSpec(4), batch_size=3, train=False, rank=rank, world_size=2)
        keys = [key for batch in ClipLoader(stream, num_workers=2) for key in batch["key"]]
        parts.append(keys)
        again = [key for batch in ClipLoader(stream, num_workers=2) for key in batch["key"]]
        assert keys == again  # deterministic order
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(everything) and len(everything) == len(set(everything))


def bad_samples() -> dict[str, tuple[str, dict]]:
    """One sample per kind of bad input, with the cause it must be counted under."""
    clip = good_sample("x")
    truncated = clip["mp4"][: len(clip["mp4"]) // 3]
    return {
        "truncated_mp4": ("video", {**good_sample("truncated_mp4"), "mp4": truncated}),
        "zero_byte_mp4": ("video", {**good_sample("zero_byte_mp4"), "mp4": b""}),
        "garbage_mp4": ("video", {**good_sample("garbage_mp4"), "mp4": b"\x00\x01garbage" * 50}),
        "no_json": ("json", {k: v for k, v in good_sample("no_json").items() if k != "json"}),
        "bad_json": ("json", {**good_sample("bad_json"), "json": b"{frames: eight"}),
        "json_without_frames": ("json", {**good_sample("json_without_frames"), "json": {"fps": 10}}),
        "short_actions": (
            "actions",
            {**good_sample("short_actions"), "actions.npy": npy_bytes(np.zeros(5, np.int64))},
        ),
        "float_actions": ("actions", {**good_sample("float_actions"), "actions.npy": npy_bytes(np.zeros(8))}),
        "not_npy_actions": ("actions", {**good_sample("not_npy_actions"), "actions.npy": b"1,2,3"}),
    }


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    bad = bad_samples()
    good = [good_sample(f"good{i:03d}", actions=True) for i in range(40)]
    samples = good[:20] + [sample for _, sample in bad.values()] + good[20:]
    return [write_shard(folder / "mixed-000000.tar", samples)], bad, len(good)


def test_each_kind_of_bad_input_is_skipped_and_counted(mixed_shards, caplog):
    urls, bad, n_good = mixed_shards
    stream = ClipStream(urls, ClipSpec(8), batch_size=4, train=False)
    loader = ClipLoader(stream, num_workers=0, max_skip_fraction=0.5)
    keys = [key for batch in loader for key in batch["key"]]
    assert len(keys) == n_good and all(key.startswith("good") for key in keys)
    expected = dict.fromkeys(SKIP_CAUSES, 0)
    for cause, _ in bad.values():
        expected[cause] += 1
    assert loader.skip_counts() == expected
    for key in bad:  # each one logged with its key and shard
        assert any(
            key in record.getMessage() and "mixed-000000.tar" in record.getMessage()
            for record in caplog.records
        )


def test_over_the_limit_the_run_stops_with_the_causes_named(mixed_shards):
    urls, _, _ = mixed_shards
    stream = ClipStream(urls, ClipSpec(8), batch_size=4, train=False)
    loader = ClipLoader(stream, num_workers=2, max_skip_fraction=0.01)
    with pytest.raises(TooManyBadSamples) as error:
        list(loader)
    message = str(error.value)
    assert "9 of 49 samples skipped" in message
    assert "video: 3" in message and "json: 3" in message and "actions: 3" in message
    assert "max_skip_fraction" in message


def test_a_training_stream_with_bad_samples_keeps_going_under_the_limit(mixed_shards):
    urls, _, _ = mixed_shards
    stream = ClipStream(urls, ClipSpec(8), 4, train=True, shuffle_buffer=16, batches_per_epoch=20)
    loader = ClipLoader(stream, num_workers=2, max_skip_fraction=0.3)
    batches = list(loader)
    assert len(batches) == 20 and all(len(b["key"]) == 4 for b in batches)
    assert 0 < sum(loader.skip_counts().values()) < 0.3 * sum(b["stream"]["seen"] for b in batches[-2:])


def test_a_truncated_shard_is_counted_and_the_rest_is_read(tmp_path):
    good = write_shard(tmp_path / "good-000000.tar", [good_sample(f"a{i}") for i in range(6)])
    cut = tmp_path / "cut-000000.tar"
    write_shard(cut, [good_sample(f"b{i}") for i in range(6)])
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])
    stream = ClipStream([str(cut), good], ClipSpec(8), batch_size=1, train=False)
    loader = ClipLoader(stream, max_skip_fraction=0.5)
    keys = [batch["key"][0] for batch in loader]
    assert [k for k in keys if k.startswith("a")] == [f"a{i}" for i in range(6)]
    assert 1 <= len([k for k in keys if k.startswith("b")]) < 6
    counts = loader.skip_counts()
    assert counts["tar"] + counts["video"] >= 1  # the cut member: a tar error or a clip with no video


def test_a_container_that_over_reports_its_frames_does_not_hang_a_worker(tmp_path):
    sample = good_sample("liar")
    sample["mp4"] = _over_report_frame_count(encode_mp4(moving_frames(8, 32), 10, LOSSLESS), extra=1000)
    url = write_shard(tmp_path / "liar-000000.tar", [sample, good_sample("honest")])
    started = time.perf_counter()
    keys = [b["key"][0] for b in ClipLoader(ClipStream([url], ClipSpec(8), 1, train=False), num_workers=1)]
    assert keys == ["liar", "honest"] and time.perf_counter() - started < 20


def test_samples_without_actions_get_the_null_action_and_with_actions_the_stride(tmp_path):
    url = write_shard(tmp_path / "plain-000000.tar", [{k: v for k, v in good_sample("p").items()}])
    plain = next(iter(ClipStream([url], SPEC, 1, train=False)))
    assert plain["actions"].tolist() == [[-1, -1, -1, -1]]
    url = write_shard(tmp_path / "acts-000000.tar", [good_sample("q", actions=True)])
    acted = next(iter(ClipStream([url], SPEC, 1, train=False)))
    assert acted["actions"].tolist() == [[0, 2, 4, 6]]  # frames 0, 2, 4, 6 and their actions


def test_the_epoch_is_judged_after_its_last_batch_even_if_the_iterator_is_not_exhausted(mixed_shards):
    urls, _, _ = mixed_shards  # 9 of 49 samples are bad: over a 5% limit
    stream = ClipStream(urls, ClipSpec(8), 4, train=True, shuffle_buffer=16, batches_per_epoch=5)
    loader = ClipLoader(stream, num_workers=0, max_skip_fraction=0.05)
    iterator = iter(loader)
    with pytest.raises(TooManyBadSamples):
        for _ in range(len(loader)):  # what Lightning does: stop after len() batches
            next(iterator)


def test_a_missing_validation_shard_is_counted_once_whatever_the_workers(tmp_path):
    good = write_shard(tmp_path / "val-000000.tar", [good_sample(f"v{i}") for i in range(6)])
    missing = str(tmp_path / "val-000001.tar")
    for workers in (0, 2):
        stream = ClipStream([good, missing], ClipSpec(8), batch_size=2, train=False)
        loader = ClipLoader(stream, num_workers=workers, max_skip_fraction=0.5)
        assert sum(len(batch["key"]) for batch in loader) == 6
        assert loader.skip_counts()["tar"] == 1, workers


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_survive_a_resume_exactly(tmp_path, workers):
    urls = [
        write_shard(tmp_path / f"small-{n:06d}.tar", [good_sample(f"s{n}_{i}") for i in range(3)])
        for n in range(4)
    ]
    urls += [str(tmp_path / f"missing-{n:06d}.tar") for n in range(2)]  # each stream's slice has one

    def loader():
        stream = ClipStream(urls, SPEC, 2, train=True, seed=3, shuffle_buffer=4, batches_per_epoch=8)
        return ClipLoader(stream, num_workers=workers, max_skip_fraction=0.9)

    uninterrupted = loader()
    expected = take(uninterrupted, epochs=1)
    first = loader()
    before = take(first, epochs=1, stop_after=5)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert before + take(resumed, epochs=1) == expected
    assert resumed.skip_counts() == uninterrupted.skip_counts() and uninterrupted.skip_counts()["tar"] > 0


def test_repeat_epoch_replays_the_same_batches_for_overfitting(sample_dir):
    stream = ClipStream(
        shard_paths(sample_dir, "train"), SPEC, 2, train=True, shuffle_buffer=8, batches_per_epoch=2
    )
    loader = ClipLoader(stream, repeat_epoch=True)
    assert take(loader, 1) == take(loader, 1)


@pytest.mark.parametrize("workers", [0, 1])
def test_all_bad_samples_stop_the_run_and_their_warnings_are_summarised(tmp_path, caplog, workers):
    foreign = []
    for i in range(20):  # another tool's layout: its json lacks our fields
        sample = good_sample(f"f{i}")
        sample["json"] = {"url": "https://example.com/clip.mp4", "caption": "a clip"}
        foreign.append(sample)
    url = write_shard(tmp_path / "train-000000.tar", foreign)
    stream = ClipStream([url], ClipSpec(8), 2, train=True, batches_per_epoch=5)
    loader = ClipLoader(stream, num_workers=workers, max_skip_fraction=0.01)
    with caplog.at_level("WARNING", logger="worldmodel.data"), pytest.raises(TooManyBadSamples) as error:
        next(iter(loader))  # no sample ever decodes: no batch would ever come
    assert "200 of 200 samples skipped" in str(error.value) and "json: 200" in str(error.value)
    if workers == 0:  # (a worker process logs to its own stderr)
        assert len(caplog.records) <= 6  # 3 one by one, then counts at 10 and 100


def corrupt_one_clip(shard: Path, out: Path, damage: int = 2000) -> str:
    """A copy of `shard` with `damage` random bytes written into the middle of its first mp4
    member (the tar stays readable); returns that sample's key."""
    import shutil
    import tarfile

    shutil.copy(shard, out)
    with tarfile.open(out) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".mp4"))
    start = member.offset_data + member.size // 4
    with open(out, "r+b") as handle:
        handle.seek(start)
        handle.write(
            np.random.default_rng(0).integers(0, 256, min(damage, member.size // 2), np.uint8).tobytes()
        )
    return member.name.split(".")[0]


def test_a_corrupted_clip_is_skipped_and_counted_as_corrupt(sample_dir, tmp_path):
    damaged = tmp_path / "train-000000.tar"
    key = corrupt_one_clip(Path(sample_dir) / "train-000000.tar", damaged)
    stream = ClipStream([str(damaged)], ClipSpec(8), batch_size=4, train=False)
    loader = ClipLoader(stream, num_workers=0, max_skip_fraction=0.5)
    keys = [k for batch in loader for k in batch["key"]]
    assert key not in keys and len(keys) > 0
    assert loader.skip_counts()["corrupt"] == 1


def test_worldmodel_verify_names_the_damaged_shard_and_sample(sample_dir, tmp_path):
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "data"
    shutil.copytree(sample_dir, folder)
    worldmodel = Path(sys.executable).with_name("worldmodel")
    clean = subprocess.run([str(worldmodel), "verify", str(folder)], capture_output=True, text=True)
    assert clean.returncode == 0 and "0 problem(s)" in clean.stdout, clean.stdout + clean.stderr
    key = corrupt_one_clip(folder / "train-000001.tar", folder / "train-000001.tar.damaged")
    (folder / "train-000001.tar.damaged").replace(folder / "train-000001.tar")
    damaged = subprocess.run([str(worldmodel), "verify", str(folder)], capture_output=True, text=True)
    assert damaged.returncode == 1
    assert "train-000001.tar: sha256 or size differs" in damaged.stdout
    assert f"train-000001.tar {key}: mp4 does not match its checksum" in damaged.stdout


def test_shards_without_checksums_still_load_with_one_warning(tmp_path, caplog, monkeypatch):
    import worldmodel.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_warned_unchecked", False)
    url = write_shard(tmp_path / "old-000000.tar", [good_sample(f"old{i}") for i in range(6)])
    stream = ClipStream([url], ClipSpec(8), batch_size=3, train=False)
    with caplog.at_level("WARNING", logger="worldmodel.data"):
        assert sum(len(batch["key"]) for batch in ClipLoader(stream)) == 6
    assert [r.getMessage() for r in caplog.records if "no checksums" in r.getMessage()] == [
        f"{url} has no checksums (prepared by an older worldmodel): damaged clips cannot be "
        "detected; prepare the data again to get them"
    ]


def test_shard_urls_read_at_a_frame_rate_use_the_rate_each_sample_records(sample_dir):
    """The sample footage is stored at 25 fps: 12.5 fps is every 2nd frame."""
    urls = shard_paths(sample_dir, "val")
    by_rate = ClipStream(urls, ClipSpec(4, fps=12.5), 2, train=False)
    by_stride = ClipStream(urls, ClipSpec(4, stride=2), 2, train=False)
    for rated, strided in zip(by_rate, by_stride, strict=True):
        assert torch.equal(rated["video"], strided["video"])
