"""torch.compile on this device, measured: compile time against the per-step gain, eager and compiled side by side.

Forward, backward and an AdamW step of a timm model on random batches, in the precision
train.precision: auto picks here (and fp32). Prints, per precision, the first compiled step's
time (the compile), the median step of each, and how many steps the compile takes to pay back.
Usage: python bench/precision_compile.py [--model resnet18] [--size 64] [--batch 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.core.speed import autocast, resolve_precision  # noqa: E402


def step_times(model, opt, x, y, dtype, steps: int) -> list[float]:
    """Seconds of each training step (the first one includes any compile)."""
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        with autocast(x.device, dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tic)
    return times


def measure(args, dtype, compiled: bool) -> list[float]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=4).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (args.batch,))
    if compiled:
        torch._dynamo.reset()
        model = torch.compile(model)
    return step_times(model, opt, x, y, dtype, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--run-steps", type=int, default=140, help="optimizer steps of the run to pay back within (1,140 images, batch 32, 4 epochs)")
    args = parser.parse_args()
    auto = resolve_precision("auto", torch.device("cpu"))
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "auto": auto.name}
    for dtype in dict.fromkeys([auto.dtype, None]):
        name = {torch.bfloat16: "bf16"}.get(dtype, "fp32")
        eager = measure(args, dtype, False)
        comp = measure(args, dtype, True)
        eager_s, comp_s = statistics.median(eager[2:]), statistics.median(comp[2:])
        compile_s = comp[0] + comp[1] - 2 * comp_s  # the first two steps compile (train, then recompiles settle)
        gain = eager_s - comp_s
        payback = compile_s / gain if gain > 0 else None
        out[name] = {"eager_step_ms": round(1000 * eager_s, 1), "compiled_step_ms": round(1000 * comp_s, 1),
                     "speedup": round(eager_s / comp_s, 3), "compile_s": round(compile_s, 1),
                     "payback_steps": round(payback) if payback else None,
                     "pays_back_within_run": bool(payback and payback < args.run_steps)}
        print(name, out[name], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
