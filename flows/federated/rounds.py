"""The coordinator's state across rounds: the global model, its score, dvclive, checkpoints, the export.

A round's checkpoint is the global state after it, with the round count and the metrics so far
in its header, written to a temporary name and renamed: a coordinator killed at any moment
finds the last whole round, and the same settings resume there (a folder per run key, so other
settings never pick it up).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flows.contracts.federated import FederatedParams, SiloTask, round_folder
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
    setups: dict[str, dict] = field(default_factory=dict)  # each silo's setup answer (its count, privacy plan, key)
    privacy: dict[str, dict] = field(default_factory=dict)  # each silo's latest (epsilon, delta, steps...)
    exhausted: set[str] = field(default_factory=set)  # silos over their privacy budget: asked no more

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
        self.privacy, self.exhausted = header.get("privacy", {}), set(header.get("exhausted", []))
        where = (f"at round {self.next_round + 1} of {self.config.rounds}" if self.next_round < self.config.rounds
                 else f"after its last round ({self.config.rounds}): exporting")
        self.notes.append(f"resuming federated run {self.key[:16]} {where} (checkpoint {last})")

    def silo_task(self, round_: int, phase: str = "train", peers: list[str] | None = None, attempt: int = 0) -> SiloTask:
        """What the silos are asked to do in this round (or in the setup before the first)."""
        epochs, config = self.config.local_epochs, self.config
        return SiloTask(
            run=self.key, round=round_, exchange=config.exchange, model_name=self.params.model.name,
            classes=self.classes, image_size=self.params.data.image_size, train=self.params.train.model_dump(mode="json"),
            seed=self.params.base.seed, first_epoch=round_ * epochs, epochs=epochs,
            total_epochs=config.rounds * epochs, fedbn=config.fedbn, device=self.params.base.device, phase=phase,
            rounds=config.rounds, privacy=config.privacy, proximal_mu=config.proximal_mu,
            secure=config.secure_aggregation, peers=sorted(peers or []), attempt=attempt,
        )

    def names(self) -> list[str]:
        """The silos' names (their deployments are silo/NAME)."""
        return [d.split("/", 1)[1] for d in self.config.deployments()]

    def deployment_of(self, name: str) -> str:
        return dict(zip(self.names(), self.config.deployments(), strict=True))[name]

    def choose(self, round_: int) -> list[str]:
        """The silos asked this round: those with budget left, a seeded sample_fraction of them (at least min_silos)."""
        available = [n for n in self.names() if n not in self.exhausted]
        want = max(self.config.min_silos, math.ceil(self.config.sample_fraction * len(available)))
        self.enough(round_, len(available))
        if want >= len(available):
            return available
        rng = np.random.default_rng([self.params.base.seed, round_])
        return sorted(available[i] for i in rng.choice(len(available), size=want, replace=False))

    def enough(self, round_: int, answered: int, secure: bool = False) -> None:
        """One sentence when fewer silos than min_silos (2 under secure aggregation) can take part in the round."""
        need = max(self.config.min_silos, 2 if secure else 1)
        if answered < need:
            spent = f" ({len(self.exhausted)} spent their privacy budget)" if self.exhausted else ""
            raise TunedeckError(f"round {round_ + 1}: only {answered} of {len(self.config.silos)} silos could take part"
                                f"{spent}, below the {need} needed: see the warnings above, fix the silos and run again "
                                "(it resumes at this round).")

    def declined(self, round_: int, name: str, logger) -> bool:
        """Whether the silo declined the round (its privacy budget would be exceeded): asked no more."""
        from flows.federated.exchange import exists, get_json

        url = f"{round_folder(self.config.exchange, self.key, round_)}/{name}.declined"
        if not exists(url):
            return False
        logger.warning(get_json(url)["declined"])
        self.exhausted.add(name)
        return True

    def take_setup(self, name: str, answer: dict) -> None:
        if answer.get("run") != self.key:
            raise TunedeckError(f"silo {name}'s setup answer belongs to another run: is its exchange shared with one?")
        self.setups[name] = answer

    def setup_lines(self) -> list[str]:
        """What the silos' setup said, a line each."""
        lines = []
        for name, answer in self.setups.items():
            plan = answer.get("plan")
            lines.append(f"silo {name}: {answer['examples']} images" + (
                f"; DP-SGD noise {plan['noise_multiplier']:.3g}, sampling {plan['sample_rate']:.3g}, "
                f"{plan['steps_per_round']} steps a round: ε {plan['epsilon']:.2f} at δ {plan['delta']:.2g} after "
                f"{self.config.rounds} rounds" if plan else ""))
        if self.config.secure_aggregation:
            lines.append(f"secure aggregation: {len(self.setups)} public keys exchanged; the coordinator sees only sums")
        return lines

    def privacy_line(self) -> str:
        if not self.privacy:
            return ""
        return "; ε so far " + ", ".join(f"{n} {p['epsilon']:.2f}" for n, p in sorted(self.privacy.items()))

    def finish_round(self, round_: int, state: dict, counts: list[int], headers: list[dict] = ()) -> dict:
        """Take the averaged state, score it on the evaluation images, log it, checkpoint it; its metrics."""
        from flows.core.fedavg_train import global_score

        self.state = state
        self.model.load_state_dict(state)
        loss, acc = global_score(self.model, self.eval_x, self.eval_y, self.params.evaluate.batch_size)
        for header in headers:
            if header.get("privacy"):
                self.privacy[header["silo"]] = header["privacy"]
        metrics = {"round": round_ + 1, "global/acc": acc, "global/loss": loss, "silos": len(counts),
                   "examples": int(sum(counts)), "taken": sorted(h["silo"] for h in headers),
                   **{f"epsilon/{n}": p["epsilon"] for n, p in self.privacy.items()}}
        self.history.append(metrics)
        self._log_live()
        self._checkpoint(round_ + 1)
        self.next_round = round_ + 1
        label_privacy(self.privacy)
        return metrics

    def _log_live(self) -> None:
        """All rounds so far into dvclive/federated (rewritten whole: a resumed run keeps one clean curve)."""
        from dvclive import Live

        with Live(str(LIVE), resume=False, dvcyaml=None, save_dvc_exp=False, report=None) as live:
            for metrics in self.history:
                for name, value in metrics.items():
                    if name.startswith(("global/", "epsilon/")) or name in ("silos", "examples"):
                        live.log_metric(name, value)
                live.next_step()

    def _checkpoint(self, rounds_done: int) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        temp = self.folder / ".global.tmp"
        header = json.dumps({"rounds_done": rounds_done, "history": self.history, "privacy": self.privacy,
                             "exhausted": sorted(self.exhausted)})
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(temp), metadata={HEADER: header})
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, self.folder / "global.safetensors")

    def privacy_card(self) -> dict | None:
        """What the model card states of the run's privacy: the DP settings, each silo's (epsilon, delta) composed over
        the rounds it took, and whether the coordinator saw only sums."""
        config = self.config
        if config.privacy is None and not config.secure_aggregation:
            return None
        rounds = {n: sum(n in h.get("taken", []) for h in self.history) for n in self.names()}
        return {"dp_sgd": config.privacy.model_dump() if config.privacy else None,
                "silos": {n: {**self.privacy.get(n, {}), "rounds": rounds[n]} for n in self.names()},
                "secure_aggregation": config.secure_aggregation,
                "composition": "each silo's epsilon composes every DP-SGD step of every round it took (Opacus "
                               f"{config.privacy.accountant if config.privacy else 'rdp'} accountant); silos that sat a "
                               "round out spent nothing in it"}

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
            train_seconds=round(time.monotonic() - self.started, 1), privacy=self.privacy_card(),
        )
        weights = out / "model.safetensors"
        save_model(weights, {k: v.contiguous() for k, v in self.state.items()}, card.meta())
        card.model_copy(update={"sha256": sha256(weights)}).write(out)
        save_resolved(self.params, out)
        (out / "federated.json").write_text(json.dumps({"run": self.key, "history": self.history}, indent=2))
        return {"model": str(weights), "rounds": len(self.history), "global_acc": last.get("global/acc"),
                **({"privacy": self.privacy} if self.privacy else {})}


def label_privacy(privacy: dict[str, dict]) -> None:
    """Each silo's (epsilon, delta) so far on the coordinator's run labels (outside a flow run: nothing)."""
    if privacy:
        from flows.run.labels import label_run

        labels = {}
        for name, spent in privacy.items():
            labels[f"privacy.{name}.epsilon"] = round(spent["epsilon"], 3)
            labels[f"privacy.{name}.delta"] = float(f"{spent['delta']:.3g}")
        label_run(labels)


def run_key(config: FederatedParams, params: Params, eval_version: str) -> str:
    """What defines a federated run: its settings (but timeouts and the output), the params, the evaluation data."""
    spec = {"federated": config.model_dump(exclude={"silo_timeout_s", "out", "unreadable", "min_silos"}),
            "params": params.to_dict(), "eval": eval_version}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
