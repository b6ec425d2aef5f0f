"""A run's energy and cost (flows.gateways.power): RAPL read from a powercap tree, a wrapped counter, an unreadable
one said as "unknown" (never zero), a GPU's counter through NVML (a stand-in GPU that draws a known power), and the
price. The train stage's figures in `dvc exp show`: tests/integration/test_pipeline.py; on a run's labels:
tests/integration/test_deployments.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cli.main import main
from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.gateways import gpus
from flows.gateways.power import UNKNOWN, Energy, EnergyMeter, rapl_packages


def powercap(root: Path, packages: dict[int, tuple[int, int]]) -> Path:
    """A /sys/class/powercap tree: a package domain per entry (energy_uj, max_energy_range_uj), each with a core
    sub-domain, and a psys domain that is no package."""
    for n, (energy, span) in packages.items():
        domain = root / f"intel-rapl:{n}"
        (domain / f"intel-rapl:{n}:0").mkdir(parents=True)
        (domain / "name").write_text(f"package-{n}\n")
        (domain / "energy_uj").write_text(f"{energy}\n")
        (domain / "max_energy_range_uj").write_text(f"{span}\n")
        (domain / f"intel-rapl:{n}:0" / "name").write_text("core\n")
    (root / "intel-rapl:9").mkdir(parents=True, exist_ok=True)
    (root / "intel-rapl:9" / "name").write_text("psys\n")
    return root


def test_cpu_energy_is_the_sum_of_the_packages_counters_a_wrapped_one_too(tmp_path):
    root = powercap(tmp_path, {0: (1_000_000, 10**12), 1: (10**12 - 500_000, 10**12)})
    assert [d.name for d in rapl_packages(root)] == ["intel-rapl:0", "intel-rapl:1"]
    meter = EnergyMeter([], root)
    (root / "intel-rapl:0" / "energy_uj").write_text(f"{1_000_000 + 3_600_000_000}\n")  # 1 Wh
    (root / "intel-rapl:1" / "energy_uj").write_text("1300000\n")  # wrapped: 0.5 J before the wrap, 1.3 J after
    energy = meter.stop([])
    assert energy.cpu_wh == pytest.approx(1 + 1.8 / 3600)
    assert energy.gpus == 0 and energy.gpu_wh is None


@pytest.mark.parametrize("tree", ["none", "unreadable"])
def test_a_cpu_counter_that_cannot_be_read_is_unknown_never_zero(tmp_path, tree):
    root = tmp_path / "powercap"
    if tree == "unreadable":  # what a non-root user meets on a recent kernel: the domain is there, its counter not
        powercap(root, {0: (5, 10**12)})
        (root / "intel-rapl:0" / "energy_uj").unlink()
    energy = EnergyMeter([], root).stop([])
    assert energy.cpu_wh is None
    metrics = energy.metrics(None)
    assert metrics["energy/cpu_wh"] == UNKNOWN and "energy/gpu_wh" not in metrics


def test_a_gpus_energy_is_read_from_its_counter_and_only_for_the_gpus_the_run_used(tmp_path):
    """Two stand-in GPUs, each drawing STAND_IN_WATTS by its counter: a run on GPU 1 alone is charged one GPU's."""
    gpus.use(gpus.StandInNvml(2))
    try:
        meter = EnergyMeter.for_host(tmp_path / "no-rapl")
        assert sorted(meter.gpu_start) == [0, 1]
        time.sleep(0.5)
        energy = meter.stop([1], held=1)
    finally:
        gpus.reset()
    watts = energy.gpu_wh * 3600 / energy.seconds
    assert watts == pytest.approx(gpus.STAND_IN_WATTS, rel=0.1), (energy, "one GPU's draw, not two")
    assert energy.gpus == 1 and energy.metrics(None)["energy/gpu_wh"] == round(energy.gpu_wh, 4)


def test_a_gpu_nvml_cannot_name_is_unknown(tmp_path):
    energy = EnergyMeter([], tmp_path).stop(None, held=2)
    assert energy.gpus == 2 and energy.metrics(None)["energy/gpu_wh"] == UNKNOWN


def test_device_hours_and_cost():
    gpu_run = Energy(seconds=1800, gpus=2, cpu_share=1.0, gpu_wh=150.0, cpu_wh=None)
    assert gpu_run.device_hours == 1.0
    metrics = gpu_run.metrics(2.5)
    assert metrics["cost/device_hours"] == 1.0 and metrics["cost/price_per_hour"] == 2.5 and metrics["cost/total"] == 2.5
    cpu_run = Energy(seconds=3600, gpus=0, cpu_share=0.5, gpu_wh=None, cpu_wh=12.0)  # half the host's threads
    assert cpu_run.metrics(4.0)["cost/total"] == 2.0 and cpu_run.metrics(4.0)["energy/cpu_wh"] == 12.0
    assert not {"cost/total", "cost/price_per_hour"} & set(cpu_run.metrics(None)), "no price, no cost"


def test_a_bad_price_is_one_sentence(capsys):
    with pytest.raises(TunedeckError, match="TUNEDECK_PRICE_PER_HOUR is '-1': use a price per device-hour, 0 or more"):
        Settings.read({"TUNEDECK_PRICE_PER_HOUR": "-1"})
    assert Settings.read({"TUNEDECK_PRICE_PER_HOUR": "2.5"}).price_per_hour == 2.5
    assert main(["worker", "--price-per-hour", "-3"]) == 2
    assert "--price-per-hour -3.0: give a price of 0 or more." in capsys.readouterr().err
