"""The coordinator's state across rounds: the global model, its score, dvclive, checkpoints, the export.

A round's checkpoint is the global state after it, with the round count and the metrics so far
in its header, written to a temporary name and renamed: a coordinator killed at any moment
finds the last whole round, and the same settings resume there (a folder per run key, so other
settings never pick it up).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flows.contracts.federated import FederatedParams, SiloTask
from flows.core.errors import TunedeckError
from flows.core.params import Params

LIVE = Path("dvclive") / "federated"
HEADER = "tunedeck.federated.round"


def check_unreadable(paths: list[str]) -> str | None:
    """Refuse to run when this process can read any of ``paths`` (the silos' data); a note saying it checked."""
    if not paths:
        return None
    for path in paths:
        try:
            os.listdir(path) if os.path.isdir(path) else open(path, "rb").close()
        except OSError:
            continue
        raise TunedeckError(f"the coordinator can read silo data at {path}: run it as a user without access there "
                            "(the point of federated training is that the data stays with its silo).")
    return f"checked: this coordinator (uid {os.getuid()}) cannot read any of the {len(paths)} silo data paths"


@dataclass
class Federation:
    """The global model of one federated run and everything the coordinator keeps about it."""

    config: FederatedParams
    params: Params
    key: str
    classes: list[str]
    model: torch.nn.Module
    weights_from: str
    eval_x: np.ndarray
    eval_y: np.ndarray
    state: dict
    next_round: int = 0
    history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    checkpoints: Path | None = None  # the process's checkpoints setting (else checkpoints/)

    @classmethod
    def open(cls, config: FederatedParams, checkpoints: Path | None = None,
             params_file: Path = Path("params.yaml")) -> Federation:
        """Load params, the evaluation images and the starting model; resume from the last checkpoint if any."""
        from flows.core.fedavg_train import check_round_params, cpu_state
        from flows.core.images import decode_folder
        from flows.core.model import build_model
        from flows.core.params import load_params

        notes = [n for n in [check_unreadable(config.unreadable)] if n]
        params = load_params(params_file)
        check_round_params(params.train)  # before any round: every silo would refuse it
        evalset = decode_folder(Path(config.eval_source), params.data.image_size)
        classes = list(evalset.classes)
        torch.manual_seed(params.base.seed)
        model, weights_from = build_model(params.model, len(classes))
        key = run_key(config, params, evalset.version)
        fed = cls(config, params, key, classes, model, weights_from, evalset.images, evalset.labels, cpu_state(model),
                  notes=notes, checkpoints=checkpoints)
        fed._resume()
        return fed

    @property
    def folder(self) -> Path:
        """This run's checkpoints (the checkpoints setting or checkpoints/, then federated/<key>)."""
        from flows.core.paths import checkpoints_base

        return checkpoints_base(self.checkpoints) / "federated" / self.key[:16]

    def _resume(self) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        last = self.folder / "global.safetensors"
        if not last.is_file():
            self.notes.append(f"federated run {self.key[:16]}: {self.config.rounds} rounds over "
                              f"{len(self.config.silos)} silos, starting from {self.weights_from}")
            return
        with safe_open(str(last), framework="pt") as handle:
            header = json.loads(handle.metadata()[HEADER])
        self.state, self.next_round, self.history = load_file(str(last)), header["rounds_done"], header["history"]
        where = (f"at round {self.next_round + 1} of {self.config.rounds}" if self.next_round < self.config.rounds
                 else f"after its last round ({self.config.rounds}): exporting")
        self.notes.append(f"resuming federated run {self.key[:16]} {where} (checkpoint {last})")

    def silo_task(self, round_: int) -> SiloTask:
        """What every silo is asked to do in this round."""
        epochs = self.config.local_epochs
        return SiloTask(
            run=self.key, round=round_, exchange=self.config.exchange, model_name=self.params.model.name,
            classes=self.classes, image_size=self.params.data.image_size, train=self.params.train.model_dump(mode="json"),
            seed=self.params.base.seed, first_epoch=round_ * epochs, epochs=epochs,
            total_epochs=self.config.rounds * epochs, fedbn=self.config.fedbn, device=self.params.base.device,
        )

    def finish_round(self, round_: int, state: dict, counts: list[int]) -> dict:
        """Take the averaged state, score it on the evaluation images, log it, checkpoint it; its metrics."""
        from flows.core.fedavg_train import global_score

        self.state = state
        self.model.load_state_dict(state)
        loss, acc = global_score(self.model, self.eval_x, self.eval_y, self.params.evaluate.batch_size)
        metrics = {"round": round_ + 1, "global/acc": acc, "global/loss": loss, "silos": len(counts),
                   "examples": int(sum(counts))}
        self.history.append(metrics)
        self._log_live()
        self._checkpoint(round_ + 1)
        self.next_round = round_ + 1
        return metrics

    def _log_live(self) -> None:
        """All rounds so far into dvclive/federated (rewritten whole: a resumed run keeps one clean curve)."""
        from dvclive import Live

        with Live(str(LIVE), resume=False, dvcyaml=None, save_dvc_exp=False, report=None) as live:
            for metrics in self.history:
                for name in ("global/acc", "global/loss", "silos", "examples"):
                    live.log_metric(name, metrics[name])
                live.next_step()

    def _checkpoint(self, rounds_done: int) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        temp = self.folder / ".global.tmp"
        header = json.dumps({"rounds_done": rounds_done, "history": self.history})
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(temp), metadata={HEADER: header})
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, self.folder / "global.safetensors")

    def export(self) -> dict:
        """The global model as models/model.safetensors + model.json (ModelMeta in the file); a summary."""
        from flows.contracts import ModelCard
        from flows.core.calibration import fit_temperature
        from flows.core.model import preprocessing
        from flows.core.model_file import save_model, sha256
        from flows.core.params import save_resolved
        from flows.core.scoring import logits_of

        out = Path(self.config.out)
        out.mkdir(parents=True, exist_ok=True)
        self.model.load_state_dict(self.state)
        prep = preprocessing(self.model)
        from flows.core.augment import Normalizer

        logits = logits_of(self.model, Normalizer(prep.mean, prep.std, torch.device("cpu")), self.eval_x, 256)
        last = self.history[-1] if self.history else {}
        card = ModelCard(
            model_name=self.params.model.name, classes=self.classes, image_size=self.params.data.image_size,
            mean=list(prep.mean), std=list(prep.std), interpolation=prep.interpolation,
            data_version=f"federated:{self.key[:16]}", temperature=fit_temperature(logits, self.eval_y),
            weights_from=f"FedAvg over {len(self.config.silos)} silos, {self.config.rounds} rounds, from {self.weights_from}",
            best_epoch=self.config.rounds * self.config.local_epochs, val_accuracy=last.get("global/acc"),
            weights="raw", micro_batch=self.params.train.batch_size, accum_steps=1, sha256="",
            train_seconds=round(time.monotonic() - self.started, 1),
        )
        weights = out / "model.safetensors"
        save_model(weights, {k: v.contiguous() for k, v in self.state.items()}, card.meta())
        card.model_copy(update={"sha256": sha256(weights)}).write(out)
        save_resolved(self.params, out)
        (out / "federated.json").write_text(json.dumps({"run": self.key, "history": self.history}, indent=2))
        return {"model": str(weights), "rounds": len(self.history), "global_acc": last.get("global/acc")}


def run_key(config: FederatedParams, params: Params, eval_version: str) -> str:
    """What defines a federated run: its settings (but timeouts and the output), the params, the evaluation data."""
    spec = {"federated": config.model_dump(exclude={"silo_timeout_s", "out", "unreadable", "min_silos"}),
            "params": params.to_dict(), "eval": eval_version}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
