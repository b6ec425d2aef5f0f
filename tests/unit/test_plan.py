"""`tunedeck plan`'s arithmetic (flows.host.plan): records from run labels, the expected time and cost of a job on
each host, the pick for a deadline. Through a real server and worker: test_deployments.py, test_plan_picks..."""

from __future__ import annotations

import pytest

from flows.core.errors import TunedeckError
from flows.host.plan import Job, Record, options, parse_duration, pick, ranked


def labels(host: str, spie: float, overhead: float, price: float | None, size: int = 64, batch: int = 32) -> dict:
    out = {"tunedeck.host": host, "tunedeck.throughput.device": f"{host}-device", "tunedeck.throughput.model": "resnet18",
           "tunedeck.throughput.image_size": size, "tunedeck.throughput.batch": batch,
           "tunedeck.throughput.s_per_image_epoch": spie, "tunedeck.throughput.overhead_s": overhead,
           "tunedeck.throughput.images": 1000, "tunedeck.throughput.epochs": 4}
    if price is not None:
        out |= {"tunedeck.cost.price_per_hour": price, "tunedeck.cost.total": (spie * 4000 + overhead) / 3600 * price}
    return out


JOB = Job("resnet18", 64, 32, epochs=10, images=1200)


def test_a_faster_dearer_host_is_picked_only_when_the_deadline_needs_it():
    records = [Record.from_labels(labels("gpu-box", 0.001, 20.0, 4.0)), Record.from_labels(labels("cpu-box", 0.01, 5.0, 0.2))]
    found = {o.host: o for o in options(records, JOB)}
    assert found["gpu-box"].seconds == pytest.approx(20 + 0.001 * 1200 * 10)
    assert found["cpu-box"].seconds == pytest.approx(5 + 0.01 * 1200 * 10)
    assert found["gpu-box"].cost == pytest.approx(32 / 3600 * 4.0) and found["cpu-box"].cost == pytest.approx(125 / 3600 * 0.2)
    assert pick(list(found.values()), 3600).host == "cpu-box"  # both meet it: the cheaper
    assert pick(list(found.values()), 60).host == "gpu-box"  # only the faster meets it
    assert pick(list(found.values()), 10) is None
    assert [o.host for o in ranked(list(found.values()), 60)] == ["gpu-box", "cpu-box"]


def test_other_sizes_are_scaled_by_pixels_and_said_and_a_host_without_a_price_is_never_cheapest():
    records = [Record.from_labels(labels("a", 0.004, 10.0, None, size=128)), Record.from_labels(labels("b", 0.01, 10.0, 1.0))]
    found = {o.host: o for o in options(records, JOB)}
    assert found["a"].seconds == pytest.approx(10 + 0.004 / 4 * 12000) and "scaled by pixels from 128 px" in found["a"].basis
    assert found["a"].cost is None and found["b"].basis == "measured at these params"
    assert pick(list(found.values()), None).host == "b"  # priced beats unpriced, though slower
    assert pick([found["a"]], None).host == "a"  # none priced: the fastest


def test_a_run_without_a_throughput_record_and_a_bad_deadline():
    assert Record.from_labels({"tunedeck.host": "x"}) is None
    assert parse_duration("90") == 90 and parse_duration("45m") == 2700 and parse_duration("1.5h") == 5400
    for bad in ("soon", "-5m", "0", "inf"):
        with pytest.raises(TunedeckError, match="give a duration like"):
            parse_duration(bad)
