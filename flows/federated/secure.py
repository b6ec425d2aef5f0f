"""Secure aggregation and the setup answers, as files in the exchange (flows.core.secagg does the arithmetic).

Silo side: its X25519 key pair stays in its clone (.tunedeck/federated/<run>/NAME-x25519.key,
readable by its user only); the public half goes to the exchange with its setup answer
(<run>/setup/NAME.json). In a secure round it writes only NAME.masked: its example-weighted update
in fixed point plus the pair masks it shares with the round's other silos.

Coordinator side (``gather_secure``): after every silo's run of the round it checks that each of
the round's silos delivered a masked update for this attempt and this silo set. Only then does it
add them up, and the masks cancel. A silo that masked but did not deliver (killed, failed, over its
privacy budget) leaves its masks in the sum: the round is masked again without it (the others
reuse the update they trained, kept in their own clone), never unmasked partially.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flows.contracts.federated import SiloTask, round_folder
from flows.core.errors import TunedeckError


def setup_url(exchange: str, run: str, name: str) -> str:
    return f"{exchange.rstrip('/')}/{run[:16]}/setup/{name}.json"


def key_file(task: SiloTask, name: str) -> Path:
    return Path(".tunedeck") / "federated" / task.run[:16] / f"{name}-x25519.key"


def own_public_key(task: SiloTask, name: str) -> str:
    """This silo's public key (hex) for the run, its private key made once and kept on this host, mode 0600."""
    from flows.core.atomic import replace_atomically
    from flows.core.secagg import keypair

    path = key_file(task, name)
    if not path.is_file():
        private, public = keypair()
        replace_atomically(path, lambda tmp: tmp.write_bytes(private + public), mode=0o600)
    return path.read_bytes()[32:].hex()


def put_setup(task: SiloTask, name: str, answer: dict) -> None:
    from flows.federated.exchange import put_json

    put_json(setup_url(task.exchange, task.run, name), answer)


def read_setup(exchange: str, run: str, name: str) -> dict:
    from flows.federated.exchange import get_json

    return get_json(setup_url(exchange, run, name))


def put_masked(task: SiloTask, name: str, state: dict[str, torch.Tensor], header: dict) -> None:
    """The silo's masked update for the round's silo set and attempt; never the update itself."""
    from flows.core.secagg import context, encode, mask
    from flows.federated.exchange import put_blob

    if name not in task.peers or len(task.peers) < 2:
        raise TunedeckError(f"secure round {task.round + 1} names silos {task.peers}, which must include {name} and one "
                            "more: a lone update would be sent in the clear.")
    publics = {peer: bytes.fromhex(read_setup(task.exchange, task.run, peer)["public_key"]) for peer in task.peers}
    private = key_file(task, name).read_bytes()[:32]
    masked = mask(encode(state, header["examples"]), name, private, publics,
                  context(task.run, task.round, task.attempt, task.peers))
    put_blob(f"{round_folder(task.exchange, task.run, task.round)}/{name}.masked", masked,
             {**header, "attempt": task.attempt, "peers": sorted(task.peers)})


def put_declined(task: SiloTask, name: str, header: dict) -> None:
    """A silo over its privacy budget says so in the exchange (the coordinator stops asking it)."""
    from flows.federated.exchange import put_json

    put_json(f"{round_folder(task.exchange, task.run, task.round)}/{name}.declined", header)


def gather_secure(task: SiloTask, delivered: list[str], template: dict[str, torch.Tensor]):
    """(the weighted mean, counts, headers) when every silo of task.peers delivered for this attempt; else
    (None, the silos that did, their headers): the caller masks the round again without the others."""
    from flows.core.secagg import unmask_mean
    from flows.federated.exchange import exists, get_blob

    folder = round_folder(task.exchange, task.run, task.round)
    vectors, counts, headers, good = [], [], [], []
    for name in task.peers:
        url = f"{folder}/{name}.masked"
        if name not in delivered or not exists(url):
            continue
        vector, header = get_blob(url)
        if header.get("run") == task.run and header.get("attempt") == task.attempt and header.get("peers") == sorted(task.peers):
            vectors.append(vector)
            counts.append(int(header["examples"]))
            headers.append(header)
            good.append(name)
    if good != list(task.peers):
        return None, good, headers
    return unmask_mean(vectors, sum(counts), template), counts, headers
