"""Dashboard performance, headless, on a fleet of fakes (64 GPUs on 8 hosts, 10,000 runs on the server), printed as figures.

  first full frame   a fresh ``python`` process, imports included, until GPUs, runs and deployments are drawn
  CPU at 1 Hz        share of one core used by the whole process (all threads) at the default refresh
  key to repaint     a key press until the next frame is composed and encoded (cursor move; page flip)
  NVML polling       the shortest interval between two polls of the per-process lists

Headless Textual skips writing frames to a terminal; the probe encodes each frame to terminal
codes anyway, so that cost is counted. Goals (issue 13, at 64 GPUs and 10,000 runs): frame ≤ 1.0 s,
CPU ≤ 2 %, page flip ≤ 50 ms median; key ≤ 50 ms, NVML process lists ≥ 2 s apart (issue 5). The fakes
make each run when a page asks for it and hand runs over a page at a time, as Prefect's
``/flow_runs/filter`` (limit, offset) and ``/flow_runs/count`` do, so the dashboard never holds
all 10,000. Last line: the figures as JSON.
Usage: python bench/dash_bench.py [--seconds 20] [--runs 10000] [--hosts 8] (``--hosts 0``: the demo's 8 + 4 GPUs)

CPU time on a shared machine drifts by 2x over a day, so two builds are compared side by side:
``--against DIR`` (another checkout, e.g. a ``git worktree`` of an older commit) runs that
checkout's own bench in a second process at the same time as this one's CPU window, ``--rounds``
times, and prints the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRAME_SCRIPT = """
import asyncio, sys, time
from tui.app import make_app
from tui.providers import demo_providers

RUNS, HOSTS, GPU_ROWS = {runs}, {hosts}, {gpu_rows}

async def main():
    app = make_app(providers=demo_providers(RUNS, hosts=HOSTS))
    async with app.run_test(size=(140, 42)) as pilot:
        screen = app.screen
        while True:
            gpus = screen.query_one("#gpu-table").row_count
            runs = screen.query_one("#runs").row_count
            deps = screen.query_one("#deployments").row_count
            if gpus == GPU_ROWS and runs == 100 and deps == 3:  # every host's GPUs, a page of runs, the deployments
                break
            await asyncio.sleep(0.002)
        await pilot.pause()
        print("FRAME", flush=True)

asyncio.run(main())
"""


def gpu_rows(hosts: int) -> int:
    """The GPU table's rows: this host's 8 GPUs, then a line and 8 GPUs per other host (the demo: 8, gpu-box-2's line
    and 4 GPUs, the stale laptop's line)."""
    return 8 + 9 * (hosts - 1) if hosts else 14


def first_frame(runs: int, hosts: int) -> float:
    """Seconds from spawning python until the first full frame."""
    script = FRAME_SCRIPT.format(runs=runs, hosts=hosts, gpu_rows=gpu_rows(hosts))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("FRAME"):
            elapsed = time.perf_counter() - start
            break
    else:
        raise SystemExit(f"the frame script ended without a frame (exit {proc.wait()})")
    proc.wait()
    return elapsed


class RepaintProbe:
    """Wraps App._display: encodes every frame (as a terminal would get it) and records when."""

    def __init__(self, app) -> None:
        from textual._compositor import CompositorUpdate

        self.frames: list[float] = []
        original = app._display

        def display(screen, renderable) -> None:
            original(screen, renderable)
            if isinstance(renderable, CompositorUpdate):
                renderable.render_segments(app.console)
                self.frames.append(time.perf_counter())

        app._display = display


async def running(seconds: float, runs: int, hosts: int) -> dict:
    """CPU share, key latencies and NVML poll spacing in one live session at the default 1 Hz."""
    from tui.app import make_app
    from tui.providers import demo_providers

    providers = demo_providers(runs, animate=True, hosts=hosts)
    nvml = providers.telemetry.nvml
    polls: list[float] = []
    inner = nvml.nvmlDeviceGetComputeRunningProcesses

    def counted(handle):
        if handle == 0:
            polls.append(time.perf_counter())
        return inner(handle)

    nvml.nvmlDeviceGetComputeRunningProcesses = counted
    app = make_app(providers=providers, refresh_s=1.0)
    async with app.run_test(size=(140, 42)) as pilot:
        probe = RepaintProbe(app)
        await asyncio.sleep(3)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0) * 100
        moves = [await latency(pilot, probe, key) for key in ["down"] * 10 + ["up"] * 10]
        pages = [await latency(pilot, probe, key, rows_change=True) for key in ["right_square_bracket", "left_square_bracket"] * 5]
    gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
    return {"cpu_percent_1hz": round(cpu, 2), "key_repaint_ms_median": round(statistics.median(moves) * 1000, 1),
            "key_repaint_ms_max": round(max(moves) * 1000, 1), "page_flip_ms_median": round(statistics.median(pages) * 1000, 1),
            "nvml_process_polls": len(polls), "nvml_min_poll_interval_s": round(min(gaps), 2) if gaps else None}


