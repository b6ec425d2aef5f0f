"""Federated learning's privacy: DP-SGD in the silo and its accountant, secure aggregation, FedProx and client
sampling, through the silo flow's own code (flows.federated.silo) and the coordinator's functions: no server."""

from __future__ import annotations

import types

import numpy as np
import pytest
import timm
import torch

from flows.contracts.federated import FederatedParams, PrivacyParams, SiloTask, load_federated, round_folder
from flows.core.errors import TunedeckError
from flows.core.fedavg import weighted_average
from flows.core.fedavg_train import Schedule, local_round
from flows.core.params import TrainParams
from flows.core.privacy import Ledger, Private, check_train_params, plan, refuse_batchnorm
from flows.core.secagg import context, encode, keypair, mask, unmask_mean
from flows.federated import silo as silo_module
from flows.federated.exchange import exists, get_blob, get_state, put_state
from flows.federated.rounds import Federation
from flows.federated.secure import gather_secure
from tests.conftest import write_images

SIZE = 16
MODEL = "test_efficientnet_gn"  # no BatchNorm: DP-SGD's per-image bound holds
CLASSES = ["cat", "dog", "fox"]
TRAIN = TrainParams(optimizer="sgd", lr=0.05, weight_decay=0.0, scheduler="none", batch_size=4, hflip=0.0,
                    crop_padding=0, label_smoothing=0.0, freeze_epochs=0, epochs=1, precision="fp32")


def random_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8), rng.integers(0, 3, n)


# ---- DP-SGD and its accountant ----------------------------------------------------------------------------------

def test_our_epsilon_equals_opacus_own_privacy_engine_for_the_same_steps_rate_and_noise(monkeypatch):
    """Opacus' PrivacyEngine trains a model on a Poisson DataLoader for 3 epochs; its own accountant's epsilon equals
    our Ledger's for the same (noise, sample rate, steps), and so does our DP round's, whose steps we count."""
    from opacus import PrivacyEngine

    x, y = random_images(40, 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE * 3, 3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x).float(), torch.from_numpy(y)),
                                         batch_size=8)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                   data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0)
    steps = 0
    for _ in range(3):
        for bx, by in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(bx), by).backward()
            optimizer.step()
            steps += 1
    theirs = engine.get_epsilon(delta=1 / 40)
    ours = Ledger("rdp", [(1.1, 8 / 40, steps)]).epsilon(1 / 40)
    assert steps == 15 and ours == pytest.approx(theirs, rel=1e-9), (ours, theirs)

    # our own DP round: its plan's steps are the optimizer steps it takes, and its ledger gives Opacus' figure
    p = plan(PrivacyParams(noise_multiplier=1.1), 40, 8, epochs_per_round=3, rounds=1)
    from flows.core.trainer import Trainer

    counted = []
    step = Trainer._private_step
    monkeypatch.setattr(Trainer, "_private_step", lambda self, bx, by: counted.append(len(by)) or step(self, bx, by))
    model = timm.create_model(MODEL, pretrained=False, num_classes=3)
    local_round(model, MODEL, x, y, TRAIN, Schedule(0, 3, 3, 1), CLASSES,
                private=Private(PrivacyParams(noise_multiplier=1.1), p, 8, seed=3))
    assert len(counted) == p.steps_per_round == 15
    assert Ledger("rdp", [p.entry()]).epsilon(1 / 40) == pytest.approx(theirs, rel=1e-9)


def test_a_target_epsilon_is_spent_exactly_over_the_planned_rounds_and_composes_round_by_round():
    p = plan(PrivacyParams(target_epsilon=8.0), images=200, batch_size=20, epochs_per_round=1, rounds=5)
    assert p.sample_rate == 0.1 and p.steps_per_round == 10 and p.delta == 1 / 200
    ledger = Ledger("rdp")
    spent = []
    for _ in range(5):
        ledger.history.append(p.entry())
        spent.append(ledger.epsilon(p.delta))
    assert spent == sorted(spent) and spent[-1] == pytest.approx(p.planned_epsilon)
    assert 7.9 <= spent[-1] <= 8.0  # Opacus' search stops within 0.01 below the target
    assert spent[0] < spent[-1] < 5 * spent[0]  # composed, sub-linearly (RDP): five rounds cost less than five times one


