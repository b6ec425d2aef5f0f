"""FedAvg's averaging, FedBN and the non-IID split (flows.core.fedavg), and one round through the silo flow's
own code: no server."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from flows.contracts import PrepareManifest
from flows.contracts.federated import SiloTask, round_folder
from flows.core.distributed import World
from flows.core.errors import TunedeckError
from flows.core.fedavg import batchnorm_keys, dirichlet_split, iid_split, keep_local, weighted_average
from flows.core.fedavg_train import check_round_params, silo_seed
from flows.core.images import decode_folder
from flows.core.params import BaseParams, DataParams, ModelParams, Params, TrainParams
from flows.core.prepare import Splits
from flows.core.trainer import Trainer
from flows.federated.coordinator import silo
from flows.federated.exchange import get_state, put_state
from tests.conftest import write_images

SIZE = 16


def small_net(seed: int, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3), *([nn.BatchNorm2d(4)] if bn else []), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers)


def test_averaging_identical_models_returns_the_same_model():
    state = small_net(0).state_dict()
    state["1.num_batches_tracked"].fill_(7)
    averaged = weighted_average([state, state, state], [5, 1, 9])
    assert averaged.keys() == state.keys()
    for key, tensor in state.items():
        assert averaged[key].dtype == tensor.dtype
        assert torch.equal(averaged[key], tensor), key


def test_counts_1_and_3_match_a_hand_computation():
    a = {"w": torch.tensor([0.0, 4.0, -2.0]), "b": torch.tensor(1.0, dtype=torch.float16)}
    b = {"w": torch.tensor([4.0, 0.0, 2.0]), "b": torch.tensor(5.0, dtype=torch.float16)}
    averaged = weighted_average([a, b], [1, 3])
    # (1 * a + 3 * b) / 4
    assert torch.equal(averaged["w"], torch.tensor([3.0, 1.0, 1.0]))
    assert averaged["b"].dtype == torch.float16 and averaged["b"].item() == 4.0


def test_integer_buffers_are_the_rounded_weighted_mean_in_their_own_dtype():
    a = {"n": torch.tensor(10, dtype=torch.int64)}
    b = {"n": torch.tensor(20, dtype=torch.int64)}
    assert weighted_average([a, b], [1, 3])["n"].item() == 18  # 17.5 -> 18 (round half to even)
    assert weighted_average([a, b], [1, 2])["n"].item() == 17  # 16.67 -> 17
    out = weighted_average([a, b], [2, 1])["n"]
    assert out.dtype == torch.int64 and 10 <= out.item() <= 20


def silo_folders(root: Path, counts: list[dict[str, int]]) -> tuple[list[Path], Path]:
    """One image folder per silo, and the same images pooled in one folder (as a centralised run sees them)."""
    silos = [write_images(root / f"silo-{i}", c, size=SIZE, seed=i) for i, c in enumerate(counts)]
    pooled = root / "pooled"
    for i, folder in enumerate(silos):
        for image in folder.rglob("*.png"):
            (pooled / image.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, pooled / image.parent.name / f"silo-{i}-{image.name}")
    return silos, pooled


def round_with_global(tmp_path: Path, cfg: TrainParams, model: str, round_: int, seed: int, first: int, epochs: int,
                      total: int, init: int) -> tuple[SiloTask, dict[str, torch.Tensor]]:
    """A round's task for classes cat, dog and fox, and its global weights (model from seed init) in the exchange."""
    task = SiloTask(run="f" * 64, round=round_, exchange=str(tmp_path / "exchange"), model_name=model,
                    classes=["cat", "dog", "fox"], image_size=SIZE, train=cfg.model_dump(mode="json"), seed=seed,
                    first_epoch=first, epochs=epochs, total_epochs=total, fedbn=False, device="cpu")
    torch.manual_seed(init)
    start = timm.create_model(model, pretrained=False, num_classes=3).state_dict()
    put_state(f"{round_folder(task.exchange, task.run, round_)}/global.safetensors", start, {"run": task.run, "round": round_})
    return task, start


def silo_round(task: SiloTask, data: Path) -> tuple[dict[str, torch.Tensor], int]:
    """One silo's round exactly as its flow runs it (without Prefect's engine): its weights and example count."""
    header = silo.fn(task, data=str(data))
    state, written = get_state(f"{round_folder(task.exchange, task.run, task.round)}/local.safetensors")
    assert written == header
    return state, header["examples"]


