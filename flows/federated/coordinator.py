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

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.contracts.federated import FederatedParams, SiloTask, round_folder
from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.federated.silo import silo  # noqa: F401  (deployed as flows/federated/silo.py:silo)
from flows.gateways.prefect_api import end_run


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="{deployment} round {task.round}")
def call_silo(deployment: str, task: SiloTask, timeout_s: float) -> tuple[str, str | None]:
    """Run one silo's round and wait for it; (deployment, None) when it completed, else (deployment, why)."""
    from prefect.deployments import run_deployment

    name = deployment.split("/", 1)[1]
    try:
        what = "setup" if task.phase == "setup" else f"r{task.round + 1}" + (f"-a{task.attempt + 1}" if task.attempt else "")
        run = run_deployment(deployment, parameters={"task": task.model_dump()}, timeout=timeout_s, poll_interval=1,
                             flow_run_name=f"{name}-{task.run[:8]}-{what}")
    except Exception as exc:  # no such deployment, server hiccup: this silo sits the round out
        return deployment, f"could not start ({type(exc).__name__}: {str(exc)[:200]})"
    state = run.state
    if state is not None and state.is_completed():
        return deployment, None
    if state is None or not state.is_final():
        _cancel(run.id)
        return deployment, f"no answer in {timeout_s:g} s (its run {run.name} was cancelled)"
    return deployment, f"its run {run.name} ended {state.name}: {(state.message or '')[:400]}"


def _cancel(run_id) -> None:
    from prefect.states import Cancelling

    end_run(run_id, Cancelling(message="the coordinator stopped waiting"), if_open=False)


def call_silos(fed, names: list[str], task_: SiloTask, logger) -> dict[str, str | None]:
    """Run the silos' flow runs for task_ at once and wait; name -> None when completed, else why (logged)."""
    futures = [call_silo.submit(fed.deployment_of(n), task_, fed.config.silo_timeout_s) for n in names]
    whys = {}
    for deployment, why in (f.result() for f in futures):
        name = deployment.split("/", 1)[1]
        whys[name] = why
        if why is not None:
            logger.warning("round %d: silo %s skipped: %s", task_.round + 1, name, why)
    return whys


def setup_silos(fed, logger) -> None:
    """Before any round: every silo checks its data and privacy plan and publishes its key; one sentence and no
    round at all when one cannot."""
    from flows.federated.secure import read_setup

    names = fed.names()
    whys = call_silos(fed, names, fed.silo_task(0, phase="setup"), logger)
    failed = {n: why for n, why in whys.items() if why is not None}
    if failed:
        name, why = next(iter(failed.items()))
        raise TunedeckError(f"silo {name} cannot take part, so no round started: {why.rsplit('TunedeckError: ', 1)[-1]}")
    for name in names:
        fed.take_setup(name, read_setup(fed.config.exchange, fed.key, name))
    for line in fed.setup_lines():
        logger.info(line)


def plain_round(fed, r: int, chosen: list[str], logger):
    """(weighted mean, counts, headers) of the silos' weights in the exchange."""
    from flows.core.fedavg import weighted_average
    from flows.federated.exchange import get_state

    task_ = fed.silo_task(r)
    folder = round_folder(fed.config.exchange, fed.key, r)
    states, counts, headers = [], [], []
    for name, why in call_silos(fed, chosen, task_, logger).items():
        if why is None and not fed.declined(r, name, logger):
            state, header = get_state(f"{folder}/{name}.safetensors")
            if header.get("run") == fed.key and header.get("round") == r:
                states.append(state)
                counts.append(int(header["examples"]))
                headers.append(header)
            else:
                logger.warning("round %d: silo %s skipped: its weights file belongs to another run or round", r + 1, name)
    fed.enough(r, len(states))
    return weighted_average(states, counts), counts, headers


def secure_round(fed, r: int, chosen: list[str], logger):
    """(weighted mean, counts, headers) by secure aggregation: masked again without any silo that did not deliver."""
    from flows.federated.secure import gather_secure

    peers = sorted(chosen)
    for attempt in range(len(chosen)):
        fed.enough(r, len(peers), secure=True)
        task_ = fed.silo_task(r, peers=peers, attempt=attempt)
        whys = call_silos(fed, peers, task_, logger)
        delivered = [n for n, why in whys.items() if why is None and not fed.declined(r, n, logger)]
        mean, counts_or_good, headers = gather_secure(task_, delivered, fed.state)
        if mean is not None:
            return mean, counts_or_good, headers
        missing = sorted(set(peers) - set(counts_or_good))
        logger.warning("round %d: silo(s) %s did not deliver after the others masked with them: their masks would not "
                       "cancel, so the round is masked again without them (attempt %d)", r + 1, ", ".join(missing), attempt + 2)
        peers = list(counts_or_good)  # the silos that delivered
    raise TunedeckError(f"round {r + 1}: secure aggregation found no silo set that delivered whole: see the warnings above.")


@flow(name="federated", log_prints=True)
def coordinator(config: FederatedParams) -> dict:
    """R rounds of FedAvg (or FedProx) over config.silos, with DP and secure aggregation when set; the final global
    model in config.out."""
    from flows.federated.exchange import put_state
    from flows.federated.rounds import Federation

    logger = get_run_logger()
    fed = Federation.open(config, Settings.read().checkpoints)  # this flow is its run's process's work
    for line in fed.notes:
        logger.info(line)
    if config.privacy is not None or config.secure_aggregation:
        setup_silos(fed, logger)
    for r in range(fed.next_round, config.rounds):
        chosen = fed.choose(r)
        put_state(f"{round_folder(config.exchange, fed.key, r)}/global.safetensors", fed.state, {"run": fed.key, "round": r})
        gather = secure_round if config.secure_aggregation else plain_round
        averaged, counts, headers = gather(fed, r, chosen, logger)
        metrics = fed.finish_round(r, averaged, counts, headers)
        logger.info("round %d/%d: %d silos (%s), %d images, global test acc %.4f, loss %.4f%s", r + 1, config.rounds,
                    len(counts), ", ".join(sorted(h["silo"] for h in headers)), sum(counts), metrics["global/acc"],
                    metrics["global/loss"], fed.privacy_line())
    summary = fed.export()
    if fed.privacy:
        from flows.run.labels import flush_labels

        flush_labels()
    return summary


if __name__ == "__main__":
    import sys

    from flows.contracts.federated import load_federated

    coordinator(load_federated(sys.argv[1] if len(sys.argv) > 1 else "federated.yaml"))