async def latency(pilot, probe: RepaintProbe, key: str, rows_change: bool = False) -> float:
    """Seconds from sending key until a frame is encoded (for a page flip: the frame with the new page)."""
    await asyncio.sleep(0.05)
    table = pilot.app.screen.query_one("#runs")
    before = table.border_title
    start = time.perf_counter()
    await pilot.press(key)
    deadline = start + 5
    while time.perf_counter() < deadline:
        done = [t for t in probe.frames if t > start]
        if done and (not rows_change or table.border_title != before):
            return done[-1 if rows_change else 0] - start
        await asyncio.sleep(0.0005)
    return float("inf")


def side_by_side(other: Path, seconds: float, rounds: int, runs: int, hosts: int) -> None:
    """This checkout's CPU at 1 Hz against other's, both measured at once, rounds times; the median ratio.

    An older checkout whose bench knows no --runs/--hosts measures at its own scale (8 + 4 GPUs,
    1,000 runs): then this one does too (``--hosts 0 --runs 1000``), so the two are compared like for like.
    """
    script = other / "bench" / "dash_bench.py"
    if not script.is_file():
        raise SystemExit(f"{other} has no bench/dash_bench.py: give --against a checkout of tunedeck")
    scaled = "--hosts" in script.read_text()
    if not scaled:
        runs, hosts = 1000, 0
        print(f"{other.name}'s bench has no --hosts: both measure the demo's 12 GPUs and 1,000 runs")
    extra = ["--runs", str(runs), "--hosts", str(hosts)] if scaled else []
    ratios = []
    for i in range(rounds):
        proc = subprocess.Popen([sys.executable, str(script), "--seconds", f"{seconds:g}", "--frames", "1", *extra], cwd=other,
                                stdout=subprocess.PIPE, text=True)
        mine = asyncio.run(running(seconds, runs, hosts))["cpu_percent_1hz"]
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"the bench in {other} failed (exit {proc.returncode})")
        theirs = json.loads(out.strip().splitlines()[-1])["cpu_percent_1hz"]
        ratios.append(mine / theirs)
        print(f"round {i + 1}: this checkout {mine:.2f} %, {other.name} {theirs:.2f} % of one core (ratio {mine / theirs:.2f})")
    print(f"CPU at 1 Hz, this / {other.name}: median ratio {statistics.median(ratios):.2f} over {rounds} rounds")
    print(json.dumps({"cpu_ratio_median": round(statistics.median(ratios), 3), "cpu_ratios": [round(r, 3) for r in ratios]}))


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the CPU measurement (default 20)")
    parser.add_argument("--frames", type=int, default=3, help="first-frame repetitions (default 3)")
    parser.add_argument("--against", type=Path, help="another checkout: measure its CPU at 1 Hz at the same time and print the ratio")
    parser.add_argument("--rounds", type=int, default=5, help="side-by-side rounds with --against (default 5)")
    parser.add_argument("--runs", type=int, default=10_000, help="runs on the fake server (default 10000)")
    parser.add_argument("--hosts", type=int, default=8, help="hosts of 8 GPUs each, this one included (default 8; 0: the demo's)")
    args = parser.parse_args()
    if args.against:
        side_by_side(args.against.resolve(), args.seconds, args.rounds, args.runs, args.hosts)
        return
    frames = [first_frame(args.runs, args.hosts) for _ in range(args.frames)]
    result = {"runs": args.runs, "gpus": 8 * args.hosts if args.hosts else 12, "hosts": args.hosts or 3,
              "first_frame_s_median": round(statistics.median(frames), 3), "first_frame_s_all": [round(f, 3) for f in frames]}
    result.update(asyncio.run(running(args.seconds, args.runs, args.hosts)))
    print(f"scale                {result['gpus']} GPUs on {result['hosts']} hosts, {args.runs:,} runs on the server")
    print(f"first full frame     {result['first_frame_s_median']:.2f} s median of {args.frames} (goal <= 1.0 s)")
    print(f"CPU at 1 Hz          {result['cpu_percent_1hz']:.2f} % of one core over {args.seconds:g} s (goal <= 2 %)")
    print(f"key to repaint       {result['key_repaint_ms_median']:.1f} ms median, {result['key_repaint_ms_max']:.1f} ms max (goal <= 50 ms)")
    print(f"page flip (fetch)    {result['page_flip_ms_median']:.1f} ms median (goal <= 50 ms; a page of 100 fetched and re-drawn)")
    print(f"NVML process lists   {result['nvml_process_polls']} polls, at least {result['nvml_min_poll_interval_s']} s apart (goal >= 2 s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