def test_one_fedavg_round_through_the_silo_flow_equals_one_centralised_full_batch_step(tmp_path, monkeypatch):
    """The silos' own round (flows.federated.coordinator.silo: exchange in, local training, exchange out), then the
    coordinator's example-weighted average, equals one step of the same code on the pooled images.

    Why it is an identity: with no BatchNorm (test_vit), no augmentation, one full batch per silo, one
    local epoch, a constant LR, no weight decay and fp32 (the silo's Trainer honours train.precision), each silo moves the global weights by -lr x the gradient
    of its mean loss: timm's "momentum" is SGD with a fresh momentum buffer every round, and the first
    step of one is a plain step (buffer = gradient). The pooled mean loss's gradient is the
    example-weighted mean of the silos' gradients, so the average of the steps is the pooled step.
    Tolerance 1e-6: in fp32 the silos' and the pooled gradients are sums over other batches in other
    orders; that rounding (~1e-7 of a gradient, x lr 0.5) lands on weights up to ~1 (LayerNorm's), whose
    fp32 spacing is 1.2e-7, so a weight may differ by an ulp or a few.
    """
    monkeypatch.chdir(tmp_path)  # FedBN's local file would go under ./.tunedeck (off here)
    counts = [{"cat": 2, "dog": 1, "fox": 1}, {"cat": 3, "dog": 5, "fox": 1}, {"cat": 4, "dog": 2, "fox": 11}]
    silos, pooled = silo_folders(tmp_path / "data", counts)  # unequal sizes: the example weights matter
    cfg = TrainParams(optimizer="momentum", lr=0.5, weight_decay=0.0, scheduler="none", batch_size=64, hflip=0.0,
                      crop_padding=0, label_smoothing=0.0, freeze_epochs=0, epochs=1, precision="fp32")
    task, start = round_with_global(tmp_path, cfg, "test_vit", round_=0, seed=0, first=0, epochs=1, total=1, init=3)

    states, examples = zip(*(silo_round(task, folder) for folder in silos), strict=True)
    assert list(examples) == [sum(c.values()) for c in counts]
    averaged = weighted_average(states, examples)
    central, _ = silo_round(task, pooled)  # the same code on all the images: a centralised full-batch step

    assert averaged.keys() == central.keys() == start.keys()
    worst = max((averaged[k].double() - central[k].double()).abs().max().item() for k in central)
    moved = max((central[k].double() - start[k].double()).abs().max().item() for k in central)
    unweighted = max((weighted_average(states, [1, 1, 1])[k].double() - central[k].double()).abs().max().item()
                     for k in central)
    print(f"\nFedAvg round vs pooled step: max |difference| {worst:.2e} (unweighted mean: {unweighted:.2e}); "
          f"the step moved weights by up to {moved:.2e}")
    assert worst <= 1e-6, worst
    assert moved >= 1000 * 1e-6, moved  # the step is large against the tolerance: the equality is not vacuous
    assert unweighted >= 100 * 1e-6, unweighted  # and the tolerance tells the example weights from none


