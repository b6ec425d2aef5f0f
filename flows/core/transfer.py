"""Transfer-learning controls: frozen backbone, gradual unfreezing, layer decay, head LR.

Blocks come from timm's own ``group_matcher`` (stem, stages, head), so every timm model is
handled the same way. While a block is frozen its weights get no gradient and its
BatchNorm layers stay in eval mode (running statistics frozen too): a linear probe on a
pretrained backbone must not drift its normalisation on the new data.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flows.core.params import TrainParams


def block_names(model: nn.Module) -> list[list[str]]:
    """Parameter names per block, from the stem (first) to the head (last)."""
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [names for _, names in sorted(groups.items())]


def head_names(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters."""
    head = model.get_classifier()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@dataclass
class Freezer:
    """Decides, epoch by epoch, which blocks train; applies it to requires_grad and BN modes."""

    model: nn.Module
    cfg: TrainParams

    def __post_init__(self) -> None:
        blocks = block_names(self.model)
        head = head_names(self.model)
        self.backbone_blocks = [[n for n in names if n not in head] for names in blocks]
        self.backbone_blocks = [b for b in self.backbone_blocks if b]
        self.frozen: set[str] = set()

    def frozen_at(self, epoch: int) -> set[str]:
        """Names of the parameters frozen during epoch (0-based)."""
        if epoch < self.cfg.freeze_epochs:
            return {n for block in self.backbone_blocks for n in block}
        if self.cfg.unfreeze == "all":
            return set()
        thawed = epoch - self.cfg.freeze_epochs + 1  # one more block per epoch, from the top down
        still = self.backbone_blocks[: max(0, len(self.backbone_blocks) - thawed)]
        return {n for block in still for n in block}

    def apply(self, epoch: int) -> bool:
        """Set requires_grad for epoch; True when the frozen set changed."""
        frozen = self.frozen_at(epoch)
        changed = frozen != self.frozen
        for name, param in self.model.named_parameters():
            param.requires_grad_(name not in frozen)
        self.frozen = frozen
        return changed

    def set_bn_modes(self) -> None:
        """After model.train(): BatchNorm layers whose weights are all frozen go back to eval mode."""
        if not self.frozen:
            return
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
                if own and all(p in self.frozen for p in own):
                    module.eval()


def param_groups(model: nn.Module, cfg: TrainParams) -> list[dict]:
    """Optimizer groups: weight decay off for norms and biases, timm's layer decay, the head's LR scale.

    Each group carries ``lr_scale``, which timm's schedulers multiply into the scheduled LR.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_decay, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_decay)
    head = {id(p) for p in model.get_classifier().parameters()}
    split: list[dict] = []
    for group in groups:
        params = list(group["params"])
        for is_head in (False, True):
            chosen = [p for p in params if (id(p) in head) == is_head]
            if chosen:
                scale = group.get("lr_scale", 1.0) * (cfg.head_lr_scale if is_head else 1.0)
                split.append({**group, "params": chosen, "lr_scale": scale, "is_head": is_head})
    return split
