"""A plain `dvc repro` against timm's own `train.py`, wall time against wall time, side by side in one run.

The same photo-like JPEGs (500x375, two class folders), the same model and recipe: resnet18 from scratch, 64 px,
batch 32, --epochs, random-resized crops (scale 0.08-1) and flips, no colour jitter, fp32 on the CPU. The same
split sizes: 80 % train, 10 % validation (timm's train.py has no test split: ours' 10 % test is left out of its
folders). Each round runs both, alternating:

  ours   `dvc repro --force` in a clone of this project (prepare, train, evaluate, export), as a user types it;
         its torch stages fork from the project's own warm server, which the first round starts (a first repro
         in a fresh shell pays the imports once: reported apart)
  timm   `python train.py --data-dir ... --model resnet18 --img-size 64 -b 32 --epochs N --scale 0.08 1 --hflip 0.5
         --color-jitter 0 --warmup-epochs 0 --device cpu` in a process of its own (its DataLoader with -j workers)

Prints each side's wall times, the median ratio timm/ours (goal >= 1.6), and both sides' last validation top-1.
timm's train.py is not part of timm's wheel: give its path (a clone of huggingface/pytorch-image-models).
Usage: python bench/repro_vs_timm.py --timm-train PATH/train.py [--images 1200] [--epochs 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prepare_speed import photos  # noqa: E402


def project(dest: Path, source: Path, epochs: int) -> Path:
    """A clone of this project's committed tree, its params set to the recipe, the photos under data/."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    shutil.copytree(source, dest / "data" / "photos")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["base"]["device"] = "cpu"
    params["data"].update(source="data/photos", image_size=64, store_size=128, val_fraction=0.1, test_fraction=0.1,
                          limit_per_class=None)
    params["model"].update(name="resnet18", pretrained=False)
    params["train"].update(epochs=epochs, batch_size=32, freeze_epochs=0, head_lr_scale=1.0, hflip=0.5,
                           crop_scale=[0.08, 1.0], precision="fp32")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def timm_folders(source: Path, dest: Path) -> Path:
    """train/ and validation/ class folders of links: 80 % and 10 % of each class (the last 10 % left out)."""
    for cls in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.jpg"))
        n = len(files)
        for split, part in (("train", files[: n * 8 // 10]), ("validation", files[n * 8 // 10: n * 9 // 10])):
            (dest / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in part:
                (dest / split / cls.name / f.name).symlink_to(f)
    return dest


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (from its repository)")
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="timm's DataLoader workers")
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "TUNEDECK_PREFECT": "off"}
    env.pop("TUNEDECK_WARM", None)
    ours, theirs, first, accuracy = [], [], None, {}
    with tempfile.TemporaryDirectory() as tmp:
        source = photos(Path(tmp) / "photos", args.images)
        proj = project(Path(tmp) / "project", source, args.epochs)
        folders = timm_folders(source, Path(tmp) / "timm")
        timm_cmd = [sys.executable, str(args.timm_train.resolve()), "--data-dir", str(folders), "--train-split", "train",
                    "--val-split", "validation", "--model", "resnet18", "--num-classes", "2", "--img-size", "64",
                    "-b", "32", "--epochs", str(args.epochs), "--scale", "0.08", "1", "--hflip", "0.5",
                    "--color-jitter", "0", "--warmup-epochs", "0", "--device", "cpu", "-j", str(args.workers),
                    "--output", str(Path(tmp) / "timm-out"), "--checkpoint-hist", "1"]
        first, _ = timed(["dvc", "repro", "--force"], proj, env)  # the first repro starts the project's warm server
        for _ in range(args.rounds):
            seconds, said = timed(timm_cmd, Path(tmp), env)
            theirs.append(seconds)
            found = re.findall(r"\*\*\* Best metric: ([\d.]+)|Acc@1:\s+([\d.]+) \(", said)
            accuracy["timm"] = float([a or b for a, b in found][-1]) / 100 if found else None
            for done in (proj / "checkpoints", proj / "dvc-remote" / "tunedeck" / "checkpoints"):
                shutil.rmtree(done, ignore_errors=True)  # else the train stage resumes the finished run (or its mirror)
            seconds, _ = timed(["dvc", "repro", "--force"], proj, env)
            ours.append(seconds)
            metrics = json.loads((proj / "dvclive" / "metrics.json").read_text())
            accuracy["ours"] = metrics.get("val", {}).get("acc")
        from flows.stages.warm import project_socket  # its server, not another project's: it would idle out anyway

        subprocess.run(["pkill", "-f", f"flows.stages.warm {project_socket(proj, env)}"], check=False)
    ratio = statistics.median(t / o for t, o in zip(theirs, ours, strict=True))
    print(f"{args.images} JPEGs 500x375, resnet18 64 px, batch 32, {args.epochs} epochs, {args.rounds} rounds "
          f"({os.cpu_count()} cores)")
    print(f"timm train.py   {statistics.median(theirs):6.1f} s   (rounds: {', '.join(f'{s:.1f}' for s in theirs)})")
    print(f"ours dvc repro  {statistics.median(ours):6.1f} s   (rounds: {', '.join(f'{s:.1f}' for s in ours)}; "
          f"the first repro, starting the warm server: {first:.1f} s)")
    print(f"ratio timm/ours {ratio:6.2f}     (median of per-round ratios; goal >= 1.6); last val top-1: {accuracy}")
    print(json.dumps({"images": args.images, "epochs": args.epochs, "rounds": args.rounds, "timm_s": theirs,
                      "ours_s": ours, "ours_first_s": first, "ratio": round(ratio, 3), "accuracy": accuracy}))


if __name__ == "__main__":
    main()