def test_a_silos_round_is_the_trainers_on_the_same_images_from_the_same_weights(tmp_path, monkeypatch):
    """The silo flow's round (global weights from the exchange, its folder decoded, local training, weights to the
    exchange) equals the one Trainer (flows.core.trainer) on the same images from the same weights, to 1e-6: every
    train param means in a silo what it means in the train stage. The params are not trivial: the round is epochs 2
    and 3 of a 3-epoch cosine schedule, with the backbone frozen in epoch 2 and not in 3, batches of 4 of 18
    images, crops and flips, label smoothing and AdamW's weight decay. In fp32: bf16 autocast on a CPU is not
    reproducible to 1e-6 from one run to the next in one process (measured on this project's 2-core EPYC: the same
    round twice moved a weight sum by 2e-3), so an equality needs fp32."""
    monkeypatch.chdir(tmp_path)
    folder = write_images(tmp_path / "silo", {"cat": 6, "dog": 5, "fox": 7}, size=SIZE, seed=1)
    cfg = TrainParams(optimizer="adamw", lr=3e-3, weight_decay=0.05, scheduler="cosine", batch_size=4, hflip=0.5,
                      crop_padding=2, label_smoothing=0.1, freeze_epochs=2, epochs=3, precision="fp32")
    task, start = round_with_global(tmp_path, cfg, "test_resnet", round_=1, seed=7, first=1, epochs=2, total=3, init=5)

    silo_state, examples = silo_round(task, folder)

    images = decode_folder(folder, SIZE)
    assert list(images.classes) == task.classes and examples == len(images.labels) == 18
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    model.load_state_dict(start)
    params = Params(base=BaseParams(seed=silo_seed(7, "local", 1)), data=DataParams(source=str(folder), image_size=SIZE),
                    model=ModelParams(name="test_resnet", pretrained=False), train=cfg)
    manifest = PrepareManifest(source=str(folder), data_version="", classes=task.classes, image_size=SIZE,
                               counts={"train": examples})
    Trainer(params, manifest, Splits.train_only(images.images, images.labels), torch.device("cpu"), World(), None,
            model=model).train_round(1, 2)
    trained = {k: v.detach().float() for k, v in model.state_dict().items()}

    assert silo_state.keys() == trained.keys()
    worst = max((silo_state[k].double() - trained[k].double()).abs().max().item() for k in trained)
    moved = max((trained[k].double() - start[k].double()).abs().max().item() for k in trained if k.endswith("weight"))
    assert worst <= 1e-6, worst
    assert moved >= 1000 * 1e-6, moved  # the round moved the weights far beyond the tolerance


@pytest.mark.parametrize("setting", [{"early_stopping": 2}, {"ema_decay": 0.9}, {"scheduler": "plateau"},
                                     {"checkpoint_every": 5}, {"keep_top": 2}])
def test_a_train_param_a_round_cannot_honour_is_one_sentence(setting, tmp_path):
    with pytest.raises(TunedeckError, match=r"cannot work in a federated round .*: leave them at their defaults"):
        check_round_params(TrainParams(**setting))


def test_fedbn_keeps_each_silos_batchnorm_and_takes_the_rest_from_the_global_model():
    silo = small_net(1)
    keys = batchnorm_keys(silo)
    assert keys == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    own = {k: v + 1 if v.is_floating_point() else v + 3 for k, v in silo.state_dict().items()}
    other = small_net(2).state_dict()
    global_state = weighted_average([own, other], [1, 1])
    assert weighted_average([own, other], [1, 1], exclude=keys).keys() == global_state.keys() - keys
    merged = keep_local(global_state, own, keys)
    for key in merged:
        expected = own[key] if key in keys else global_state[key]
        assert torch.equal(merged[key], expected), key
    first_round = keep_local(global_state, None, keys)
    assert all(torch.equal(first_round[k], global_state[k]) for k in global_state)


def test_mismatched_models_are_one_sentence():
    a, b = small_net(0).state_dict(), small_net(0, bn=False).state_dict()
    with pytest.raises(ValueError, match="other keys"):
        weighted_average([a, b], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([a, a], [0, 1])


def test_dirichlet_split_covers_every_example_once_and_small_alpha_is_skewed():
    labels = np.repeat(np.arange(5), 40)
    parts = dirichlet_split(labels, silos=3, alpha=0.5, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(200))
    assert min(len(p) for p in parts) >= 1
    assert dirichlet_split(labels, 3, 0.5, seed=0)[0].tolist() == parts[0].tolist()  # deterministic
    skew = [np.bincount(labels[p], minlength=5) / len(p) for p in dirichlet_split(labels, 3, 0.05, seed=1)]
    assert max(s.max() for s in skew) > 0.5  # at alpha 0.05 some silo is dominated by one class
    iid = iid_split(200, 3, seed=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(200)) and {len(p) for p in iid} <= {66, 67}


def test_the_coordinator_refuses_to_run_where_it_can_read_silo_data(tmp_path):
    from flows.core.errors import TunedeckError
    from flows.federated.rounds import check_unreadable

    assert check_unreadable([]) is None
    assert "cannot read any of the 1" in check_unreadable([str(tmp_path / "absent")])
    (tmp_path / "silo").mkdir()
    with pytest.raises(TunedeckError, match="can read silo data at .*silo"):
        check_unreadable([str(tmp_path / "absent"), str(tmp_path / "silo")])
