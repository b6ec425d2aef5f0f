"""Federated fine-tuning (FedAvg) as Prefect flows: a silo flow per site, a coordinator that averages.

- ``silo`` runs on a silo's own work pool, in that site's clone: it reads the global weights from
  the exchange, trains ``local_epochs`` on images only that host can read (the worker's
  its silo_data setting, TUNEDECK_SILO_DATA, or the ``data`` parameter), and writes back its weights and example count.
  Nothing else leaves the site: no images, features or per-example outputs.
- ``coordinator`` runs R rounds; each calls every silo deployment at once (``run_deployment``),
  skips a silo that fails or times out with a warning, averages by example count
  (flows.core.fedavg), scores and logs the global model (dvclive/federated), and checkpoints it,
  so a killed coordinator resumes at its last finished round. The final global model is an
  ordinary models/model.safetensors + model.json: evaluate, promote and export take it as is.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.contracts.federated import FederatedParams, SiloTask, round_folder
from flows.contracts.settings import Settings, variable
from flows.core.errors import TunedeckError
from flows.gateways.prefect_api import end_run


@flow(name="silo", log_prints=True)
def silo(task: SiloTask, data: str | None = None) -> dict:
    """One round on one silo: global weights in, local weights and the example count out."""
    import timm

    from flows.core.devices import resolve_device
    from flows.core.fedavg import batchnorm_keys, keep_local
    from flows.core.fedavg_train import Schedule, cpu_state, local_round, silo_seed
    from flows.core.params import TrainParams
    from flows.federated.exchange import get_state, put_state

    settings = Settings.read()  # this flow is its run's process's work
    name = silo_name()
    x, y, version = silo_images(data or (str(settings.silo_data) if settings.silo_data else None), task)
    folder = round_folder(task.exchange, task.run, task.round)
    global_state, _ = get_state(f"{folder}/global.safetensors")
    model = timm.create_model(task.model_name, pretrained=False, num_classes=len(task.classes))
    own = Path(".tunedeck") / "federated" / task.run[:16] / f"{name}-local.safetensors"  # FedBN: stays on this host
    bn = batchnorm_keys(model) if task.fedbn else frozenset()
    model.load_state_dict(keep_local(global_state, _load(own) if bn else None, bn))
    when = Schedule(task.first_epoch, task.epochs, task.total_epochs, seed=silo_seed(task.seed, name, task.round))
    loss = local_round(model, task.model_name, x, y, TrainParams(**task.train), when, task.classes,
                       resolve_device(task.device), settings.cpu_bf16)
    state = cpu_state(model)
    if bn:
        _save(own, {k: state[k] for k in bn})
    header = {"silo": name, "run": task.run, "round": task.round, "examples": int(len(y)), "train_loss": loss,
              "data_version": version}
    put_state(f"{folder}/{name}.safetensors", state, header)
    print(f"silo {name}: round {task.round + 1}, {len(y)} images, train loss {loss:.4f}")
    return header


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

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="{deployment} round {task.round}")
def call_silo(deployment: str, task: SiloTask, timeout_s: float) -> tuple[str, str | None]:
    """Run one silo's round and wait for it; (deployment, None) when it completed, else (deployment, why)."""
    from prefect.deployments import run_deployment

    name = deployment.split("/", 1)[1]
    try:
        run = run_deployment(deployment, parameters={"task": task.model_dump()}, timeout=timeout_s, poll_interval=1,
                             flow_run_name=f"{name}-{task.run[:8]}-r{task.round + 1}")
    except Exception as exc:  # no such deployment, server hiccup: this silo sits the round out
        return deployment, f"could not start ({type(exc).__name__}: {str(exc)[:200]})"
    state = run.state
    if state is not None and state.is_completed():
        return deployment, None
    if state is None or not state.is_final():
        _cancel(run.id)
        return deployment, f"no answer in {timeout_s:g} s (its run {run.name} was cancelled)"
    return deployment, f"its run {run.name} ended {state.name}: {(state.message or '')[:200]}"


def _cancel(run_id) -> None:
    from prefect.states import Cancelling

    end_run(run_id, Cancelling(message="the coordinator stopped waiting"), if_open=False)


@flow(name="federated", log_prints=True)
def coordinator(config: FederatedParams) -> dict:
    """R rounds of FedAvg over config.silos; the final global model in config.out."""
    from flows.core.fedavg import weighted_average
    from flows.federated.exchange import get_state, put_state
    from flows.federated.rounds import Federation

    logger = get_run_logger()
    fed = Federation.open(config, Settings.read().checkpoints)  # this flow is its run's process's work
    for line in fed.notes:
        logger.info(line)
    for r in range(fed.next_round, config.rounds):
        folder = round_folder(config.exchange, fed.key, r)
        put_state(f"{folder}/global.safetensors", fed.state, {"run": fed.key, "round": r})
        task_ = fed.silo_task(r)
        futures = [call_silo.submit(d, task_, config.silo_timeout_s) for d in config.deployments()]
        states, counts = [], []
        for deployment, why in (f.result() for f in futures):
            name = deployment.split("/", 1)[1]
            if why is None:
                state, header = get_state(f"{folder}/{name}.safetensors")
                if header.get("run") == fed.key and header.get("round") == r:
                    states.append(state)
                    counts.append(int(header["examples"]))
                    continue
                why = "its weights file belongs to another run or round"
            logger.warning("round %d: silo %s skipped: %s", r + 1, name, why)
        if len(states) < config.min_silos:
            raise TunedeckError(f"round {r + 1}: only {len(states)} of {len(config.silos)} silos answered, "
                                f"below min_silos {config.min_silos}: see the warnings above, fix the silos and run again "
                                "(it resumes at this round).")
        metrics = fed.finish_round(r, weighted_average(states, counts), counts)
        logger.info("round %d/%d: %d silos, %d images, global test acc %.4f, loss %.4f", r + 1, config.rounds,
                    len(states), sum(counts), metrics["global/acc"], metrics["global/loss"])
    return fed.export()


if __name__ == "__main__":
    import sys

    from flows.contracts.federated import load_federated

    coordinator(load_federated(sys.argv[1] if len(sys.argv) > 1 else "federated.yaml"))
