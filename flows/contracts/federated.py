"""The typed contracts of a federated run: the coordinator's settings and what it asks of a silo.

The settings travel as the coordinator flow's one parameter (shown and overridable in Prefect),
or come from a YAML file (`tunedeck federated run --config federated.yaml`). Model, image size
and training knobs come from the coordinator clone's params.yaml, so a federated run and a
centralised run of the same params differ only in where the data is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.core.errors import TunedeckError


class PrivacyParams(BaseModel):
    """DP-SGD in every silo (federated settings' ``privacy``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_norm: float = Field(1.0, gt=0, description="each image's gradient is clipped to this L2 norm")
    noise_multiplier: float | None = Field(None, ge=0, description="noise std / clip_norm; None: chosen to spend exactly target_epsilon")
    target_epsilon: float | None = Field(None, gt=0, description="the whole run's budget per silo; a silo whose next round "
                                         "would exceed it takes no more rounds")
    delta: float | None = Field(None, gt=0, lt=1, description="None: 1 / the silo's image count")
    accountant: str = Field("rdp", pattern="^(rdp|prv)$", description="Opacus' accountant: rdp or prv")

    @model_validator(mode="after")
    def _one_of(self) -> PrivacyParams:
        if self.noise_multiplier == 0:
            raise ValueError("a noise multiplier of 0 adds no noise, so DP-SGD would promise nothing: set it above 0 "
                             "(0.5 to 2 is usual) or set target_epsilon instead")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("set privacy.noise_multiplier or privacy.target_epsilon (or both: the noise, and a budget)")
        return self


class FederatedParams(BaseModel):
    """How the coordinator runs FedAvg."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    silos: list[str] = Field(min_length=1, description="silo deployments, 'silo/NAME' or just NAME, one work pool each")
    eval_source: str = Field(min_length=1, description="the coordinator's own labelled images (one sub-folder per class)")
    exchange: str = Field(min_length=1, description="folder or fsspec URL where weights travel; silos write, coordinator reads")
    rounds: int = Field(5, ge=1, le=10_000)
    local_epochs: int = Field(1, ge=1, le=1000, description="epochs each silo trains per round")
    min_silos: int = Field(1, ge=1, description="fewer silos answering in a round fails the run")
    silo_timeout_s: float = Field(1800.0, gt=0, description="a silo not done by then is cancelled and skipped")
    fedbn: bool = Field(False, description="FedBN: each silo keeps its own BatchNorm layers")
    out: str = Field("models", description="where the final global model (model.safetensors + model.json) goes")
    unreadable: list[str] = Field(default_factory=list, description="paths the coordinator must NOT be able to read "
                                  "(the silos' data): the run refuses to start if it can")
    privacy: PrivacyParams | None = Field(None, description="DP-SGD in every silo (None: off)")
    secure_aggregation: bool = Field(False, description="the coordinator sees only the sum of the silos' updates")
    proximal_mu: float = Field(0.0, ge=0, description="FedProx's proximal weight (0: FedAvg)")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="the share of silos asked each round (seeded)")

    @model_validator(mode="after")
    def _enough_silos(self) -> FederatedParams:
        if self.min_silos > len(self.silos):
            raise ValueError(f"min_silos ({self.min_silos}) exceeds the number of silos ({len(self.silos)})")
        if self.secure_aggregation and len(self.silos) < 2:
            raise ValueError("secure aggregation needs at least 2 silos (one silo's sum is its own update)")
        return self

    def deployments(self) -> list[str]:
        """The silos as full deployment names."""
        return [s if "/" in s else f"silo/{s}" for s in self.silos]


def load_federated(path: str | Path) -> FederatedParams:
    """Read and validate a federated settings file; one sentence naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise TunedeckError(f"{path} not found: write the federated settings there (see README 'Federated fine-tuning').")
    try:
        return FederatedParams.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": (), "msg": str(exc).splitlines()[0]}
        key = ".".join(str(p) for p in first["loc"]) or "file"
        raise TunedeckError(f"{path}: {key}: {first['msg']}: fix it there.") from None


class SiloTask(BaseModel):
    """What the coordinator asks of a silo in one round (the silo flow's parameter). No data travels in it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: str = Field(description="the coordinator run's key: names the exchange folder")
    round: int = Field(ge=0)
    exchange: str
    model_name: str
    classes: list[str]
    image_size: int
    train: dict = Field(description="the coordinator's train params (flows.core.params.TrainParams)")
    seed: int
    first_epoch: int = Field(ge=0, description="the federation's global epoch this round starts at")
    epochs: int = Field(ge=1)
    total_epochs: int = Field(ge=1)
    fedbn: bool = False
    device: str = Field("auto", description="the coordinator's base.device, resolved on the silo's host (auto: its GPU with most free memory, else CPU)")
    phase: Literal["train", "setup"] = Field("train", description="setup: check the data and the privacy plan, "
                                             "publish the key; train nothing")
    rounds: int = Field(1, ge=1, description="the run's rounds (the privacy plan spans them)")
    privacy: PrivacyParams | None = None
    proximal_mu: float = 0.0
    secure: bool = False
    peers: list[str] = Field(default_factory=list, description="secure aggregation: the silos masking together this round")
    attempt: int = Field(0, ge=0, description="secure aggregation: a round redone without a dropped silo counts up")


def round_folder(exchange: str, run: str, round_: int) -> str:
    """The exchange folder of one round (the global weights in, each silo's weights out)."""
    return f"{exchange.rstrip('/')}/{run[:16]}/round-{round_ + 1:04d}"
