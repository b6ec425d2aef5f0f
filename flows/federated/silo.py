"""The silo flow: one site's part of a federated run, on its own work pool, in that site's clone.

It reads the global weights from the exchange, trains ``local_epochs`` on images only that host
can read (the worker's silo_data setting, TUNEDECK_SILO_DATA, or the ``data`` parameter), and
writes back its weights and example count. Nothing else leaves the site: no images, features or
per-example outputs. With privacy on it trains with DP-SGD and keeps its own privacy ledger
(its epsilon over every round); with secure aggregation it writes only its masked update. Before
the first round (``phase: setup``) it checks its data and privacy plan and publishes its public key.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from flows.contracts.federated import SiloTask, round_folder
from flows.contracts.settings import Settings, variable
from flows.core.errors import TunedeckError


@flow(name="silo", log_prints=True)
def silo(task: SiloTask, data: str | None = None) -> dict:
    """One round (or the setup) on one silo: global weights in, local weights (or a masked update) and the count out."""
    from flows.federated import secure
    from flows.federated.exchange import put_state

    settings = Settings.read()  # this flow is its run's process's work
    name = silo_name()
    x, y, version = silo_images(data or (str(settings.silo_data) if settings.silo_data else None), task)
    if task.phase == "setup":
        return setup(task, name, len(y))
    state, header = local_update(task, name, x, y, version, settings.cpu_bf16)
    if state is None:
        print(header["declined"])
        secure.put_declined(task, name, header)
        return header
    folder = round_folder(task.exchange, task.run, task.round)
    if task.secure:
        secure.put_masked(task, name, state, header)
    else:
        put_state(f"{folder}/{name}.safetensors", state, header)
    spent = f", ε {header['privacy']['epsilon']:.2f}" if header.get("privacy") else ""
    print(f"silo {name}: round {task.round + 1}, {header['examples']} images, train loss {header['train_loss']:.4f}{spent}")
    return header


def setup(task: SiloTask, name: str, count: int) -> dict:
    """Check this silo can keep the run's promises before any round: enough images, a reachable privacy budget, a
    model without BatchNorm under DP; publish the public key for secure aggregation. One sentence otherwise."""
    from flows.core.params import TrainParams
    from flows.federated import secure

    train = TrainParams(**task.train)
    if count < train.batch_size:
        raise TunedeckError(f"silo {name} has {count} images, fewer than one batch ({train.batch_size}): lower "
                            "train.batch_size or leave this silo out of the federation.")
    answer = {"silo": name, "run": task.run, "examples": count}
    if task.privacy is not None:
        import timm

        from flows.core.privacy import check_train_params, plan, refuse_batchnorm

        check_train_params(train)
        refuse_batchnorm(timm.create_model(task.model_name, pretrained=False, num_classes=len(task.classes)),
                         task.model_name)
        p = plan(task.privacy, count, train.batch_size, task.epochs, task.rounds)
        answer["plan"] = {"noise_multiplier": p.noise_multiplier, "sample_rate": p.sample_rate, "delta": p.delta,
                          "steps_per_round": p.steps_per_round, "epsilon": p.planned_epsilon}
    if task.secure:
        answer["public_key"] = secure.own_public_key(task, name)
    secure.put_setup(task, name, answer)
    print(f"silo {name}: ready, {count} images" + (f", planned ε {answer['plan']['epsilon']:.2f} at δ "
                                                   f"{answer['plan']['delta']:.2g}" if "plan" in answer else ""))
    return answer


def local_update(task: SiloTask, name: str, x, y, version: str, cpu_bf16: bool | None):
    """(state, header) of this silo's round: trained now, or the one it already trained for this round (a redone
    secure round, a resumed coordinator: no second spend of privacy). (None, header with 'declined') when the
    privacy budget would be exceeded."""
    import timm

    from flows.core.devices import resolve_device
    from flows.core.fedavg import batchnorm_keys, keep_local
    from flows.core.fedavg_train import Schedule, cpu_state, local_round, silo_seed
    from flows.core.params import TrainParams
    from flows.federated.exchange import get_state, put_state

    own = local_folder(task)
    cache = own / f"{name}-round-{task.round + 1:04d}.safetensors"
    keep = task.secure or task.privacy is not None
    if keep and cache.is_file():
        return get_state(str(cache))
    global_state, _ = get_state(f"{round_folder(task.exchange, task.run, task.round)}/global.safetensors")
    model = timm.create_model(task.model_name, pretrained=False, num_classes=len(task.classes))
    bn = batchnorm_keys(model) if task.fedbn else frozenset()
    local_bn = own / f"{name}-local.safetensors"  # FedBN: stays on this host
    model.load_state_dict(keep_local(global_state, _load(local_bn) if bn else None, bn))
    train = TrainParams(**task.train)
    when = Schedule(task.first_epoch, task.epochs, task.total_epochs, seed=silo_seed(task.seed, name, task.round))
    header = {"silo": name, "run": task.run, "round": task.round, "examples": int(len(y)), "data_version": version}
    private, ledger = None, None
    if task.privacy is not None:
        private, ledger, declined = private_round(task, name, model, len(y), train, when.seed)
        if declined:
            return None, {**header, "declined": declined}
    header["train_loss"] = local_round(model, task.model_name, x, y, train, when, task.classes,
                                       resolve_device(task.device), cpu_bf16, task.proximal_mu, private)
    state = cpu_state(model)
    if bn:
        _save(local_bn, {k: state[k] for k in bn})
    if ledger is not None:
        ledger.history.append(private.plan.entry())
        ledger.save(own / f"{name}-privacy.json")
        header["privacy"] = {"epsilon": ledger.epsilon(private.plan.delta), "delta": private.plan.delta,
                             "noise_multiplier": private.plan.noise_multiplier, "sample_rate": private.plan.sample_rate,
                             "steps": sum(n for _, _, n in ledger.history)}
    if keep:
        put_state(str(cache), state, header)
    return state, header


def private_round(task: SiloTask, name: str, model, images: int, train, seed: int):
    """(Private, the silo's ledger, None), or (None, None, why) when this round would exceed the budget."""
    from flows.core.privacy import Ledger, Private, check_train_params, plan, refuse_batchnorm

    refuse_batchnorm(model, task.model_name)
    check_train_params(train)
    p = plan(task.privacy, images, train.batch_size, task.epochs, task.rounds)
    ledger = Ledger.load(local_folder(task) / f"{name}-privacy.json", task.privacy.accountant)
    budget = task.privacy.target_epsilon
    after = ledger.epsilon(p.delta, p.entry())
    if budget is not None and after > budget * 1.001:
        return None, None, (f"silo {name}: round {task.round + 1} would bring its ε to {after:.2f}, over "
                            f"privacy.target_epsilon {budget:g} (δ {p.delta:.2g}): it takes no more rounds")
    return Private(task.privacy, p, train.batch_size, seed), ledger, None


def local_folder(task: SiloTask) -> Path:
    """What this silo keeps of a run on its own host (FedBN's layers, its privacy ledger, its key, its updates)."""
    return Path(".tunedeck") / "federated" / task.run[:16]


def silo_name() -> str:
    """This silo's name: its deployment's name (silo/NAME), or 'local' when run by hand."""
    from prefect.runtime import deployment

    return deployment.name or "local"


def silo_images(source: str | None, task: SiloTask):
    """(images, labels in the federation's class order, data version) of the silo's own folder."""
    import numpy as np

    from flows.core.images import decode_folder

    if not source:
        raise TunedeckError(f"this silo has no data: start its worker with {variable('silo_data')}=FOLDER (one sub-folder "
                            "per class).")
    if not os.access(source, os.R_OK | os.X_OK):
        raise TunedeckError(f"silo data folder {source} is not readable by this worker: give its user read access.")
    decoded = decode_folder(Path(source), task.image_size)
    unknown = sorted(set(decoded.classes) - set(task.classes))
    if unknown:
        raise TunedeckError(f"silo data {source} has classes the federation does not know ({', '.join(unknown)}): "
                            f"use only {', '.join(task.classes)}.")
    order = np.array([task.classes.index(c) for c in decoded.classes])
    return decoded.images, order[decoded.labels], decoded.version


def _load(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path)) if path.is_file() else None


def _save(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    from flows.core.atomic import replace_atomically

    replace_atomically(path, lambda tmp: save_file(state, str(tmp)))
