"""Image validation, the stratified split and the prepare stage's stored arrays."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from flows.core.errors import TunedeckError
from flows.core.images import decode_folder, folder_version
from flows.core.prepare import load_manifest, load_split, prepare
from flows.core.split import stratified_split
from tests.conftest import write_images


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_broken_files_are_skipped_and_reported(image_folder):
    (image_folder / "cat" / "empty.png").write_bytes(b"")
    good = (image_folder / "dog" / "000.png").read_bytes()
    (image_folder / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (image_folder / "fox" / "notes.txt").write_text("not an image")
    before = snapshot(image_folder)
    decoded = decode_folder(image_folder, 16)
    reasons = {Path(r.path).name: r.reason for r in decoded.rejected}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["truncated.png"].startswith("broken image")
    assert reasons["notes.txt"] == "not an image"
    assert decoded.images.shape == (36, 16, 16, 3) and decoded.images.dtype == np.uint8
    assert snapshot(image_folder) == before, "the source folder must never change"


def test_empty_class_folder_is_left_out_and_reported(image_folder):
    (image_folder / "zebra").mkdir()
    decoded = decode_folder(image_folder, 16)
    assert decoded.classes == ("cat", "dog", "fox")
    assert any("no usable images" in r.reason for r in decoded.rejected)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "has no class sub-folders"),
        (lambda root: write_images(root / "one", {"only": 3}), "needs at least 2 classes with usable images (found only 'only')"),
        (lambda root: (root / "f.txt").write_text("x") and root / "f.txt", "is a file, not a folder"),
    ],
)
def test_unusable_sources_are_one_sentence(tmp_path, make, expected):
    with pytest.raises(TunedeckError) as err:
        decode_folder(make(tmp_path), 16)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_two_classes_left_after_broken_ones(tmp_path):
    folder = write_images(tmp_path / "src", {"a": 3, "b": 3})
    (folder / "c").mkdir()
    (folder / "c" / "x.jpg").write_bytes(b"\xff\xd8garbage")
    decoded = decode_folder(folder, 16)
    assert decoded.classes == ("a", "b")


def test_split_is_stratified_deterministic_and_disjoint():
    labels = np.repeat(np.arange(3), [20, 40, 10])
    a = stratified_split(labels, 0.2, 0.2, seed=1)
    b = stratified_split(labels, 0.2, 0.2, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    together = np.concatenate(list(a.values()))
    assert len(np.unique(together)) == len(labels)
    for c, n in zip(range(3), [20, 40, 10], strict=True):
        assert (labels[a["test"]] == c).sum() == round(n * 0.2)
    assert not np.array_equal(a["test"], stratified_split(labels, 0.2, 0.2, seed=2)["test"])


def test_split_keeps_a_training_image_and_honours_the_limit():
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    split = stratified_split(labels, 0.5, 0.5, seed=0, limit_per_class=1)
    assert (labels[split["train"]] == 0).sum() == 1 and (labels[split["train"]] == 1).sum() == 1


def test_prepare_stores_decoded_splits(tiny_params, tmp_path, image_folder):
    result = prepare(tiny_params, tmp_path / "prepared")
    x, y = load_split(tmp_path / "prepared", "train")
    assert x.dtype == np.uint8 and x.shape[1:] == (16, 16, 3) and len(x) == len(y) == result.counts["train"]
    manifest = load_manifest(tmp_path / "prepared")
    assert manifest.classes == ["cat", "dog", "fox"] and sum(manifest.counts.values()) == 36
    assert json.loads((tmp_path / "prepared" / "rejected.json").read_text()) == []
    assert (tmp_path / "prepared" / "params.yaml").is_file()
    assert result.data_version == folder_version(image_folder)


def test_a_split_with_no_test_image_is_refused(tiny_params, tmp_path):
    params = tiny_params.model_copy(update={"data": tiny_params.data.model_copy(update={"test_fraction": 0.01})})
    with pytest.raises(TunedeckError, match="data.test_fraction 0.01 leaves no test image"):
        prepare(params, tmp_path / "prepared")


def test_an_image_over_pillows_pixel_limit_is_rejected_and_prepare_goes_on(tmp_path, image_folder, tiny_params):
    """A 16,000 x 16,000 PNG (32 KB on disk, a scanner's panorama or a bomb) is listed in rejected.json, not fatal."""
    from PIL import Image

    bomb = image_folder / "cat" / "panorama.png"
    Image.new("1", (16_000, 16_000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    result = prepare(tiny_params, tmp_path / "prepared")
    rejected = json.loads((tmp_path / "prepared" / "rejected.json").read_text())
    assert [r["path"] for r in rejected] == [str(bomb)]
    assert rejected[0]["reason"].startswith("too large to decode safely (256 megapixels, over the limit of 179")
    assert result.rejected == 1 and sum(result.counts.values()) == 36


PEAK_RSS = """
import resource, sys
from pathlib import Path
from flows.core.params import parse_params
from flows.core.prepare import prepare
from tests.conftest import tiny_params_dict
raw = tiny_params_dict(sys.argv[1])
raw["data"]["image_size"] = 64
prepare(parse_params(raw), Path(sys.argv[2]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


@pytest.mark.slow
def test_prepares_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """2,000 against 8,000 images at 64 px (74 MB more pixels): the peak RSS of a fresh process stays flat.

    Measured once against the previous prepare (an in-memory stack, then a copy per split): 107 → 263 MiB;
    this one: 70 → 77 MiB."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    peaks = {}
    for n in (2000, 8000):
        source = write_images(tmp_path / f"src{n}", {"a": n // 2, "b": n - n // 2}, size=8, seed=n)
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(source), str(tmp_path / f"out{n}")], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        peaks[n] = int(out.stdout.split()[-1]) / 1024
    # the baseline is the data itself: the extra images' decoded pixels. Measured growth: 0.1 of them
    # (70 -> 77 MiB); the previous prepare, which held a stack of them and a copy per split, grew by 2.1.
    pixels_mib = (8000 - 2000) * 64 * 64 * 3 / 2**20
    growth = (peaks[8000] - peaks[2000]) / pixels_mib
    assert growth < 0.5, f"peak RSS {peaks} MiB grew by {growth:.2f} of the {pixels_mib:.0f} MiB of extra pixels"
    print(f"peak RSS {peaks[2000]:.0f} MiB for 2,000 images, {peaks[8000]:.0f} MiB for 8,000")
