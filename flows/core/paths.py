"""Where each stage reads and writes, relative to the project root (mirrored in dvc.yaml)."""

from pathlib import Path

PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared")
MODELS = Path("models")
MODEL_WEIGHTS = MODELS / "model.safetensors"
MODEL_CONFIG = MODELS / "model.json"
TRAIN_LIVE = Path("dvclive")
EVAL = Path("eval")
WEIGHTS = Path("weights")
THROUGHPUT = Path(".tunedeck/throughput.json")  # the last training's throughput, kept out of DVC: a stage DVC skipped
# leaves none, so a run never claims a figure measured on another host (flows.stages.train.throughput)
CHECKPOINTS = Path("checkpoints")  # a folder per run key below it; the checkpoints setting moves it (checkpoints_base)


def checkpoints_base(moved: Path | None = None) -> Path:
    """Where checkpoints go: moved (the process's checkpoints setting: a run's workspace points it at its clone's, so
    a retry in a new workspace resumes), else checkpoints/ of the project."""
    return Path(moved or CHECKPOINTS)
