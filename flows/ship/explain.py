"""`tunedeck explain`: a model's top classes for some images, and the Grad-CAM map of why, as overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flows.core.errors import TunedeckError
from flows.core.params import Params
from flows.ship.gate import resolve_model


def explain_command(root: Path, params: Params, model: str, images: list[Path], out: Path,
                    device: str | None = None) -> dict:
    """Decode each image as prepare does, print its top classes, write its overlay to out; the sanity check last."""
    import torch
    from PIL import Image

    from flows.core.augment import Normalizer
    from flows.core.calibration import softmax
    from flows.core.devices import resolve_device
    from flows.core.explain import cams, overlay, sanity
    from flows.core.images import decode_image
    from flows.core.model_file import load_model

    model_path, version = resolve_model(model, root)
    dev = resolve_device(device or params.base.device)
    net, meta = load_model(model_path, dev)
    decoded, names = [], []
    for path in images:
        try:
            decoded.append(decode_image(Path(path), meta.image_size))
            names.append(Path(path))
        except FileNotFoundError:
            raise TunedeckError(f"{path}: no such file: name image files that exist.") from None
        except (OSError, ValueError) as exc:
            raise TunedeckError(f"{path} cannot be explained ({exc}): give image files (JPEG, PNG, ...).") from None
    batch = np.stack(decoded)
    norm = Normalizer(meta.mean, meta.std, dev)
    with torch.no_grad():
        probs = softmax(net(norm(torch.as_tensor(batch).to(dev))).float().cpu().numpy(), meta.temperature)
    pred = probs.argmax(axis=1)
    maps = cams(net, norm, batch, pred)
    out.mkdir(parents=True, exist_ok=True)
    k = min(params.predict.top_k, len(meta.classes))
    for path, image, p, cam in zip(names, batch, probs, maps, strict=True):
        best = np.argsort(-p, kind="stable")[:k]
        target = out / f"{path.stem}-gradcam.png"
        Image.fromarray(overlay(image, cam)).save(target)
        shown = ", ".join(f"{meta.classes[i]} {p[i]:.1%}" for i in best)
        print(f"{path}: {shown} -> {target}")
    check = sanity(net, norm, batch, maps)
    print(check.sentence())
    return {"model_version": version, "images": len(names), "out": str(out), "sanity_rho": check.mean}
