"""Why did the model decide: Grad-CAM maps (pytorch-grad-cam), overlays, and a sanity check of them.

Grad-CAM weighs a layer's activations by the gradient of the class score: the layer is the last
feature stage of a CNN (timm's ``feature_info``) or, for a vision transformer, the last block's first
norm, whose patch tokens are laid back on their grid (the class and register tokens dropped).

A map is only worth showing if it depends on what the model learnt. The model-randomisation test of
Adebayo et al. (NeurIPS 2018, "Sanity checks for saliency maps") re-initialises the model's weights
and asks whether the maps change: ``sanity`` reports the Spearman rank correlation between each
image's map from the trained model and from the randomised one (near 1: the map shows the image, not
the model: do not trust it; the lower, the more the map depends on the learnt weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

MIN_CELLS = 7  # a CNN's map is read from its deepest stage at least this many cells across (7: a 224 px resnet's last)


def target_layer(model, image_size: int | None = None):
    """The layer Grad-CAM reads for this timm model, and the reshape its activations need (None for CNNs).

    For a CNN, the deepest feature stage whose map is at least MIN_CELLS across at image_size (the last
    stage of a 224 px resnet; an earlier one for small images, where the last is 1 or 2 cells)."""
    blocks = getattr(model, "blocks", None)
    if blocks is not None and hasattr(model, "patch_embed") and len(blocks):
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        grid = tuple(getattr(model.patch_embed, "grid_size", ()))

        def tokens_to_grid(tokens):
            patches = tokens[:, prefix:, :]
            h, w = grid if len(grid) == 2 and grid[0] * grid[1] == patches.shape[1] else (int(patches.shape[1] ** 0.5),) * 2
            return patches.reshape(patches.shape[0], h, w, patches.shape[2]).permute(0, 3, 1, 2)

        return blocks[-1].norm1, tokens_to_grid
    info = getattr(model, "feature_info", None)
    if info:
        stages = info if isinstance(info, list) else info.get_dicts()
        fine = [s for s in stages if image_size is None or image_size / s["reduction"] >= MIN_CELLS]
        return model.get_submodule((fine or stages[:1])[-1]["module"]), None
    raise ValueError(f"no Grad-CAM layer known for {type(model).__name__}: it is neither a timm CNN with feature_info "
                     "nor a vision transformer")


def cams(model, norm, images: np.ndarray, classes: np.ndarray | None = None, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps (N×H×W in [0, 1]) of uint8 NHWC images for classes (default: each image's predicted class)."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, reshape = target_layer(model, images.shape[1] if images.ndim == 4 else None)
    device = next(model.parameters()).device
    model.eval()
    out = []
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        for start in range(0, len(images), batch_size):
            x = norm(torch.as_tensor(np.ascontiguousarray(images[start:start + batch_size])).to(device))
            targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes[start:start + batch_size]]
            out.append(cam(input_tensor=x, targets=targets))
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:3]), np.float32)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map laid over the uint8 HWC image as a heat map (uint8 HWC)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=0.55)


def randomised(model, seed: int = 0):
    """A copy of the model with every weight re-initialised (the randomisation test's control)."""
    import torch

    copied = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in copied.modules():
        if hasattr(module, "reset_parameters") and module is not copied:
            module.reset_parameters()
        else:  # a module's own tensors no reset covers (a ViT's position embedding and class token)
            for tensor in module.parameters(recurse=False):
                torch.nn.init.normal_(tensor, std=0.02)
    return copied.eval()


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps (flattened); 0 when either is flat."""
    ra, rb = _ranks(a.ravel()), _ranks(b.ravel())
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass(frozen=True)
class Sanity:
    """The model-randomisation test: the rank correlation of trained and randomised maps, per image and its mean."""

    per_image: list[float]

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.per_image)), 4) if self.per_image else None

    def sentence(self) -> str:
        if self.mean is None:
            return "sanity check: no image was explained"
        verdict = ("the maps depend on the learnt weights" if self.mean < 0.5 else
                   "the maps barely change with random weights: they show the image more than the model; do not trust them")
        return (f"sanity check (model randomisation, Adebayo et al. 2018): rank correlation of trained and randomised "
                f"maps {self.mean:.2f} over {len(self.per_image)} images: {verdict}")


def sanity(model, norm, images: np.ndarray, trained_maps: np.ndarray, seed: int = 0) -> Sanity:
    """Maps of the same images and classes from the model with random weights, against the trained ones."""
    import torch

    with torch.no_grad():
        device = next(model.parameters()).device
        classes = model(norm(torch.as_tensor(np.ascontiguousarray(images)).to(device))).argmax(1).cpu().numpy()
    random_maps = cams(randomised(model, seed), norm, images, classes)
    return Sanity([spearman(t, r) for t, r in zip(trained_maps, random_maps, strict=True)])


def sample(labels: np.ndarray, pred: np.ndarray, budget: int, seed: int) -> list[tuple[int, str]]:
    """A seeded sample of test images to explain: (index, "right" | "wrong"), each class's right and wrong
    ones in turn, class by class, until budget images."""
    rng = np.random.default_rng(seed)
    pools = []
    for c in np.unique(labels):
        for kind, member in (("right", (labels == c) & (pred == c)), ("wrong", (labels == c) & (pred != c))):
            found = np.flatnonzero(member)
            pools.append([(int(i), kind) for i in rng.permutation(found)])
    picked: list[tuple[int, str]] = []
    while len(picked) < budget and any(pools):
        for pool in pools:
            if pool and len(picked) < budget:
                picked.append(pool.pop(0))
    return picked


def write_explanations(model, norm, images: np.ndarray, labels: np.ndarray, pred: np.ndarray, classes: list[str],
                       out, budget: int, seed: int) -> Sanity:
    """eval/explain/: an overlay per sampled test image, named class-right|wrong-as-predicted-index.png, and
    sanity.json (the randomisation test on them); the Sanity."""
    import json
    from pathlib import Path

    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()  # one left by an earlier run would show another model's maps
    picked = sample(labels, pred, budget, seed)
    index = np.array([i for i, _ in picked], dtype=np.int64)
    chosen = np.asarray(images)[index] if len(index) else np.asarray(images)[:0]
    maps = cams(model, norm, chosen, np.asarray(pred)[index]) if len(index) else np.zeros((0, 1, 1))
    for (i, kind), image, cam in zip(picked, chosen, maps, strict=True):
        name = f"{classes[labels[i]]}-{kind}-as-{classes[pred[i]]}-{i}.png"
        Image.fromarray(overlay(image, cam)).save(out / name)
    check = sanity(model, norm, chosen, maps, seed) if len(index) else Sanity([])
    (out / "sanity.json").write_text(json.dumps({"spearman_trained_vs_random": check.mean, "per_image": check.per_image,
                                                 "verdict": check.sentence()}, indent=2))
    return check
