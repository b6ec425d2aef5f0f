"""Groups of images (a site, a camera, a device, a skin tone), declared once, and what each group earns.

A user declares groups in a CSV inside data.source (so DVC versions it with the images), named by
``data.groups``: a ``path`` column (relative to data.source, as ``cat/001.jpg``) and one column per
attribute (``site``, ``camera``...). Prepare checks it before it decodes anything (a row naming a
missing file, an image in no group, a group too small: one sentence each, nothing written), then stores
every split's group of each image in data/prepared/groups.json.

Evaluate reports, per attribute and group, accuracy, macro-F1, per-class recall and calibration (ECE),
each with a seeded bootstrap 95 % interval (fairlearn's MetricFrame), and the worst-group gap (best
minus worst accuracy, and worst over best) with its interval; a group with too few test images for an
interval says so instead of a number. The gate compares a candidate's worst group with prod's on the same
test images, by a paired bootstrap: it rejects only what the interval makes certain.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.core.errors import TunedeckError

GROUPS_FILE = "groups.json"  # in data/prepared
MIN_FOR_INTERVAL = 10  # test images a group needs for an interval (fewer: said, not printed)
RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class GroupTable:
    """The groups CSV, checked: its attributes' values (sorted) and each listed file's value per attribute."""

    file: str
    md5: str
    attributes: dict[str, list[str]]
    rows: dict[str, tuple[str, ...]]  # path relative to data.source -> one value per attribute, in attribute order

    def codes(self, paths: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
        """Each attribute's value index for every path (the images prepare wrote, in order)."""
        out = {}
        for a, (attribute, values) in enumerate(self.attributes.items()):
            index = {v: i for i, v in enumerate(values)}
            out[attribute] = np.array([index[self.rows[p][a]] for p in paths], dtype=np.int64)
        return out

    def without(self, items: list[str]) -> list[tuple[int, int]]:
        """(attribute position, value index) of each attribute=value in items (data.train_without), checked."""
        names = list(self.attributes)
        found = []
        for item in items:
            attribute, value = (part.strip() for part in item.split("=", 1))
            if attribute not in self.attributes:
                raise TunedeckError(f"data.train_without '{item}': the groups CSV {self.file} has no attribute "
                                    f"'{attribute}' (it has {', '.join(names)}): name one of those.")
            if value not in self.attributes[attribute]:
                raise TunedeckError(f"data.train_without '{item}': {attribute} has no group '{value}' in {self.file} "
                                    f"(it has {', '.join(self.attributes[attribute])}): name one of those.")
            found.append((names.index(attribute), self.attributes[attribute].index(value)))
        return found


    def kept(self, indices: np.ndarray, paths: list[str], items: list[str]) -> np.ndarray:
        """indices less those whose image (paths, alike) is in a group of items (attribute=value)."""
        left_out = self.without(items)
        keep = [i for i, path in zip(indices, paths, strict=True)
                if not any(self.rows[path][a] == list(self.attributes.values())[a][v] for a, v in left_out)]
        return np.asarray(keep, dtype=np.asarray(indices).dtype)