def test_dp_rounds_are_noisy_but_reproducible():
    x, y = random_images(24, 1)

    def round_with(seed: int) -> dict:
        torch.manual_seed(5)
        model = timm.create_model(MODEL, pretrained=False, num_classes=3)
        p = plan(PrivacyParams(noise_multiplier=1.0), 24, 4, 1, 1)
        local_round(model, MODEL, x, y, TRAIN, Schedule(0, 1, 1, 2), CLASSES, private=Private(PrivacyParams(noise_multiplier=1.0), p, 4, seed))
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, again, other = round_with(1), round_with(1), round_with(2)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert max((a[k] - other[k]).abs().max().item() for k in a) > 1e-3  # another noise draw moves the weights


@pytest.mark.parametrize(("settings", "message"), [
    ({"privacy": {"noise_multiplier": 0}}, "a noise multiplier of 0 adds no noise"),
    ({"privacy": {"clip_norm": 1.0}}, "set privacy.noise_multiplier or privacy.target_epsilon"),
    ({"secure_aggregation": True, "silos": ["a"]}, "secure aggregation needs at least 2 silos"),
])
def test_bad_privacy_settings_are_one_sentence_before_any_round(settings, message, tmp_path):
    path = tmp_path / "federated.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"silos": ["a", "b"], "eval_source": "e", "exchange": "x", **settings}))
    with pytest.raises(TunedeckError, match=message) as caught:
        load_federated(path)
    assert str(caught.value).count("\n") == 0


def test_an_unreachable_target_a_silo_smaller_than_a_batch_batchnorm_and_mixup_are_one_sentence_each():
    with pytest.raises(TunedeckError, match=r"needs a noise multiplier above 20.*raise the target"):
        plan(PrivacyParams(target_epsilon=0.01), images=50, batch_size=25, epochs_per_round=5, rounds=50)
    with pytest.raises(TunedeckError, match=r"has 6 images, fewer than one batch \(8\)"):
        plan(PrivacyParams(target_epsilon=8), images=6, batch_size=8, epochs_per_round=1, rounds=1)
    with pytest.raises(TunedeckError, match=r"one round .* already spends more than privacy.target_epsilon"):
        plan(PrivacyParams(noise_multiplier=0.3, target_epsilon=0.5), images=100, batch_size=10, epochs_per_round=2, rounds=3)
    with pytest.raises(TunedeckError, match=r"test_resnet has \d+ BatchNorm layers .*choose a backbone without BatchNorm"):
        refuse_batchnorm(timm.create_model("test_resnet", num_classes=3), "test_resnet")
    with pytest.raises(TunedeckError, match=r"test_efficientnet has \d+ BatchNorm"):  # BatchNormAct2d, which Opacus' validator misses
        refuse_batchnorm(timm.create_model("test_efficientnet", num_classes=3), "test_efficientnet")
    with pytest.raises(TunedeckError, match=r"train.mixup cannot work with DP-SGD"):
        check_train_params(TrainParams(mixup=0.2))


# ---- the silo flow with privacy and secure aggregation -------------------------------------------------------------

def silo_task(tmp_path, **extra) -> SiloTask:
    fields = dict(run="e" * 64, round=0, exchange=str(tmp_path / "exchange"), model_name=MODEL, classes=CLASSES,
                  image_size=SIZE, train=TRAIN.model_dump(mode="json"), seed=3, first_epoch=0, epochs=1, total_epochs=2,
                  device="cpu", rounds=2)
    return SiloTask(**(fields | extra))


