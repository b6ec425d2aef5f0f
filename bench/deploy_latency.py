"""Deployments, measured side by side in one run on a temporary copy with tiny data (medians).

  latency   from creating a pipeline flow run (as `prefect deployment run` does) to the first
            stage's code starting (its first log line), with a warm worker; goal <= 3 s. Each round
            also prints when the worker picked the run up, its process started, Prefect's engine
            ran (pull steps) and the flow began, in seconds after the run was created
  overhead  wall time against wall time: from creating the pipeline flow run to its end (worker
            pick-up, process start and all) against a plain `dvc repro` process of the same change
            (base.seed bumped so every stage reruns); goal <= 10 %. The flow run's own server-side
            start -> end is printed beside it
  isolation what the run's own workspace costs: setting up the git worktree, checking the data
            out from the shared cache, saving the results as a DVC experiment, removing the
            worktree (the run's `isolation: ... in X s` log lines, added up); goal <= 2 s
Usage: python bench/deploy_latency.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.host import server  # noqa: E402
from tests.integration.project import api, env, free_port, make_project, run  # noqa: E402
from tests.integration.test_deployments import logs, start, wait  # noqa: E402


def bump_seed(project: Path) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["base"]["seed"] += 1
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp))
        url = server.start(free_port(), root=project)
        worker = None
        try:
            run(project, "tunedeck", "deploy", PREFECT_API_URL=url)
            worker = subprocess.Popen(["tunedeck", "worker", "--pool", "local"], cwd=project, env=env(PREFECT_API_URL=url, PREFECT_LOGGING_LEVEL="INFO"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            wait(url, start(url, "pipeline", pull=False, push=False))  # warm the worker
            latency, flow_s, wall_s, repro_s, isolation_s, phases = [], [], [], [], [], []
            for i in range(rounds):
                bump_seed(project)
                run(project, "git", "commit", "-qam", f"seed {i}")
                created = time.time()
                run_id = start(url, "pipeline", pull=False, push=False)
                done = wait(url, run_id)
                time.sleep(3)  # the run's last log batch reaches the server
                entries = api(url, "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
                entries.sort(key=lambda e: e["timestamp"])
                first_stage = next(e for e in entries if "Running stage" in e["message"] or "python -m flows.stages" in e["message"])
                latency.append(when(first_stage["timestamp"]) - created)
                marks = {label: next((when(e["timestamp"]) - created for e in entries if text in e["message"]), float("nan"))
                         for label, text in (("picked", "submitting flow run"), ("process", "submitted to infrastructure"),
                                             ("engine", "deployment pull step"), ("flow", "Beginning flow run"))}
                phases.append(marks)
                steps = {e["message"].removeprefix("isolation: ").rsplit(" in ", 1)[0][:40]: float(e["message"].rsplit(" in ", 1)[1].removesuffix(" s"))
                         for e in entries if e["message"].startswith("isolation: ")}
                isolation_s.append(sum(steps.values()))
                flow_s.append(when(done["end_time"]) - when(done["start_time"]))
                wall_s.append(when(done["end_time"]) - created)
                bump_seed(project)
                tic = time.perf_counter()
                run(project, "dvc", "repro", TUNEDECK_PREFECT="off")
                repro_s.append(time.perf_counter() - tic)
                print(f"round {i + 1}: latency {latency[-1]:.2f}s ({', '.join(f'{k} {v:.2f}' for k, v in marks.items())})"
                      f"  pipeline wall {wall_s[-1]:.2f}s (flow run {flow_s[-1]:.2f}s)  dvc repro {repro_s[-1]:.2f}s"
                      f"  isolation {isolation_s[-1]:.2f}s ({', '.join(f'{k.split()[0]} {v:.2f}' for k, v in steps.items())})",
                      flush=True)
            assert "Running stage" in logs(url, run_id)
        finally:
            if worker is not None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=30)
            server.stop(root=project)
    med = {"latency_s": statistics.median(latency), "pipeline_flow_s": statistics.median(flow_s),
           "pipeline_wall_s": statistics.median(wall_s),
           "dvc_repro_s": statistics.median(repro_s), "isolation_s": statistics.median(isolation_s)}
    overhead = med["pipeline_wall_s"] / med["dvc_repro_s"] - 1
    print(json.dumps({"rounds": rounds, **{k: round(v, 2) for k, v in med.items()}, "pipeline_overhead_pct": round(100 * overhead, 1),
                      "goals_met": {"latency_le_3s": med["latency_s"] <= 3, "overhead_le_10pct": overhead <= 0.10,
                                    "isolation_le_2s": med["isolation_s"] <= 2}}))


if __name__ == "__main__":
    main()