def read_groups(source: Path, name: str, files: list[str], min_images: int) -> GroupTable:
    """The groups CSV source/name, checked against files (every file under the class folders, relative)."""
    path = Path(source) / name
    where = f"the groups CSV {path}"
    try:
        data = path.read_bytes()
    except OSError:
        raise TunedeckError(f"data.groups '{name}': no such file in data.source '{source}': put the CSV beside the "
                            "class folders, or set data.groups: null.") from None
    try:
        lines = list(csv.reader(data.decode("utf-8-sig").splitlines()))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TunedeckError(f"{where} cannot be read as UTF-8 CSV ({exc}): save it as CSV.") from None
    header = [h.strip() for h in lines[0]] if lines else []
    if len(header) < 2 or header[0] != "path" or not all(header[1:]) or len(set(header)) != len(header):
        raise TunedeckError(f"{where} needs a header of path and one named column per attribute (e.g. path,site), "
                            f"got {','.join(header) or 'nothing'}: fix its first line.")
    rows: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in line):
            continue
        if len(line) != len(header):
            raise TunedeckError(f"{where}, line {number}, has {len(line)} fields where the header has {len(header)}: "
                                "give each row a path and one value per attribute.")
        key = Path(line[0].strip()).as_posix().removeprefix("./")
        values = tuple(cell.strip() for cell in line[1:])
        if key in rows:
            raise TunedeckError(f"{where} lists {key} twice (line {number}): keep one row per image.")
        if not all(values):
            empty = header[1 + values.index("")]
            raise TunedeckError(f"{where}, line {number}: {key} has no {empty}: give every image a value for every attribute.")
        rows[key] = values
    known = set(files)
    missing = [p for p in rows if p not in known]
    if missing:
        raise TunedeckError(f"{where} names {len(missing)} file{'s' if len(missing) > 1 else ''} that "
                            f"{'are' if len(missing) > 1 else 'is'} not in data.source's class folders (the first: "
                            f"{missing[0]}): remove those rows or add the files.")
    unlisted = [f for f in files if f not in rows]
    if unlisted:
        raise TunedeckError(f"{len(unlisted)} image{'s' if len(unlisted) > 1 else ''} of data.source "
                            f"{'are' if len(unlisted) > 1 else 'is'} in no group of {path} (the first: {unlisted[0]}): "
                            "add a row for each.")
    attributes = {}
    for a, attribute in enumerate(header[1:]):
        counts: dict[str, int] = {}
        for values in rows.values():
            counts[values[a]] = counts.get(values[a], 0) + 1
        small = sorted((n, v) for v, n in counts.items() if n < min_images)
        if small:
            n, value = small[0]
            raise TunedeckError(f"group {attribute}={value} has {n} image{'s' if n > 1 else ''} in {path}: each group "
                                f"needs at least data.group_min_images ({min_images}) for its figures: add images or "
                                "merge it into another group.")
        attributes[attribute] = sorted(counts)
    return GroupTable(name, hashlib.md5(data).hexdigest(), attributes, rows)


def save(table: GroupTable, splits: dict[str, list[str]], out: Path) -> None:
    """prepared/groups.json: the attributes and every split's group indices, in the split's order."""
    record = {"file": table.file, "md5": table.md5, "attributes": table.attributes,
              "splits": {name: {a: c.tolist() for a, c in table.codes(paths).items()} for name, paths in splits.items()}}
    (out / GROUPS_FILE).write_text(json.dumps(record))


@dataclass(frozen=True)
class SplitGroups:
    """One split's groups: the attributes' values and each image's value index per attribute."""

    attributes: dict[str, list[str]]
    codes: dict[str, np.ndarray]


def load(prepared: Path, split: str = "test") -> SplitGroups | None:
    """The split's groups from prepared/groups.json; None when the data declares no groups."""
    path = prepared / GROUPS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return SplitGroups(record["attributes"], {a: np.asarray(c, dtype=np.int64) for a, c in record["splits"][split].items()})
    except (ValueError, KeyError) as exc:
        raise TunedeckError(f"{path} is damaged ({exc}): run the prepare stage again (`dvc repro prepare`).") from None


def _interval(value: float, low: float, high: float) -> dict:
    return {"value": round(float(value), 6), "low": round(float(low), 6), "high": round(float(high), 6)}


def _metrics(classes: list[str]) -> dict:
    """Each figure reported per group, as f(true labels, predictions, top-class probabilities) -> float."""
    from flows.core.calibration import ece_of

    def macro_f1(t, p, confidence=None):
        scores = []
        for c in range(len(classes)):
            right, predicted, actual = np.sum((p == c) & (t == c)), np.sum(p == c), np.sum(t == c)
            scores.append(2.0 * right / (predicted + actual) if predicted + actual else 0.0)
        return float(np.mean(scores))

    metrics = {"accuracy": lambda t, p, confidence=None: float(np.mean(t == p)) if len(t) else 0.0,
               "macro_f1": macro_f1,
               "ece": lambda t, p, confidence=None: ece_of(confidence, t == p)}
    for i, name in enumerate(classes):
        metrics[f"recall/{name}"] = lambda t, p, confidence=None, i=i: float(np.mean(p[t == i] == i)) if np.any(t == i) else 0.0
    return metrics


