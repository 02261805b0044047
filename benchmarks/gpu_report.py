"""The results of `benchmarks/gpu_check.sh` as one JSON file and one Markdown table.

    python benchmarks/gpu_report.py WORK_DIR OUT_DIR

WORK_DIR holds the check's training runs (`strategy_<name>` and `strategy_<name>_compiled`,
each with its CSV log) and OUT_DIR its `gpu_check.md`; this writes OUT_DIR/gpu-<date>-<gpu>.json
and appends a table to gpu_check.md: per run, the median step throughput after warm-up (tokens/s,
clips/s), MFU, peak memory and its loss at the last step all runs logged, beside DDP's.
"""

from __future__ import annotations

import csv
import datetime
import json
import re
import statistics
import sys
from pathlib import Path

METRICS = ("perf/tokens_per_s", "perf/clips_per_s", "perf/mfu", "perf/peak_memory_gb")
WARMUP_ROWS = 2  # the first logged steps include compilation and allocator growth


def read_run(run_dir: Path) -> dict:
    rows = []
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as log:
            rows += list(csv.DictReader(log))
    summary = {}
    for metric in METRICS:
        values = [float(row[metric]) for row in rows if row.get(metric)]
        if metric == "perf/peak_memory_gb":
            summary[metric] = max(values) if values else None
        else:
            summary[metric] = statistics.median(values[WARMUP_ROWS:] or values) if values else None
    summary["losses"] = {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}
    return summary


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    runs = {path.name.removeprefix("strategy_"): read_run(path) for path in sorted(work.glob("strategy_*"))}
    runs = {name: run for name, run in runs.items() if run["losses"]}
    common = set.intersection(*(set(run["losses"]) for run in runs.values())) if runs else set()
    last = max(common) if common else None
    reference = runs.get("ddp", {}).get("losses", {}).get(last)
    gpu = device_name()
    result = {"device": gpu, "date": datetime.date.today().isoformat(), "compared_at_step": last, "runs": {}}
    lines = [
        "",
        f"## Strategies ({gpu}; loss at step {last}, beside DDP's)",
        "",
        "| run | tokens/s | clips/s | MFU | peak memory (GB) | loss | vs DDP |",
        "|---|---|---|---|---|---|---|",
    ]

    def shown(value, pattern):
        return "n/a" if value is None else pattern.format(value)

    for name, run in runs.items():
        loss = run["losses"].get(last)
        difference = None if loss is None or reference is None else abs(loss - reference) / reference
        metrics = {metric.split("/")[1]: run[metric] for metric in METRICS}
        result["runs"][name] = {**metrics, "loss": loss, "vs_ddp": difference, "losses": run["losses"]}
        cells = [
            shown(run["perf/tokens_per_s"], "{:.0f}"),
            shown(run["perf/clips_per_s"], "{:.1f}"),
            shown(run["perf/mfu"], "{:.1%}"),
            shown(run["perf/peak_memory_gb"], "{:.2f}"),
            shown(loss, "{:.4f}"),
            shown(difference, "{:.1e}"),
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = out / f"gpu-{result['date']}-{slug}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "gpu_check.md", "a") as report:
        report.write("\n".join(lines) + f"\n\n(JSON: {path.name})\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
