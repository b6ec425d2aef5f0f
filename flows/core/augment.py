"""Augmentation on tensors of the decoded-once split, with timm's Mixup/CutMix and RandomErasing.

The fast path works on whole uint8 batches on the training device (crop, flip, normalise), so
the input pipeline costs next to nothing. timm's AutoAugment/RandAugment/AugMix policies need
PIL images: with ``train.auto_augment`` set, a DataLoader (``train.workers``) applies them per
image, each image seeded by (seed, epoch, index) so results do not depend on the worker count.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flows.core.params import TrainParams


class Normalizer(nn.Module):
    """uint8 NHWC batches to normalised float NCHW (optionally channels_last) on the device."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False) -> None:
        super().__init__()
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise one batch already on the device."""
        x = images.permute(0, 3, 1, 2).float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x - self.mean) / self.std


def crop_and_flip(x: torch.Tensor, cfg: TrainParams, gen: torch.Generator, size: int | None = None) -> torch.Tensor:
    """Random crops (after reflect padding, or random-resized to size) and horizontal flips, on a uint8 NHWC batch."""
    n, h, w, _ = x.shape
    if cfg.crop_scale is not None:
        x = resized_crops(x, size or h, cfg.crop_scale, gen)
    elif cfg.crop_padding:
        pad = cfg.crop_padding
        padded = F.pad(x.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype).permute(0, 2, 3, 1)
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).tolist()
        x = torch.stack([padded[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    elif size is not None and size != h:  # stored larger, no random crop asked for: the centre, resized
        x = resized_crops(x, size, (1.0, 1.0), gen)
    if cfg.hflip > 0:
        flip = (torch.rand(n, generator=gen) < cfg.hflip).nonzero().squeeze(1).to(x.device)
        x = x.index_copy(0, flip, x[flip].flip(2))  # only the images drawn for a flip are flipped
    return x


RATIO = (3 / 4, 4 / 3)
"""Aspect ratio range of the random-resized crops: timm's (and torchvision's) default."""


def crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """(n, 4) crop boxes x1, y1, x2, y2 in pixels, drawn as torchvision's RandomResizedCrop.get_params draws them.

    Ten tries per image of an area fraction in scale and a log-uniform aspect ratio; an image
    whose ten tries all miss gets the central crop with the ratio clamped to RATIO.
    """
    tries = 10
    area = h * w * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(n, tries).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=gen)
    ratio = torch.exp(log_ratio)
    cw = torch.sqrt(area * ratio).round()
    ch = torch.sqrt(area / ratio).round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.float().argmax(1)  # the first try that fits (0 when none does)
    rows = torch.arange(n)
    cw, ch, ok = cw[rows, first], ch[rows, first], fits.any(1)
    if not ok.all():  # torchvision's fallback: the centre, ratio clamped
        if w / h < RATIO[0]:
            fw, fh = w, round(w / RATIO[0])
        elif w / h > RATIO[1]:
            fw, fh = round(h * RATIO[1]), h
        else:
            fw, fh = w, h
        cw, ch = torch.where(ok, cw, float(fw)), torch.where(ok, ch, float(fh))
    u = torch.rand(n, 2, generator=gen)
    x1 = torch.where(ok, torch.floor(u[:, 0] * (w - cw + 1)), ((w - cw) / 2).round())
    y1 = torch.where(ok, torch.floor(u[:, 1] * (h - ch + 1)), ((h - ch) / 2).round())
    return torch.stack([x1, y1, x1 + cw, y1 + ch], 1)


def resized_crops(x: torch.Tensor, size: int, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """timm's random-resized crop on a whole uint8 NHWC batch on its device: one box per image, resized to size.

    Both ways average over each output pixel's footprint (an antialiased downscale, as PIL's
    resize in timm's transform is). On the CPU each crop goes through torch's uint8 antialiased
    bilinear resize (the SIMD path made to match PIL's): 2-4 ms a batch of 32 from 128 to 64 px
    against 12 ms for roi_align, whose CPU kernel is scalar. On a GPU roi_align resizes every
    box in one kernel.
    """
    n, h, w, _ = x.shape
    if scale == (1.0, 1.0):
        boxes = torch.tensor([[0.0, 0.0, w, h]]).expand(n, 4)
    else:
        boxes = crop_boxes(n, h, w, scale, gen)
    if x.device.type == "cpu":
        return resize_each(x, boxes, size)
    from torchvision.ops import roi_align

    boxes = torch.cat([torch.arange(n, dtype=torch.float32).view(n, 1), boxes], 1).to(x.device)
    images = x.permute(0, 3, 1, 2).float()
    out = roi_align(images, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def resize_each(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box (whole pixels, as crop_boxes draws them) resized to size x size: uint8 NHWC in and out."""
    out = torch.empty((len(x), size, size, x.shape[3]), dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
        crop = x[i, y1:y2, x1:x2].permute(2, 0, 1).unsqueeze(0)  # NHWC memory seen as a channels_last NCHW view
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i] = resized[0].permute(1, 2, 0)
    return out


class BatchAugment:
    """Everything applied to a normalised batch: timm's RandomErasing and Mixup/CutMix."""

    def __init__(self, cfg: TrainParams, num_classes: int, device: torch.device) -> None:
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.erasing = RandomErasing(cfg.random_erasing, mode="pixel", device=str(device)) if cfg.random_erasing else None
        self.mixup = None
        if cfg.mixup or cfg.cutmix:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes
            )
        self.smoothing = cfg.label_smoothing
        self.num_classes = num_classes

    @property
    def soft_targets(self) -> bool:
        """Whether targets become class distributions (mixup/cutmix on)."""
        return self.mixup is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erasing is not None:
            x = self.erasing(x)
        if self.mixup is None:
            return x, y
        if len(x) % 2:  # timm's Mixup needs pairs; an odd batch gets smoothed targets only
            from timm.data.mixup import one_hot

            off = self.smoothing / self.num_classes
            return x, one_hot(y, self.num_classes, on_value=1.0 - self.smoothing + off, off_value=off)
        return self.mixup(x, y)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The batch order of one epoch: a permutation that depends only on (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class PolicyImages(torch.utils.data.Dataset):
    """Images of one split with a timm AutoAugment/RandAugment/AugMix policy, as uint8 HWC."""

    def __init__(self, images: np.ndarray, policy: str, seed: int) -> None:
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

        size = images.shape[1]
        hparams = {"translate_const": int(size * 0.45), "img_mean": (124, 116, 104)}
        factory = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}.get(policy.split("-")[0], auto_augment_transform)
        self.transform = factory(policy, hparams)
        self.images, self.seed, self.epoch = images, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        key = hash((self.seed, self.epoch, index))
        random.seed(key)
        np.random.seed(key % 2**32)  # timm's RandAugment/AugMix also draw from numpy
        out = self.transform(Image.fromarray(np.asarray(self.images[index])))
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy())


def policy_batches(
    data: PolicyImages, batches: list[torch.Tensor], workers: int, pin: bool
) -> Iterator[torch.Tensor]:
    """uint8 NHWC batches of ``data`` in the given index batches, through a DataLoader."""
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=[b.tolist() for b in batches], num_workers=workers, pin_memory=pin,
        persistent_workers=False,
    )
    yield from loader
