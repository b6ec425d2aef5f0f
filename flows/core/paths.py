"""Where each stage reads and writes, relative to the project root (mirrored in dvc.yaml)."""

from pathlib import Path

PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared")
MODELS = Path("models")
MODEL_WEIGHTS = MODELS / "model.safetensors"
MODEL_CONFIG = MODELS / "model.json"
TRAIN_LIVE = Path("dvclive")
EVAL = Path("eval")
SPLITS = ("train", "val", "test")
WEIGHTS = Path("weights")
CHECKPOINTS = Path("checkpoints")