def put_global(task: SiloTask, seed: int = 4) -> dict:
    torch.manual_seed(seed)
    state = timm.create_model(MODEL, pretrained=False, num_classes=3).state_dict()
    put_state(f"{round_folder(task.exchange, task.run, task.round)}/global.safetensors", state, {"run": task.run, "round": task.round})
    return state


def run_silo(monkeypatch, name: str, task: SiloTask, folder) -> dict:
    monkeypatch.setattr(silo_module, "silo_name", lambda: name)
    return silo_module.silo.fn(task, data=str(folder))


@pytest.fixture
def three_silos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    counts = [{"cat": 4, "dog": 3, "fox": 3}, {"cat": 2, "dog": 6, "fox": 4}, {"cat": 5, "dog": 2, "fox": 7}]
    return {name: write_images(tmp_path / "data" / name, c, size=SIZE, seed=i) for i, (name, c) in enumerate(zip("abc", counts, strict=True))}


def test_a_silo_over_its_budget_declines_the_round_and_its_ledger_composes(tmp_path, monkeypatch, three_silos):
    privacy = PrivacyParams(noise_multiplier=1.0, target_epsilon=2.0)
    for r in range(3):
        task = silo_task(tmp_path, round=r, first_epoch=r, total_epochs=3, rounds=3, privacy=privacy)
        put_global(task)
        header = run_silo(monkeypatch, "a", task, three_silos["a"])
        if "declined" in header:
            break
        assert header["privacy"]["steps"] == (r + 1) * 2  # 10 images, batch 4: 2 steps a round
    assert r == 2, "two rounds fit in the budget, the third does not"
    assert header["declined"].startswith("silo a: round 3 would bring its ε to") and "it takes no more rounds" in header["declined"]
    assert exists(f"{round_folder(task.exchange, task.run, 2)}/a.declined")
    assert not exists(f"{round_folder(task.exchange, task.run, 2)}/a.safetensors")
    ledger = Ledger.load(silo_module.local_folder(task) / "a-privacy.json", "rdp")
    assert len(ledger.history) == 2 and ledger.epsilon(0.1) <= 2.0


def test_secure_aggregation_stores_only_masked_updates_and_sums_to_plain_fedavg(tmp_path, monkeypatch, three_silos):
    """Three silos' rounds through the silo flow, plainly and with secure aggregation (the same seeds, so the same
    updates): the exchange holds masked vectors far from the updates, the coordinator's unmasked sum equals plain
    FedAvg to 1e-5. Silo c then drops after the others masked with it: the partial sum is refused, and the round
    masked again without c (a and b reuse their trained updates) equals plain FedAvg over a and b."""
    plain = silo_task(tmp_path)
    template = put_global(plain)
    states, counts = {}, {}
    for name, folder in three_silos.items():
        counts[name] = run_silo(monkeypatch, name, plain, folder)["examples"]
        states[name] = get_state(f"{round_folder(plain.exchange, plain.run, 0)}/{name}.safetensors")[0]
    expected = weighted_average(list(states.values()), list(counts.values()))

    setup = silo_task(tmp_path, run="5" * 64, phase="setup", secure=True)
    for name, folder in three_silos.items():
        assert len(run_silo(monkeypatch, name, setup, folder)["public_key"]) == 64
    secure = silo_task(tmp_path, run="5" * 64, secure=True, peers=["a", "b", "c"])
    put_global(secure)
    for name, folder in three_silos.items():
        run_silo(monkeypatch, name, secure, folder)
    folder = round_folder(secure.exchange, secure.run, 0)
    assert not list((tmp_path / "exchange" / secure.run[:16]).rglob("*.safetensors"))[1:], "only the global model"
    stored = {n: get_blob(f"{folder}/{n}.masked")[0] for n in "abc"}
    for name in "abc":  # a masked update is nowhere near the silo's encoded update
        clear = encode(states[name], counts[name])
        assert np.mean(stored[name] == clear) < 1e-3
    mean_of_masked = np.mean([stored[n].view(np.int64).astype(np.float64) for n in "abc"], axis=0)
    plain_scaled = encode(expected, sum(counts.values())).view(np.int64).astype(np.float64) / 3
    assert np.abs(mean_of_masked - plain_scaled).mean() > 1e15  # masks are uniform over 2^64: far more than noise

    mean, got, _ = gather_secure(secure, ["a", "b", "c"], template)
    worst = max((mean[k].double() - expected[k].double()).abs().max().item() for k in expected)
    assert worst <= 1e-5, worst

    # c drops after a and b masked with it: never a partial unmask
    redo_from = gather_secure(secure, ["a", "b"], template)
    assert redo_from[0] is None and redo_from[1] == ["a", "b"]
    again = silo_task(tmp_path, run="5" * 64, secure=True, peers=["a", "b"], attempt=1)
    trained = {n: (silo_module.local_folder(again) / f"{n}-round-0001.safetensors").stat().st_mtime_ns for n in "ab"}
    for name in "ab":
        run_silo(monkeypatch, name, again, three_silos[name])
    assert {n: (silo_module.local_folder(again) / f"{n}-round-0001.safetensors").stat().st_mtime_ns for n in "ab"} == trained
    mean2, counts2, _ = gather_secure(again, ["a", "b"], template)
    expected2 = weighted_average([states["a"], states["b"]], [counts["a"], counts["b"]])
    assert counts2 == [counts["a"], counts["b"]]
    assert max((mean2[k].double() - expected2[k].double()).abs().max().item() for k in expected2) <= 1e-5


