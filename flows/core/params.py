"""params.yaml, loaded once into frozen typed objects.

Unknown keys, wrong types and out-of-range values are rejected with one sentence that names
the key and what is allowed. Experiments change params through DVC (``dvc exp run -S``),
never through literals in code.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from flows.core.errors import TunedeckError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


class _Group(BaseModel):
    """A params group: frozen, and unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_false_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false is not a number (pydantic would read `batch_size: true` as 1)."""
        if isinstance(value, bool) and info.field_name:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not bool and bool not in get_args(annotation):
                raise ValueError("must be a number, not true/false")
        return value


class BaseParams(_Group):
    """Settings every stage shares."""

    seed: int = Field(42, ge=0, description="seed for the split, initialisation and batches")
    device: str = Field("auto", description="auto, cpu, mps, cuda or cuda:N (NVIDIA, or AMD with ROCm), xpu or xpu:N (Intel)")
    devices: int = Field(1, ge=1, le=64, description="processes for data-parallel training (torchrun DDP when > 1)")
    nodes: int = Field(1, ge=1, le=64, description="hosts one training run spans (torchrun DDP across hosts when > 1)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError("must be one of auto, cpu, mps, cuda, cuda:N, xpu, xpu:N")
        return value


class DataParams(_Group):
    """The image folder and how it is split."""

    source: str = Field(min_length=1, description="folder with one sub-folder of images per class")
    image_size: int = Field(224, ge=8, le=1024, description="square side the images are decoded to")
    store_size: int | None = Field(
        None, ge=8, le=2048, description="side the train split is stored at, >= image_size, for random-resized crops (null: image_size)"
    )
    val_fraction: float = Field(0.15, ge=0.0, le=0.5)
    test_fraction: float = Field(0.15, gt=0.0, le=0.9)
    limit_per_class: int | None = Field(None, ge=1, description="at most this many train images per class")
    groups: str | None = Field(None, min_length=1, description="CSV inside data.source: path,<attribute>... (per-group "
                               "evaluation and the gate's group check; null: none)")
    group_min_images: int = Field(5, ge=2, description="each group of the groups CSV needs at least this many images")
    train_without: list[str] = Field(default_factory=list, description="groups left out of training, as "
                                     "attribute=value (kept in val and test): what a model misses without them")

    @model_validator(mode="after")
    def _room_to_train(self) -> DataParams:
        if self.store_size is not None and self.store_size < self.image_size:
            raise ValueError(
                f"data.store_size ({self.store_size}) must be at least data.image_size ({self.image_size}): "
                "train images are stored larger and cropped down to image_size"
            )
        for item in self.train_without:
            if self.groups is None:
                raise ValueError("data.train_without names groups, but data.groups names no groups CSV: set data.groups")
            if "=" not in item or not all(part.strip() for part in item.split("=", 1)):
                raise ValueError(f"data.train_without item '{item}' is not attribute=value (e.g. site=B)")
        if self.val_fraction + self.test_fraction > 0.95:
            raise ValueError(
                f"data.val_fraction + data.test_fraction ({self.val_fraction + self.test_fraction:g}) must leave "
                "at least 5 % of the images to train on"
            )
        return self


class ModelParams(_Group):
    """The timm backbone and where its starting weights come from."""

    name: str = Field(min_length=1, description="a timm model name, e.g. resnet18")
    pretrained: bool | str = Field(True, description="true (timm's default tag), false, or a weights file")
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("pretrained")
    @classmethod
    def _weights_file(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not value.endswith((".safetensors", ".pth", ".pt", ".bin")):
            raise ValueError("must be true, false, or a path to a .safetensors/.pth/.pt/.bin file")
        return value


OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "nesterov", "lamb", "lars", "lion", "adan", "rmsprop",
              "adafactor", "nadamw", "radam", "adopt")


class TrainParams(_Group):
    """The fine-tuning run: optimisation, transfer-learning controls, augmentation, speed, checkpoints."""

    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536, description="images per micro-batch")
    accum_steps: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.05, ge=0.0, le=1.0)
    optimizer: Literal[OPTIMIZERS] = "adamw"  # type: ignore[valid-type]
    scheduler: Literal["cosine", "step", "multistep", "plateau", "poly", "tanh", "none"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    clip_grad: float | None = Field(None, gt=0.0, description="max gradient norm")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # transfer learning
    freeze_epochs: int = Field(0, ge=0, description="epochs with the backbone frozen (a linear probe)")
    unfreeze: Literal["all", "gradual"] = "all"
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="layer-wise LR decay (timm)")
    head_lr_scale: float = Field(1.0, gt=0.0, le=1000.0, description="head LR = lr x this")
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="EMA of weights (timm ModelEmaV3)")
    # augmentation
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    crop_padding: int = Field(0, ge=0, le=256, description="random crops after reflect-padding by this many pixels")
    crop_scale: tuple[float, float] | None = Field(
        None, description="random-resized crops: area fraction range, timm's default [0.08, 1.0] (null: off)"
    )
    auto_augment: str | None = Field(None, description="timm's string, e.g. rand-m9-mstd0.5 or augmix-m5")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)
    mixup: float = Field(0.0, ge=0.0, le=10.0, description="mixup alpha (0: off)")
    cutmix: float = Field(0.0, ge=0.0, le=10.0, description="cutmix alpha (0: off)")
    workers: int = Field(0, ge=0, le=64, description="DataLoader workers (for auto_augment)")
    # speed
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    # checkpoints and stopping
    early_stopping: int | None = Field(None, ge=1, description="patience in epochs (null: off)")
    keep_top: int = Field(1, ge=1, le=100, description="best checkpoints kept by val accuracy")
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between mid-epoch checkpoints (0: per epoch)")

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.freeze_epochs > self.epochs:
            raise ValueError(
                f"train.freeze_epochs ({self.freeze_epochs}) must not exceed train.epochs ({self.epochs})"
            )
        if self.warmup_epochs >= self.epochs > 1:
            raise ValueError(f"train.warmup_epochs ({self.warmup_epochs}) must be below train.epochs ({self.epochs})")
        if self.crop_scale is not None:
            low, high = self.crop_scale
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"train.crop_scale {list(self.crop_scale)} must be [low, high] with 0 < low <= high <= 1, e.g. [0.08, 1.0]")
            if self.crop_padding:
                raise ValueError("train.crop_scale and train.crop_padding are two kinds of random crop: set one of them to off")
        if self.unfreeze == "gradual" and self.freeze_epochs == 0:
            raise ValueError("train.unfreeze: gradual needs train.freeze_epochs of at least 1")
        if self.auto_augment is not None and not re.match(r"^(rand|augmix|original|originalr|v0|v0r|3a)(-|$)", self.auto_augment):
            raise ValueError(f"train.auto_augment '{self.auto_augment}' is not a timm policy: use e.g. rand-m9-mstd0.5")
        return self


class EvaluateParams(_Group):
    """The held-out test."""

    batch_size: int = Field(256, ge=1, le=65_536)
    explain_images: int = Field(12, ge=1, le=1000, description="Grad-CAM overlays saved (eval/explain/): a seeded "
                                "sample of test images, right and wrong, spread over the classes")


class PromoteParams(_Group):
    """The promotion gate: when a candidate model may replace prod (both scored on the candidate's test split)."""

    tolerance: float = Field(0.01, ge=0.0, le=1.0, description="test accuracy may be at most this much below prod's")
    max_class_drop: float = Field(0.05, ge=0.0, le=1.0, description="no class's recall may drop more than this")
    max_worst_group_drop: float = Field(0.05, ge=0.0, le=1.0, description="with data.groups: the worst group's accuracy "
                                        "may not be certainly (its 95 % interval) lower than prod's by more than this")
    max_group_gap: float | None = Field(None, ge=0.0, le=1.0, description="with data.groups: reject when the gap between "
                                        "the best and worst group's accuracy certainly exceeds this (null: no ceiling)")


class PredictParams(_Group):
    """Batch prediction on new images (tunedeck predict)."""

    batch_size: int = Field(64, ge=1, le=65_536)
    top_k: int = Field(3, ge=1, le=100, description="classes listed per image, best first")
    workers: int = Field(0, ge=0, le=256, description="decoding threads (0: one per core)")


class ExportParams(_Group):
    """The ONNX export and its parity check against the torch model."""

    opset: int = Field(18, ge=13, le=23)
    max_prob_diff: float = Field(1e-4, gt=0.0, le=1.0, description="largest |p_torch - p_onnx| allowed")
    int8: bool = Field(False, description="also an int8 model quantised after training (export/int8/model.onnx)")
    int8_max_drop: float = Field(0.01, ge=0.0, le=1.0, description="the int8 model's largest test accuracy drop allowed")


class MonitorParams(_Group):
    """Drift monitoring of new images against the prod model's reference (tunedeck monitor)."""

    mmd_p: float = Field(0.005, gt=0.0, lt=1.0, description="MMD permutation p-value below this: the features drifted")
    domain_auc: float = Field(0.8, gt=0.5, le=1.0, description="a classifier telling new from reference above this AUC: drift")
    psi: float = Field(0.25, gt=0.0, description="population stability index of the predicted classes above this: drift")
    chi2_p: float = Field(0.005, gt=0.0, lt=1.0, description="chi-square p-value of the predicted classes below this: drift")
    confidence_drop: float = Field(0.15, gt=0.0, le=1.0, description="mean confidence lower than the reference's by more: drift")
    accuracy_drop: float = Field(0.1, gt=0.0, le=1.0, description="with labels: accuracy lower than the reference's by more: drift")
    permutations: int = Field(500, ge=19, le=100_000, description="MMD permutations (the p-value's resolution is 1/(n+1))")
    consecutive: int = Field(3, ge=1, le=100, description="batches in a row with drift before a retrain is triggered")
    trigger: Literal["drift", "estimated_drop", "both"] = Field(
        "drift", description="what a batch must show to count toward a retrain: drift, an estimated accuracy drop "
                             "(no labels needed), or both")
    estimated_drop: float = Field(0.1, gt=0.0, le=1.0, description="estimated accuracy (its interval's upper end) "
                                                                  "lower than the reference's by more: harm")
    estimator: Literal["atc", "confidence"] = Field("atc", description="the label-free accuracy estimate the trigger reads")


class Params(_Group):
    """Everything in params.yaml."""

    base: BaseParams = BaseParams()
    data: DataParams
    model: ModelParams
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    predict: PredictParams = PredictParams()
    export: ExportParams = ExportParams()
    monitor: MonitorParams = MonitorParams()

    def to_dict(self) -> dict[str, Any]:
        """The resolved params, defaults filled in, as plain data."""
        return self.model_dump(mode="json")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, validate and freeze params.yaml; raise TunedeckError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise TunedeckError(f"{path} not found: run from the project root, where params.yaml lives.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TunedeckError(f"{path} is not valid YAML{where}: fix the syntax there.") from None
    return parse_params(raw, source=str(path))


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise TunedeckError with one sentence on the first problem."""
    if not isinstance(raw, dict):
        raise TunedeckError(f"{source} must be a mapping of groups (base, data, model, train, evaluate).")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise TunedeckError(describe_error(exc, source)) from None


def save_resolved(params: Params, folder: str | Path) -> Path:
    """Write the resolved params next to a stage's outputs, so every output says how it was made."""
    out = Path(folder) / "params.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return out


def describe_error(exc: ValidationError, source: str) -> str:
    """Turn pydantic's first error into one sentence that names the key and what is allowed."""
    err = exc.errors()[0]
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):
        return f"{source}: {err['msg'].removeprefix('Value error, ')}."
    if err["type"] == "extra_forbidden":
        return _unknown_key(key, source)
    if err["type"] == "missing":
        return f"{source}: key '{key}' is missing: add it (see the params reference in README.md)."
    message = err["msg"].removeprefix("Value error, ")
    message = re.sub(r"^Input should be", "must be", message)
    message = re.sub(r"^(String|List) should", "must", message)
    if not message.startswith("must"):
        message = "is invalid: " + message[0].lower() + message[1:]
    return f"{source}: {key} {message} (got {err.get('input')!r})."


def _unknown_key(key: str, source: str) -> str:
    parts = key.split(".")
    group_model: type[BaseModel] = Params
    for part in parts[:-1]:
        field = group_model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            break
        group_model = field.annotation
    allowed = sorted(group_model.model_fields)
    close = difflib.get_close_matches(parts[-1], allowed, n=1)
    hint = f" (did you mean '{'.'.join(parts[:-1] + close)}'?)" if close else ""
    where = f"'{'.'.join(parts[:-1])}'" if len(parts) > 1 else "the top level"
    return f"{source}: unknown key '{key}'{hint}; allowed in {where}: {', '.join(allowed)}."
