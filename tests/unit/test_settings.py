"""The process's settings (flows.contracts.settings): typed, read once from the environment, a bad value in one
sentence naming the variable, and handed to a child process as variables that read back the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError


def test_unset_and_empty_variables_are_the_defaults_and_values_are_typed():
    assert Settings.read({}) == Settings() == Settings.read({"TUNEDECK_PREFECT": " ", "TUNEDECK_GPUS": ""})
    read = Settings.read({"TUNEDECK_PREFECT": "OFF", "TUNEDECK_CPU_SLOTS": "3", "TUNEDECK_CHECKPOINT_REMOTE": "off",
                          "TUNEDECK_CHECKPOINTS": "/tmp/ck", "TUNEDECK_GIT_PULL": "1", "TUNEDECK_DDP_NODES": "2",
                          "OTHER": "ignored"})
    assert (read.prefect, read.cpu_slots, read.checkpoint_remote, read.checkpoints, read.git_pull, read.ddp_nodes) == \
        ("off", 3, False, Path("/tmp/ck"), True, 2)


def test_a_childs_variables_read_back_as_the_same_settings():
    settings = Settings(prefect="off", progress="lines", checkpoints=Path("/x"), cpu_bf16=False, cpu_slots=2,
                        git_pull=True, ddp_node_rank=0, host="box")
    assert Settings.read(settings.env()) == settings
    base = {"PATH": "/bin", "TUNEDECK_GPUS": "0,1", "TUNEDECK_HOST": "old"}
    child = settings.environ(base)
    assert child["PATH"] == "/bin" and "TUNEDECK_GPUS" not in child and Settings.read(child) == settings


@pytest.mark.parametrize("variable, value, said", [
    ("TUNEDECK_PREFECT", "sometimes", "TUNEDECK_PREFECT is 'sometimes': use auto, off or required."),
    ("TUNEDECK_CPU_BF16", "maybe", "TUNEDECK_CPU_BF16 is 'maybe': use 1 or 0 (on or off)."),
    ("TUNEDECK_ZOMBIE_AFTER_S", "20", "TUNEDECK_ZOMBIE_AFTER_S is '20': use a whole number of seconds above 30"),
    ("TUNEDECK_CPU_SLOTS", "0", "TUNEDECK_CPU_SLOTS is '0': input should be greater than or equal to 1"),
])
def test_a_bad_value_is_one_sentence_naming_the_variable(variable, value, said):
    with pytest.raises(TunedeckError) as caught:
        Settings.read({variable: value})
    assert str(caught.value).startswith(said) and "\n" not in str(caught.value)