def report(labels: np.ndarray, probs: np.ndarray, groups: SplitGroups, classes: list[str],
           resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Per attribute: each group's figures with bootstrap intervals, and the worst group and its gap.

    The figures are fairlearn's MetricFrame's (by group, difference and ratio); their intervals come from
    the test images resampled with replacement, seeded, each resample's groups scored with the same
    functions (MetricFrame's own bootstrap builds a frame per resample: 6 s for 1,000 of one metric)."""
    import pandas as pd
    from fairlearn.metrics import MetricFrame

    labels = np.asarray(labels)
    probs = np.asarray(probs)
    pred = probs.argmax(axis=1) if len(labels) else labels
    confidence = probs.max(axis=1) if len(labels) else np.zeros(0)
    tail = (1.0 - LEVEL) / 2.0
    metrics = _metrics(classes)
    out = {}
    for attribute, values in groups.attributes.items():
        codes = groups.codes[attribute]
        sizes = np.bincount(codes, minlength=len(values))
        entry: dict = {"groups": {}}
        big = [k for k, n in enumerate(sizes) if n >= MIN_FOR_INTERVAL]
        for k, n in enumerate(sizes):
            if n < MIN_FOR_INTERVAL:
                entry["groups"][values[k]] = {"n": int(n), "note": f"{n} test image{'s' if n != 1 else ''}: too few "
                                              f"for an interval (at least {MIN_FOR_INTERVAL}), no figure"}
        if big:
            keep = np.isin(codes, big)
            frame = MetricFrame(metrics=metrics, y_true=labels[keep], y_pred=pred[keep],
                                sensitive_features=pd.Series(np.array(values, dtype=object)[codes[keep]], name=attribute),
                                sample_params={m: {"confidence": confidence[keep]} for m in metrics})
            point = frame.by_group
            boot = np.empty((resamples, len(big), len(metrics)))
            rng = np.random.default_rng(seed)
            for r in range(resamples):
                idx = rng.integers(0, len(labels), len(labels))
                for j, k in enumerate(big):
                    mine = idx[codes[idx] == k]
                    t, p, c = labels[mine], pred[mine], confidence[mine]
                    boot[r, j] = [f(t, p, c) for f in metrics.values()]
            low, high = np.quantile(boot, [tail, 1.0 - tail], axis=0)
            for j, k in enumerate(big):
                figures = {m: _interval(point.loc[values[k], m], low[j, i], high[j, i]) for i, m in enumerate(metrics)}
                entry["groups"][values[k]] = {
                    "n": int(sizes[k]), "accuracy": figures["accuracy"], "macro_f1": figures["macro_f1"], "ece": figures["ece"],
                    "recall": {name: figures[f"recall/{name}"] for name in classes}}
            entry["worst"] = values[min(big, key=lambda k: point.loc[values[k], "accuracy"])]
            if len(big) > 1:
                accuracy = boot[:, :, 0]
                gaps = accuracy.max(axis=1) - accuracy.min(axis=1)
                ratios = accuracy.min(axis=1) / np.maximum(accuracy.max(axis=1), 1e-12)
                entry["gap"] = {"difference": _interval(frame.difference()["accuracy"], *np.quantile(gaps, [tail, 1.0 - tail])),
                                "ratio": _interval(frame.ratio()["accuracy"], *np.quantile(ratios, [tail, 1.0 - tail]))}
        if "gap" not in entry:
            entry["gap_note"] = f"fewer than two {attribute} groups with {MIN_FOR_INTERVAL} test images: no gap"
        out[attribute] = {k: entry[k] for k in ("worst", "gap", "gap_note", "groups") if k in entry}
    return out


def headline(figures: dict) -> dict:
    """Per attribute: the worst group's accuracy and the gap to the best (with its interval's ends)."""
    out = {}
    for attribute, entry in figures.items():
        if "worst" not in entry:
            continue
        row = {"worst_accuracy": entry["groups"][entry["worst"]]["accuracy"]["value"]}
        if "gap" in entry:
            gap = entry["gap"]["difference"]
            row.update(gap=gap["value"], gap_low=gap["low"], gap_high=gap["high"])
        out[attribute] = row
    return out


def plot_rows(figures: dict) -> list[dict]:
    """Rows for the DVC plot of each group's accuracy and its interval."""
    return [{"group": f"{attribute}={value}", "accuracy": g["accuracy"]["value"], "low": g["accuracy"]["low"],
             "high": g["accuracy"]["high"], "n": g["n"]}
            for attribute, entry in figures.items() for value, g in entry["groups"].items() if "accuracy" in g]


def _group_accuracy(right: np.ndarray, codes: np.ndarray, groups: list[int]) -> np.ndarray:
    """Accuracy of each group (columns) in each row of right (resamples x images, with codes alike)."""
    out = np.empty((right.shape[0], len(groups)))
    for j, k in enumerate(groups):
        member = codes == k
        out[:, j] = (right & member).sum(axis=1) / np.maximum(member.sum(axis=1), 1)
    return out


def compare(labels: np.ndarray, candidate: np.ndarray, prod: np.ndarray | None, groups: SplitGroups,
            max_worst_drop: float, max_gap: float | None, resamples: int = RESAMPLES,
            seed: int = SEED) -> tuple[list[dict], list[str]]:
    """The gate's group check: per attribute, the candidate's worst group against prod's (a paired bootstrap over
    the same test images) and its gap; (the figures, the reasons to reject)."""
    labels = np.asarray(labels)
    right_c = np.asarray(candidate) == labels
    right_p = None if prod is None else np.asarray(prod) == labels
    tail = (1.0 - LEVEL) / 2.0
    checks, reasons = [], []
    rng = np.random.default_rng(seed)
    for attribute, values in groups.attributes.items():
        codes = groups.codes[attribute]
        big = [k for k, n in enumerate(np.bincount(codes, minlength=len(values))) if n >= MIN_FOR_INTERVAL]
        if not big or not len(labels):
            continue
        idx = rng.integers(0, len(labels), size=(resamples, len(labels)))
        whole = np.arange(len(labels))[None, :]
        acc_c, boot_c = _group_accuracy(right_c[whole], codes[whole], big)[0], _group_accuracy(right_c[idx], codes[idx], big)
        check: dict = {"attribute": attribute, "worst": values[big[int(acc_c.argmin())]],
                       "worst_accuracy": round(float(acc_c.min()), 6)}
        if len(big) > 1:
            gaps = boot_c.max(axis=1) - boot_c.min(axis=1)
            check["gap"] = _interval(acc_c.max() - acc_c.min(), *np.quantile(gaps, [tail, 1.0 - tail]))
            if max_gap is not None and check["gap"]["low"] > max_gap + 1e-12:
                g = check["gap"]
                reasons.append(f"the gap between {attribute} groups' accuracy is {g['value']:.4f} [{g['low']:.4f}, "
                               f"{g['high']:.4f}] (worst: {check['worst']}), above promote.max_group_gap {max_gap}")
        if right_p is not None:
            acc_p, boot_p = _group_accuracy(right_p[whole], codes[whole], big)[0], _group_accuracy(right_p[idx], codes[idx], big)
            check["prod_worst"] = values[big[int(acc_p.argmin())]]
            check["prod_worst_accuracy"] = round(float(acc_p.min()), 6)
            drops = boot_c.min(axis=1) - boot_p.min(axis=1)
            d = check["worst_change"] = _interval(acc_c.min() - acc_p.min(), *np.quantile(drops, [tail, 1.0 - tail]))
            if d["high"] < -max_worst_drop - 1e-12:
                reasons.append(f"the worst {attribute} group ({check['worst']}: {check['worst_accuracy']:.4f}) is "
                               f"{-d['value']:.4f} [{-d['high']:.4f}, {-d['low']:.4f}] below prod's worst "
                               f"({check['prod_worst']}: {check['prod_worst_accuracy']:.4f}), more than "
                               f"promote.max_worst_group_drop {max_worst_drop}")
        checks.append(check)
    return checks, reasons
