"""Orchestration overhead, measured side by side in one run (medians of interleaved rounds).

  A  `dvc repro -f` of the three stages with the local Prefect server up (each stage a flow run)
  B  the same `dvc repro -f` with the Prefect layer switched off (TUNEDECK_PREFECT=off)
  C  the three stage functions called in one plain Python process (no DVC, no Prefect)
  N  a no-op `dvc repro`

Goals (issue 2): (A - B) / 3 <= 1.0 s per stage; N <= 1.5 s. C shows what a process per stage
costs. Runs on a temporary copy of the repo with tiny data and timm's test_resnet.
Usage: python bench/orchestration_overhead.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.host import server  # noqa: E402
from tests.integration.project import free_port, make_project, run  # noqa: E402

IN_PROCESS = """
import time; t = time.perf_counter()
from pathlib import Path
from flows.core.params import load_params
from flows.core.prepare import prepare
from flows.core.train import train
from flows.core.evaluate import evaluate
p = load_params()
prepare(p, Path("data/prepared")); train(p, Path("data/prepared"), Path("models")); evaluate(p, Path("data/prepared"), Path("models"), Path("eval"))
"""


def timed(project: Path, *args: str, **env: str) -> float:
    tic = time.perf_counter()
    run(project, *args, **env)
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp))
        server.start(free_port(), root=project)
        try:
            run(project, "dvc", "repro")  # warm caches
            times: dict[str, list[float]] = {"prefect": [], "off": [], "one_process": [], "noop": []}
            for i in range(rounds):
                times["prefect"].append(timed(project, "dvc", "repro", "-f"))
                times["off"].append(timed(project, "dvc", "repro", "-f", TUNEDECK_PREFECT="off"))
                times["one_process"].append(timed(project, "python", "-c", IN_PROCESS))
                run(project, "dvc", "commit", "-f")
                times["noop"].append(timed(project, "dvc", "repro"))
                print(f"round {i + 1}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
        finally:
            server.stop(root=project)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "rounds": rounds,
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "prefect_overhead_per_stage_s": round((med["prefect"] - med["off"]) / 3, 2),
        "prefect_over_off_ratio": round(med["prefect"] / med["off"], 3),
        "repro_over_one_process_ratio": round(med["off"] / med["one_process"], 2),
        "noop_repro_s": round(med["noop"], 2),
        "goals_met": {
            "overhead_per_stage_le_1s": (med["prefect"] - med["off"]) / 3 <= 1.0,
            "noop_le_1_5s": med["noop"] <= 1.5,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
