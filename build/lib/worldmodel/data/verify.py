"""`worldmodel verify DIR`: check a prepared folder against its `dataset.json`.

Every shard's size and sha256 against the index, and every sample's members against the
checksums in its json. Prints what is damaged (shard, sample key, member) and returns the list,
so the command exits non-zero when anything is.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from worldmodel.data.shards import SPLITS, checksum, file_digest, read_index


def verify_folder(folder: str | Path) -> tuple[list[str], int]:
    """(problems found, samples checked) for a prepared folder."""
    folder = Path(folder)
    index = read_index(folder)
    problems: list[str] = []
    checked = 0
    for split in SPLITS:
        for shard in index["splits"].get(split, {}).get("shards", []):
            path = folder / shard["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            digest = file_digest(path)
            if digest != {"bytes": shard["bytes"], "sha256": shard["sha256"]}:
                problems.append(f"{path}: sha256 or size differs from {folder / 'dataset.json'}")
            shard_problems, samples = verify_shard(path)
            problems += shard_problems
            checked += samples
    return problems, checked


def verify_shard(path: Path) -> tuple[list[str], int]:
    """(problems, samples) of one shard: each sample's members against its json's checksums."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile():
                    key, _, extension = member.name.partition(".")
                    samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError) as error:
        return [f"{path}: unreadable tar ({type(error).__name__}: {error})"], len(samples)
    problems = []
    for key, members in samples.items():
        try:
            expected = json.loads(members["json"])["checksums"]
        except (KeyError, ValueError) as error:
            problems.append(f"{path} {key}: no readable checksums in its json ({type(error).__name__})")
            continue
        for name, value in expected.items():
            if name not in members:
                problems.append(f"{path} {key}: {name} missing")
            elif checksum(members[name]) != value:
                problems.append(f"{path} {key}: {name} does not match its checksum")
    return problems, len(samples)