def test_the_masks_cancel_only_in_the_whole_sum():
    keys = {n: keypair() for n in "xyz"}
    publics = {n: k[1] for n, k in keys.items()}
    states = {n: {"w": torch.full((5,), float(i + 1)), "n": torch.tensor(i, dtype=torch.int64)} for i, n in enumerate("xyz")}
    ctx = context("run", 0, 0, list("xyz"))
    masked = [mask(encode(states[n], 2), n, keys[n][0], publics, ctx) for n in "xyz"]
    whole = unmask_mean(masked, 6, states["x"])
    assert torch.allclose(whole["w"], torch.full((5,), 2.0)) and whole["n"].item() == 1
    partial = unmask_mean(masked[:2], 4, states["x"])
    assert (partial["w"] - 1.5).abs().min() > 1e3  # two of three: still masked, garbage
    other_round = mask(encode(states["z"], 2), "z", keys["z"][0], publics, context("run", 0, 1, list("xyz")))
    assert not np.array_equal(other_round, masked[2])  # a redo gets fresh masks


# ---- FedProx and client sampling ----------------------------------------------------------------------------------

def test_fedprox_pulls_the_silo_towards_the_global_weights_and_mu_0_is_fedavg():
    x, y = random_images(32, 2)

    def distance(mu: float) -> tuple[float, dict]:
        torch.manual_seed(6)
        model = timm.create_model(MODEL, pretrained=False, num_classes=3)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        local_round(model, MODEL, x, y, TRAIN.model_copy(update={"lr": 0.2}), Schedule(0, 3, 3, 1), CLASSES, mu=mu)
        end = model.state_dict()
        return sum((end[k] - start[k]).double().pow(2).sum().item() for k in start) ** 0.5, end

    free, free_state = distance(0.0)
    zero, zero_state = distance(0.0)
    pulled, _ = distance(5.0)
    assert all(torch.equal(free_state[k], zero_state[k]) for k in free_state)
    assert pulled < 0.9 * free, (pulled, free)


