"""MODEL_CARD.md, written at each promotion, in the Hugging Face model-card format: YAML front
matter with `model-index` results, then what a reader needs to trust and use the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from flows.contracts import ModelCard


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states, gathered by the promotion."""

    card: ModelCard
    params: dict
    metrics: dict  # eval/metrics.json
    per_class: dict  # eval/per_class.json
    version: str  # the registry version this promotion creates
    code_commit: str
    gate: str  # the gate's one-sentence verdict
    groups: dict = field(default_factory=dict)  # eval/groups.json (data.groups), {} when none
    approved_by: str = "unknown"  # who promoted it (git identity)
    explanations: tuple[str, ...] = ()  # eval/explain/'s overlay files (Grad-CAM)
    sanity: str = ""  # the randomisation check's sentence (eval/explain/sanity.json)


def front_matter(facts: CardFacts) -> dict:
    """The card's YAML header: library, task, base model and the model-index results."""
    m = facts.metrics
    results = [{"type": "accuracy", "value": round(m.get("accuracy", 0.0), 4), "name": "Test accuracy"},
               {"type": "f1", "value": round(m.get("macro_f1", 0.0), 4), "name": "Macro F1", "args": {"average": "macro"}}]
    for key, name in (("ece", "ECE (15 bins, temperature applied)"), ("nll", "NLL"), ("brier", "Brier score")):
        if key in m:
            results.append({"type": key, "value": round(m[key], 4), "name": name})
    header = {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "tunedeck", "transfer-learning"],
        "model-index": [{
            "name": f"{facts.card.model_name}-tunedeck-{facts.version}",
            "results": [{"task": {"type": "image-classification", "name": "Image Classification"},
                         "dataset": {"name": str(facts.params.get("data", {}).get("source", "")), "type": "imagefolder",
                                     "split": "test", "revision": facts.card.data_version},
                         "metrics": results}],
        }],
    }
    if not facts.card.weights_from.endswith((".safetensors", ".pth", ".pt", ".bin")) and facts.card.weights_from != "random":
        header["base_model"] = facts.card.weights_from
    return header


def render(facts: CardFacts) -> str:
    """The whole MODEL_CARD.md: front matter, then its sections in the order a reader asks about them."""
    front = yaml.safe_dump(front_matter(facts), sort_keys=False).strip()
    sections = (_use(facts), _limitations(facts), _training(facts), _test_metrics(facts), _calibration(facts),
                _lineage(facts))
    return f"---\n{front}\n---\n\n" + "\n".join(sections)


def _use(facts: CardFacts) -> str:
    card = facts.card
    return f"""# {card.model_name} fine-tuned by tunedeck — {facts.version}

A {card.model_name} image classifier over {len(card.classes)} classes ({", ".join(card.classes)}),
fine-tuned from `{card.weights_from}` at {card.image_size} px.

## Use

```
tunedeck predict --model {facts.version} --input DIR --out predictions.parquet
dvc artifacts get . model --rev {facts.version} -o model.safetensors
```

The `.safetensors` file's metadata holds the classes, input size, normalisation
(mean {[round(x, 4) for x in card.mean]}, std {[round(x, 4) for x in card.std]}, {card.interpolation}) and the
temperature {card.temperature}; predict divides the logits by it before the softmax.
"""


def _limitations(facts: CardFacts) -> str:
    card, m, p = facts.card, facts.metrics, facts.params
    return f"""## Intended use and limitations

- Intended for images like those of the training folder (`{p.get("data", {}).get("source", "")}`): same
  kind of subject, framing and classes. It always answers one of its {len(card.classes)} classes; an image of
  none of them still gets one, with a confidence that is only as good as the calibration below.
- Measured on {m.get("n_test", 0)} test images; a class with few test images has a wide uncertainty on its
  figures. Watch new data for drift before trusting it on another source.
- Not evaluated for fairness, robustness to adversarial inputs, or any safety-critical use.
"""


def _training(facts: CardFacts) -> str:
    card, p = facts.card, facts.params
    train = p.get("train", {})
    return f"""## Training

| param | value |
|---|---|
| base weights | `{card.weights_from}` |
| epochs (best) | {train.get("epochs")} ({card.best_epoch}, {card.weights} weights) |
| batch | {card.micro_batch} x {card.accum_steps} |
| lr / weight decay | {train.get("lr")} / {train.get("weight_decay")} |
| optimizer / scheduler | {train.get("optimizer")} / {train.get("scheduler")} |
| frozen epochs | {train.get("freeze_epochs")} |
| seed | {p.get("base", {}).get("seed")} |
| train time | {card.train_seconds} s |
"""


