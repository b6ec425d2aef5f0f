"""The registry's accountability records ride in tag messages and come back whole; the model card shows groups."""

from __future__ import annotations

from flows.core.model_card import _groups
from flows.ship.registry import parse_message, tag_message


def test_a_tag_message_carries_its_record_and_reads_back_and_an_old_one_has_none():
    record = {"who": "Ada <ada@example.org>", "why": "promoted: ...", "params": {"train": {"lr": 0.01}}, "flow_run": None}
    text = tag_message("promoted: test accuracy 0.9 against prod's 0.8.", record)
    assert parse_message(text) == ("promoted: test accuracy 0.9 against prod's 0.8.", record)
    assert parse_message("rollback from v0.2.0 to v0.1.0") == ("rollback from v0.2.0 to v0.1.0", None)
    assert parse_message("summary\n\ntunedeck-audit: {not json") == ("summary", None)


def test_the_model_card_lists_each_group_with_its_interval_or_why_not_and_the_gap():
    class Facts:
        groups = {"site": {"worst": "b", "gap": {"difference": {"value": 0.2, "low": 0.1, "high": 0.3}},
                           "groups": {"a": {"n": 40, "accuracy": {"value": 0.95, "low": 0.9, "high": 1.0}},
                                      "b": {"n": 40, "accuracy": {"value": 0.75, "low": 0.6, "high": 0.85}},
                                      "c": {"n": 3, "note": "3 test images: too few for an interval (at least 10), no figure"}}}}

    text = _groups(Facts())
    assert "| site | b | 40 | 0.7500 [0.6000, 0.8500] |" in text
    assert "| site | c | 3 | 3 test images: too few for an interval (at least 10), no figure |" in text
    assert "Worst site group: b; gap to the best 0.2000 [0.1000, 0.3000]." in text

    class NoGroups:
        groups = {}

    assert _groups(NoGroups()) == ""


def test_the_model_card_links_a_few_overlays_and_states_the_sanity_check():
    from flows.core.model_card import _explanations

    class Facts:
        explanations = tuple(f"cat-right-as-cat-{i}.png" for i in range(6))
        sanity = "sanity check (model randomisation, Adebayo et al. 2018): rank correlation ... 0.12 over 6 images"

    text = _explanations(Facts())
    assert "(6 in `eval/explain/`)" in text and text.count("](eval/explain/") == 4
    assert "- [cat-right-as-cat-0.png](eval/explain/cat-right-as-cat-0.png)" in text and Facts.sanity in text

    class NoOverlays:
        explanations = ()
        sanity = ""

    assert _explanations(NoOverlays()) == ""
