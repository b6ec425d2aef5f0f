"""One bench, this checkout against another (an older commit's worktree), interleaved in one run: medians and ratios.

    .venv/bin/python bench/against.py --against /tmp/old --rounds 3 -- bench/deploy_latency.py --rounds 2

Runs `python BENCH ARGS` in this checkout, then in the other, --rounds times (alternating, each in a
process of its own started in its checkout, with PYTHONPATH and a `tunedeck` command of that
checkout's own entry point first on PATH, so each side and every process it starts imports its own
flows/, tui/ and cli/), one at a time: two at once would measure each other. Each bench's last line is a JSON object of figures; this
prints, per numeric figure, the median of each side and new/old. Both sides use this Python (the
project's .venv), so only the code differs. Machines drift over a day: a ratio of medians taken
in one interleaved run is what to quote, never one side's absolute figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def last_json(output: str) -> dict:
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise SystemExit(f"the bench printed no JSON line at its end:\n{output[-2000:]}")


def side_env(checkout: Path, shims: Path) -> dict[str, str]:
    """PYTHONPATH and PATH for one side: its code first, and its own `tunedeck` (the entry point its pyproject
    names; the installed console script is this checkout's)."""
    module, func = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]["scripts"]["tunedeck"].split(":")
    folder = shims / checkout.name
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "tunedeck"
    shim.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(checkout)!r})\n"
                    f"from {module} import {func}\nsys.exit({func}())\n")
    shim.chmod(0o755)
    # the installed console script (which a side's tests put first on PATH) imports this checkout's entry module:
    # where the other checkout has no module of that name, a stand-in behind it on PYTHONPATH calls its own
    installed = tomllib.loads((HERE / "pyproject.toml").read_text())["project"]["scripts"]["tunedeck"].split(":")
    entry = folder / "entry"
    target = entry.joinpath(*installed[0].split("."))
    target.parent.mkdir(parents=True, exist_ok=True)
    for parent in [target.parent, *target.parent.parents]:
        if parent == entry:
            break
        (parent / "__init__.py").touch()
    target.with_suffix(".py").write_text(f"from {module} import {func} as {installed[1]}  # noqa: F401\n")
    path = os.pathsep.join([str(checkout), str(entry)])
    return {**os.environ, "PYTHONPATH": path, "PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}


def one(checkout: Path, bench: str, args: list[str], env: dict[str, str]) -> dict:
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, bench, *args], cwd=checkout, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{bench} in {checkout} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    figures = last_json(proc.stdout)
    print(f"  {checkout}: {time.perf_counter() - tic:.0f} s, {json.dumps(figures)[:300]}", flush=True)
    return figures


def numbers(figures: dict, prefix: str = "") -> dict[str, float]:
    """The numeric figures, nested keys joined with dots (lists and strings left out)."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[prefix + key] = float(value)
        elif isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}."))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("bench", help="the bench script, relative to each checkout")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    sides: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
    old = opts.against.resolve()
    with tempfile.TemporaryDirectory() as shims:
        envs = {"new": side_env(HERE, Path(shims) / "new"), "old": side_env(old, Path(shims) / "old")}
        for r in range(opts.rounds):
            print(f"round {r + 1}/{opts.rounds}", flush=True)
            sides["new"].append(numbers(one(HERE, opts.bench, args, envs["new"])))
            sides["old"].append(numbers(one(old, opts.bench, args, envs["old"])))
    keys = [k for k in sides["new"][0] if all(k in run for side in sides.values() for run in side)]
    result = {}
    print(f"\n{opts.bench} {' '.join(args)}: medians of {opts.rounds} rounds each, new = {HERE}, old = {opts.against}")
    print(f"{'figure':<40} {'new':>12} {'old':>12} {'new/old':>8}")
    for key in keys:
        new = statistics.median(run[key] for run in sides["new"])
        old = statistics.median(run[key] for run in sides["old"])
        ratio = new / old if old else float("nan")
        result[key] = {"new": new, "old": old, "ratio": round(ratio, 3)}
        print(f"{key:<40} {new:>12.4g} {old:>12.4g} {ratio:>8.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
