"""Groups (data.groups): the CSV's bad inputs are one sentence each and prepare writes nothing; the gate's group
check rejects only what its paired interval makes certain; and, on real training, a group made harder on purpose
shows a gap whose interval excludes 0, while the gate rejects a candidate trained without that group and accepts
one trained with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFilter

from flows.core import groups
from flows.core.errors import TunedeckError
from flows.core.evaluate import evaluate
from flows.core.params import parse_params
from flows.core.prepare import prepare
from flows.core.promotion import decide
from flows.core.train import train
from flows.ship.gate import figures_of
from tests.conftest import tiny_params_dict, write_images

SHAPES = ("circle", "square", "triangle")


def shapes(folder: Path, per_class_and_site: int, seed: int = 0) -> Path:
    """Three shape classes on a dark noisy ground from two sites: site a's shapes bright and sharp, site b's dim
    and blurred (harder on purpose); groups.csv lists each image's site."""
    rng = np.random.default_rng(seed)
    rows = ["path,site"]
    for name in SHAPES:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for site in ("a", "b"):
            for i in range(per_class_and_site):
                image = Image.fromarray(rng.integers(0, 60, (24, 24, 3), dtype=np.uint8))
                r = int(rng.integers(5, 9))
                x, y = (int(v) for v in rng.integers(r + 1, 24 - r - 1, 2))
                colour = tuple(int(v) for v in (rng.integers(120, 256, 3) if site == "a" else rng.integers(50, 95, 3)))
                draw, box = ImageDraw.Draw(image), [x - r, y - r, x + r, y + r]
                if name == "circle":
                    draw.ellipse(box, fill=colour)
                elif name == "square":
                    draw.rectangle(box, fill=colour)
                else:
                    draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
                if site == "b":
                    image = image.filter(ImageFilter.GaussianBlur(2.2))
                image.save(folder / name / f"{site}{i:03d}.png")
                rows.append(f"{name}/{site}{i:03d}.png,{site}")
    (folder / "groups.csv").write_text("\n".join(rows) + "\n")
    return folder


def grouped(tmp_path: Path, csv: str) -> tuple[Path, dict]:
    source = write_images(tmp_path / "images", {"cat": 6, "dog": 6})
    (source / "groups.csv").write_text(csv)
    raw = tiny_params_dict(str(source))
    raw["data"].update(groups="groups.csv", group_min_images=3)
    return source, raw


def listing(site_of) -> str:
    return "path,site\n" + "".join(f"{c}/{i:03d}.png,{site_of(c, i)}\n" for c in ("cat", "dog") for i in range(6))


