"""The coordinator's rounds and the silo's work, in-process (no server): checkpoint, resume, FedBN, the export."""

from __future__ import annotations

import yaml

from flows.core.fedavg import batchnorm_keys, weighted_average
from tests.conftest import tiny_params_dict, write_images


def test_a_round_checkpoints_a_reopened_coordinator_resumes_and_the_export_is_a_project_model(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from flows.contracts.federated import FederatedParams, round_folder
    from flows.core.model_file import load_model
    from flows.federated.coordinator import silo
    from flows.federated.exchange import get_state, put_state
    from flows.federated.rounds import Federation

    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(("a", "b")):
        write_images(tmp_path / name, {"red": 6, "green": 6, "blue": 6}, size=16, seed=i)
    write_images(tmp_path / "eval", {"red": 4, "green": 4, "blue": 4}, size=16, seed=9)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict("eval")))
    config = FederatedParams(silos=["a", "b"], eval_source="eval", exchange=str(tmp_path / "xch"), rounds=2, fedbn=True)

    fed = Federation.open(config)
    assert fed.next_round == 0
    folder = round_folder(config.exchange, fed.key, 0)
    put_state(f"{folder}/global.safetensors", fed.state, {"run": fed.key, "round": 0})
    states, counts = [], []
    for name in ("a", "b"):
        header = silo.fn(fed.silo_task(0), data=str(tmp_path / name))  # run by hand its name is 'local'
        state, sent = get_state(f"{folder}/local.safetensors")
        assert sent == header and sent["examples"] == 18 and sent["round"] == 0
        states.append(state)
        counts.append(sent["examples"])
    own_bn = load_file(str(tmp_path / ".tunedeck" / "federated" / fed.key[:16] / "local-local.safetensors"))
    assert set(own_bn) == batchnorm_keys(fed.model), "FedBN: the silo keeps its BatchNorm on its own host"
    metrics = fed.finish_round(0, weighted_average(states, counts), counts)
    assert metrics["round"] == 1 and 0.0 <= metrics["global/acc"] <= 1.0

    again = Federation.open(config)  # a killed coordinator, started again with the same settings
    assert again.next_round == 1 and again.history == fed.history
    assert all((again.state[k] == fed.state[k]).all() for k in fed.state)
    assert "resuming federated run" in again.notes[-1]
    again.export()
    model, meta = load_model(tmp_path / "models" / "model.safetensors")
    assert meta.classes == ["blue", "green", "red"] and meta.model_name == "test_resnet"
    other = Federation.open(config.model_copy(update={"rounds": 3}))
    assert other.next_round == 0, "other settings never pick up this run's checkpoint"