def _test_metrics(facts: CardFacts) -> str:
    m = facts.metrics
    rows = "\n".join(f"| {name} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |"
                     for name, s in facts.per_class.items())
    return f"""## Test metrics

| metric | value |
|---|---|
| accuracy | {m.get("accuracy", 0):.4f} |
| macro F1 | {m.get("macro_f1", 0):.4f} |
| val accuracy (best epoch) | {facts.card.val_accuracy} |

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}
"""


def _calibration(facts: CardFacts) -> str:
    card, m = facts.card, facts.metrics
    return f"""## Calibration

| | raw | with temperature {card.temperature} |
|---|---|---|
| ECE (15 bins) | {m.get("ece_raw", float("nan")):.4f} | {m.get("ece", float("nan")):.4f} |
| NLL | {m.get("nll_raw", float("nan")):.4f} | {m.get("nll", float("nan")):.4f} |
| Brier | | {m.get("brier", float("nan")):.4f} |

The reliability diagram is the DVC plot `eval/reliability.json` (`dvc plots show`).
"""


def _lineage(facts: CardFacts) -> str:
    card = facts.card
    return f"""## Lineage

| | |
|---|---|
| registry version | {facts.version} (`model@{facts.version}`, GTO tag) |
| data version (DVC md5 of the source) | {card.data_version} |
| model sha256 | {card.sha256} |
| code commit | {facts.code_commit} |
| promotion gate | {facts.gate} |
| approved by | {facts.approved_by} |
""" + _groups(facts) + _explanations(facts) + _privacy(facts)


def _privacy(facts: CardFacts) -> str:
    """A federated run's privacy promise: DP-SGD's settings, each silo's (epsilon, delta), secure aggregation."""
    privacy = facts.card.privacy
    if not privacy:
        return ""
    dp = privacy.get("dp_sgd")
    rows = ["", "## Privacy", ""]
    if dp:
        rows += [f"Trained by federated DP-SGD (Opacus): each image's gradient clipped to {dp['clip_norm']:g}, Gaussian "
                 f"noise, Poisson-sampled batches; {privacy['composition']}.", "",
                 "| silo | rounds taken | ε | δ | noise multiplier | sampling rate |", "|---|---|---|---|---|---|"]
        for name, s in privacy["silos"].items():
            rows.append(f"| {name} | {s.get('rounds', 0)} | {s['epsilon']:.3f} | {s['delta']:.3g} | "
                        f"{s['noise_multiplier']:.3g} | {s['sample_rate']:.3g} |" if "epsilon" in s
                        else f"| {name} | {s.get('rounds', 0)} | 0 (took no DP round) | | | |")
    else:
        rows.append("No differential privacy: the silos' updates carry what their images taught the model.")
    rows += ["", "Secure aggregation: the coordinator saw only the sum of the silos' updates in each round."
             if privacy.get("secure_aggregation") else "No secure aggregation: the coordinator saw each silo's update."]
    return "\n".join(rows) + "\n"


def _explanations(facts: CardFacts) -> str:
    """A few Grad-CAM overlays linked, and the sanity check's figure."""
    if not facts.explanations:
        return ""
    links = "\n".join(f"- [{name}](eval/explain/{name})" for name in facts.explanations[:4])
    return (f"\n## Explanations\n\nGrad-CAM overlays of a seeded sample of test images ({len(facts.explanations)} in "
            f"`eval/explain/`), for instance:\n\n{links}\n\n{facts.sanity}.\n")


def _groups(facts: CardFacts) -> str:
    """Per-group test accuracy with its 95 % interval, the worst group and its gap (data.groups)."""
    if not facts.groups:
        return ""
    rows = ["", "## Groups", "", "Test accuracy per group (seeded bootstrap 95 % intervals; eval/groups.json has macro-F1, "
            "per-class recall and ECE too):", "", "| attribute | group | images | accuracy [95 % interval] |", "|---|---|---|---|"]
    for attribute, entry in facts.groups.items():
        for value, g in entry["groups"].items():
            shown = (f"{g['accuracy']['value']:.4f} [{g['accuracy']['low']:.4f}, {g['accuracy']['high']:.4f}]"
                     if "accuracy" in g else g["note"])
            rows.append(f"| {attribute} | {value} | {g['n']} | {shown} |")
        if "gap" in entry:
            d = entry["gap"]["difference"]
            rows += ["", f"Worst {attribute} group: {entry['worst']}; gap to the best {d['value']:.4f} "
                     f"[{d['low']:.4f}, {d['high']:.4f}]."]
    return "\n".join(rows) + "\n"