@pytest.mark.parametrize(("csv", "message"), [
    (listing(lambda c, i: "a") + "cat/999.png,a\n",
     r"names 1 file that is not in data.source's class folders \(the first: cat/999.png\): remove those rows or add the files\.$"),
    (listing(lambda c, i: "a" if (c, i) != ("dog", 5) else "b"),
     r"^group site=b has 1 image in .*groups.csv: each group needs at least data.group_min_images \(3\) for its "
     r"figures: add images or merge it into another group\.$"),
    ("".join(listing(lambda c, i: "a").splitlines(keepends=True)[:-1]),
     r"^1 image of data.source is in no group of .*groups.csv \(the first: dog/005.png\): add a row for each\.$"),
    ("file,site\n", r"needs a header of path and one named column per attribute \(e.g. path,site\), got file,site"),
    (listing(lambda c, i: "a") + "cat/000.png,a\n", r"lists cat/000.png twice \(line 14\): keep one row per image\.$"),
    (listing(lambda c, i: "a" if i else ""), r"line 2: cat/000.png has no site: give every image a value"),
])
def test_a_bad_groups_csv_is_one_sentence_and_prepare_writes_nothing(tmp_path, csv, message):
    _, raw = grouped(tmp_path, csv)
    with pytest.raises(TunedeckError, match=message):
        prepare(parse_params(raw), tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_train_without_must_name_a_group_the_csv_has(tmp_path):
    _, raw = grouped(tmp_path, listing(lambda c, i: "a" if i % 2 else "b"))
    raw["data"]["train_without"] = ["site=c"]
    with pytest.raises(TunedeckError, match=r"site has no group 'c' in groups.csv \(it has a, b\): name one of those\.$"):
        prepare(parse_params(raw), tmp_path / "prepared")
    raw["data"].update(groups=None)
    with pytest.raises(TunedeckError, match="data.train_without names groups, but data.groups names no groups CSV"):
        parse_params(raw)


def test_prepare_stores_each_splits_groups_and_train_without_leaves_them_out_of_training_only(tmp_path):
    _, raw = grouped(tmp_path, listing(lambda c, i: "a" if i % 2 else "b"))
    raw["data"].update(val_fraction=0.2, test_fraction=0.3)
    prepare(parse_params(raw), tmp_path / "all")
    raw["data"]["train_without"] = ["site=b"]
    prepare(parse_params(raw), tmp_path / "without")
    whole, less = (json.loads((tmp_path / f / "groups.json").read_text()) for f in ("all", "without"))
    assert whole["attributes"] == {"site": ["a", "b"]} and set(whole["splits"]["train"]["site"]) == {0, 1}
    assert set(less["splits"]["train"]["site"]) == {0}, "no site b image is trained on"
    assert less["splits"]["test"] == whole["splits"]["test"] and less["splits"]["val"] == whole["splits"]["val"]
    assert np.array_equal(np.load(tmp_path / "all" / "test_x.npy"), np.load(tmp_path / "without" / "test_x.npy"))


def split_of(sites: list[int]) -> groups.SplitGroups:
    return groups.SplitGroups({"site": ["a", "b"]}, {"site": np.asarray(sites)})


def test_the_group_check_rejects_a_certain_drop_of_the_worst_group_and_not_an_uncertain_one():
    labels = np.zeros(200, dtype=np.int64)
    sites = [0] * 100 + [1] * 100
    prod = np.zeros(200, dtype=np.int64)
    prod[100:110] = 1  # prod: a 100 %, b 90 %
    worse = prod.copy()
    worse[110:150] = 1  # candidate: b 50 %, certainly more than 0.05 below
    slightly = prod.copy()
    slightly[110:113] = 1  # candidate: b 87 %, 3 points below: within the tolerance
    checks, reasons = groups.compare(labels, worse, prod, split_of(sites), 0.05, None)
    assert checks[0]["worst"] == "b" and checks[0]["worst_accuracy"] == pytest.approx(0.5)
    assert len(reasons) == 1 and reasons[0].startswith("the worst site group (b: 0.5000) is 0.4000 ["), reasons
    assert groups.compare(labels, slightly, prod, split_of(sites), 0.05, None)[1] == []
    # the gap ceiling: b's 10-point gap is certain above 0.02, not above 0.2
    assert "above promote.max_group_gap 0.02" in groups.compare(labels, prod, None, split_of(sites), 0.05, 0.02)[1][0]
    assert groups.compare(labels, prod, None, split_of(sites), 0.05, 0.2)[1] == []
    # a group with too few test images is left out of the check
    assert groups.compare(labels[:105], worse[:105], prod[:105], split_of(sites[:105]), 0.05, None)[0][0]["worst"] == "a"


def test_a_group_too_small_for_an_interval_says_so():
    probs = np.eye(3)[np.r_[np.zeros(30, int), np.ones(5, int)]]
    figures = groups.report(np.r_[np.zeros(30, int), np.ones(5, int)], probs, split_of([0] * 30 + [1] * 5), list("xyz"), 200)
    assert figures["site"]["groups"]["b"] == {"n": 5, "note": "5 test images: too few for an interval (at least 10), no figure"}
    assert figures["site"]["groups"]["a"]["accuracy"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert "gap" not in figures["site"] and figures["site"]["gap_note"].startswith("fewer than two site groups")


@pytest.mark.slow
def test_a_harder_group_shows_its_gap_and_the_gate_rejects_a_model_trained_without_it(tmp_path):
    source = shapes(tmp_path / "shapes", 60)
    root = tmp_path / "clone"
    params = {}
    for name, lr, without in (("prod", 0.01, []), ("with", 0.012, []), ("without", 0.01, ["site=b"])):
        raw = tiny_params_dict(str(source))  # one seed: one split, so the three share their test images
        raw["data"].update(groups="groups.csv", image_size=24, val_fraction=0.2, test_fraction=0.4, train_without=without)
        raw["train"].update(epochs=8, lr=lr)  # "with": another model trained on both sites
        raw["promote"].update(tolerance=1.0, max_class_drop=1.0)  # only the group check can reject here
        params[name] = parse_params(raw)
        prepare(params[name], tmp_path / name / "prepared")
        train(params[name], tmp_path / name / "prepared", tmp_path / name / "models")
    (root / "data").mkdir(parents=True)
    (tmp_path / "prod" / "prepared").rename(root / "data" / "prepared")  # the test split: the same images for all three
    for name in ("with", "without"):
        assert np.array_equal(np.load(tmp_path / name / "prepared" / "test_x.npy"), np.load(root / "data" / "prepared" / "test_x.npy"))
    evaluate(params["prod"], root / "data" / "prepared", tmp_path / "prod" / "models", root / "eval")
    gap = json.loads((root / "eval" / "groups.json").read_text())["site"]
    assert gap["worst"] == "b" and gap["gap"]["difference"]["low"] > 0, gap
    assert yaml.safe_dump(json.loads((root / "eval" / "groups_plot.json").read_text()))
    headline = json.loads((root / "eval" / "groups_metrics.json").read_text())["site"]
    assert headline["worst_accuracy"] == gap["groups"]["b"]["accuracy"]["value"] and headline["gap_low"] > 0
    overlays = sorted(p.name for p in (root / "eval" / "explain").glob("*.png"))  # evaluate's Grad-CAM sample
    assert len(overlays) == 12 and any("-wrong-as-" in n for n in overlays) and any("-right-as-" in n for n in overlays)
    sanity = json.loads((root / "eval" / "explain" / "sanity.json").read_text())
    assert len(sanity["per_image"]) == 12 and sanity["verdict"].startswith("sanity check (model randomisation")
    assert json.loads((root / "eval" / "metrics.json").read_text())["gradcam_sanity_rho"] == sanity["spearman_trained_vs_random"]
    labels = np.load(root / "data" / "prepared" / "test_y.npy")
    split = groups.load(root / "data" / "prepared")
    prod_figures, _, prod_pred = figures_of(tmp_path / "prod" / "models" / "model.safetensors", root, params["prod"])
    verdicts = {}
    for name in ("with", "without"):
        figures, _, pred = figures_of(tmp_path / name / "models" / "model.safetensors", root, params[name])
        checks, reasons = groups.compare(labels, pred, prod_pred, split, 0.05, None)
        verdicts[name] = decide(figures, prod_figures, 1.0, 1.0, checks, reasons)
    assert verdicts["with"].promote, verdicts["with"].reasons
    rejected = verdicts["without"]
    assert not rejected.promote and rejected.groups[0]["worst"] == "b", rejected.to_dict()
    assert rejected.reasons[0].startswith("the worst site group (b: "), rejected.reasons