def test_client_sampling_is_seeded_varies_by_round_and_keeps_min_silos():
    config = FederatedParams(silos=list("abcde"), eval_source="e", exchange="x", sample_fraction=0.4, min_silos=2)
    fed = types.SimpleNamespace(config=config, params=types.SimpleNamespace(base=types.SimpleNamespace(seed=1)),
                                exhausted=set())
    fed.names = lambda: Federation.names(fed)
    fed.enough = lambda r, n, secure=False: Federation.enough(fed, r, n, secure)
    picks = [Federation.choose(fed, r) for r in range(6)]
    assert all(len(p) == 2 and p == sorted(p) for p in picks)
    assert picks == [Federation.choose(fed, r) for r in range(6)]
    assert len({tuple(p) for p in picks}) > 1
    fed.exhausted = {"a", "b", "c", "d"}
    with pytest.raises(TunedeckError, match=r"only 1 of 5 silos could take part \(4 spent their privacy budget\)"):
        Federation.choose(fed, 0)


def test_the_model_card_states_each_silos_epsilon_and_whether_the_coordinator_saw_only_sums():
    from flows.core.model_card import _privacy

    privacy = {"dp_sgd": PrivacyParams(target_epsilon=8.0).model_dump(), "secure_aggregation": True,
               "composition": "composed", "silos": {
                   "a": {"epsilon": 7.99, "delta": 1 / 300, "noise_multiplier": 0.61, "sample_rate": 0.05, "rounds": 5},
                   "b": {"rounds": 0}}}
    text = _privacy(types.SimpleNamespace(card=types.SimpleNamespace(privacy=privacy)))
    assert "## Privacy" in text and "| a | 5 | 7.990 | 0.00333 | 0.61 | 0.05 |" in text
    assert "| b | 0 | 0 (took no DP round) |" in text and "saw only the sum" in text
    assert _privacy(types.SimpleNamespace(card=types.SimpleNamespace(privacy=None))) == ""


def test_the_setup_refuses_a_silo_smaller_than_a_batch_and_an_unreachable_budget_before_any_round(tmp_path, monkeypatch,
                                                                                                   three_silos):
    """The silo flow's setup phase (what the coordinator calls on every silo before round 1) says what is wrong in
    one sentence, trains nothing and writes no setup answer; a good setup publishes the plan and the key."""
    big_batch = silo_task(tmp_path, phase="setup", train=TRAIN.model_copy(update={"batch_size": 16}).model_dump(mode="json"))
    with pytest.raises(TunedeckError, match=r"^silo a has 10 images, fewer than one batch \(16\): lower train.batch_size"):
        run_silo(monkeypatch, "a", big_batch, three_silos["a"])
    tiny_budget = silo_task(tmp_path, phase="setup", rounds=50, privacy=PrivacyParams(target_epsilon=0.01))
    with pytest.raises(TunedeckError, match=r"needs a noise multiplier above 20, at which nothing is learnt"):
        run_silo(monkeypatch, "a", tiny_budget, three_silos["a"])
    assert not (tmp_path / "exchange").exists(), "no answer and no weights from a refused setup"
    good = silo_task(tmp_path, phase="setup", privacy=PrivacyParams(target_epsilon=8.0), secure=True)
    answer = run_silo(monkeypatch, "b", good, three_silos["b"])
    assert answer["examples"] == 12 and 7.9 <= answer["plan"]["epsilon"] <= 8.0 and len(answer["public_key"]) == 64
    key = silo_module.local_folder(good) / "b-x25519.key"
    assert key.stat().st_mode & 0o077 == 0, "the private key is readable by its owner only"


def test_a_silo_whose_setup_failed_stops_the_run_before_round_1_in_the_silos_own_sentence(monkeypatch):
    from flows.federated import coordinator

    said = "silo b has 5 images, fewer than one batch (8): lower train.batch_size or leave this silo out of the federation."
    monkeypatch.setattr(coordinator, "call_silos", lambda fed, names, task, logger: {
        "a": None, "b": f"its run b-5555-setup ended Failed: Flow run encountered an exception: TunedeckError: {said}"})
    fed = types.SimpleNamespace(names=lambda: ["a", "b"], silo_task=lambda r, phase: None)
    with pytest.raises(TunedeckError) as caught:
        coordinator.setup_silos(fed, None)
    assert str(caught.value) == f"silo b cannot take part, so no round started: {said}"
