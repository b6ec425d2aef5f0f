"""What makes a monitored batch count toward a retrain (monitor.trigger): drift, an estimated accuracy drop judged
on its interval, or both; a batch with no estimate falls back to drift; history recorded before the modes counts
its drifted batches."""

from __future__ import annotations

import pytest

from flows.contracts import Estimated, MonitorBatch
from flows.core.params import MonitorParams
from flows.ship.monitor import counts, errors_summary, errors_table, estimator_errors, harm, streak_after, summary


def test_harm_is_judged_on_the_intervals_upper_end_not_the_point():
    monitor = MonitorParams(estimated_drop=0.1)
    low_point_wide = {"atc": Estimated(value=0.70, low=0.55, high=0.84)}  # the point is 0.2 down, the interval not
    clearly = {"atc": Estimated(value=0.60, low=0.52, high=0.70)}
    assert harm(low_point_wide, 0.9, monitor) is False
    assert harm(clearly, 0.9, monitor) is True
    assert harm(clearly, None, monitor) is None and harm({}, 0.9, monitor) is None
    assert harm({"confidence": Estimated(value=0.5, low=0.4, high=0.6)}, 0.9, monitor) is None, "reads its estimator"


@pytest.mark.parametrize(("trigger", "drifted", "harmful", "counted"), [
    ("drift", True, False, True), ("drift", False, True, False),
    ("estimated_drop", True, False, False), ("estimated_drop", False, True, True),
    ("both", True, True, True), ("both", True, False, False), ("both", False, True, False),
    ("estimated_drop", True, None, True), ("both", False, None, False),  # no estimate: drift decides
])
def test_what_counts_toward_a_retrain(trigger, drifted, harmful, counted):
    assert counts(trigger, drifted, harmful) is counted


def batch(drifted: bool, counted: bool | None, version: str = "v1") -> MonitorBatch:
    return MonitorBatch(folder="f", model_version=version, n_images=1, drifted=drifted, statistics=[], streak=0,
                        counted=counted)


def test_the_streak_counts_counted_batches_and_old_records_by_their_drift():
    history = [batch(True, None), batch(False, True), batch(True, False), batch(False, True), batch(True, None)]
    assert streak_after(history, True, "v1") == 3
    assert streak_after(history, False, "v1") == 0
    assert streak_after(history, True, "v2") == 1, "another version's batches do not count"


def scored(accuracy: float | None, atc: float, confidence: float) -> MonitorBatch:
    return MonitorBatch(folder="f", model_version="v1", n_images=100, drifted=False, statistics=[], streak=0,
                        accuracy=accuracy, reference_accuracy=0.9, estimator="atc", harmful=atc < 0.7,
                        estimated_accuracy={"atc": Estimated(value=atc, low=atc - 0.05, high=atc + 0.05),
                                            "confidence": Estimated(value=confidence, low=confidence - 0.05,
                                                                    high=confidence + 0.05)})


def test_labelled_batches_keep_each_estimators_record_and_unlabelled_ones_add_nothing():
    history = [scored(0.80, 0.82, 0.75), scored(None, 0.5, 0.5), scored(0.60, 0.57, 0.66)]
    errors = estimator_errors(history)
    assert errors["atc"] == pytest.approx([2.0, -3.0]) and errors["confidence"] == pytest.approx([-5.0, 6.0])
    assert errors_summary(history) == ("estimates against the measured accuracy over 2 labelled batches: "
                                       "atc 2.5 points (bias -0.5), confidence 5.5 points (bias +0.5)")
    table = errors_table(history).splitlines()
    assert table[2] == "| atc | 2 | 2.50 | -0.50 | -3.00 |" and table[3] == "| confidence | 2 | 5.50 | +0.50 | +6.00 |"
    assert errors_summary(history[1:2]) is None and errors_table([]).startswith("no labelled batch yet")


def test_a_harmful_batchs_summary_names_the_estimate_it_was_judged_on():
    line = summary(scored(0.6, 0.55, 0.7))
    assert "estimated accuracy drop (atc 55.0% [50.0%, 60.0%] against 90.0% held out)" in line, line
