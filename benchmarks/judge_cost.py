"""What the judge adds to a default run's time on the built-in model: `lora-studio train --data sample_images` with
the judge (the default) and with --no-judge, each as its own process, in turns. Writes the numbers with the machine,
the command and the load average to benchmarks/results/judge_cost_cpu.json.

    .venv/bin/python benchmarks/judge_cost.py [--pairs 1] [--threads N] [--out FILE] [-- EXTRA TRAIN FLAGS]

Per run: the process's wall time (start to exit: loading, caching, training, judging, saving, the last preview) and
the load average before and after. For a judged run also what its judge.json says it spent: setting up (the
training pictures' statistics, the prompts' conditioning, looking for CLIP) and judging each step. The judge's
share: judged seconds / (the judged run's wall time - judged seconds), i.e. what it adds to the same run without it,
under the same load; `wall_ratio` compares the two processes' wall times, which the load of others moves more.
`--threads N` runs both with OMP_NUM_THREADS=N (default: torch's own choice, one thread per core).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "judge_cost_cpu.json"


def run(work: Path, name: str, extra: list[str], threads: int | None) -> dict:
    run_dir = work / name
    command = [sys.executable, "-m", "app.cli", "train", "--data", str(ROOT / "sample_images"), "--run-dir",
               str(run_dir), *extra]  # fmt: skip
    before = os.getloadavg()
    started = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = {
        "run": name,
        "flags": extra,
        "omp_num_threads": threads,
        "wall_s": round(time.perf_counter() - started, 2),
        "load_average_before": [round(v, 2) for v in before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    judged = run_dir / "judge.json"
    if judged.is_file():
        report = json.loads(judged.read_text())
        steps = {row["step"]: round(row["seconds"], 2) for row in report["checkpoints"]}
        record |= {"judge_setup_s": report["setup_seconds"], "judge_step_s": steps}
        record["judge_s"] = round(report["setup_seconds"] + sum(steps.values()), 2)
        record["judge_share"] = round(record["judge_s"] / (record["wall_s"] - record["judge_s"]), 4)
        record["recommended"] = report["recommended"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1, help="judged and unjudged runs, in turns")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("extra", nargs="*", help="more train flags for both runs (after --)")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            runs.append(run(Path(tmp), f"judged-{i}", args.extra, args.threads))
            runs.append(run(Path(tmp), f"not-judged-{i}", [*args.extra, "--no-judge"], args.threads))
            print(json.dumps(runs[-2:], indent=1), flush=True)
    judged = [r for r in runs if "judge_s" in r]
    plain = [r for r in runs if "judge_s" not in r]
    result = {
        "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "runs": runs,
        "judge_share_mean": round(sum(r["judge_share"] for r in judged) / len(judged), 4),
        "wall_ratio_mean": round(sum(r["wall_s"] for r in judged) / sum(r["wall_s"] for r in plain), 4),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("judge_share_mean", "wall_ratio_mean")}))


if __name__ == "__main__":
    main()
