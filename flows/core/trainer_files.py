"""The Trainer's files: its resumable checkpoints and the exported model (a mixin of flows.core.trainer.Trainer)."""

from __future__ import annotations

from pathlib import Path

from flows.core import checkpoint as ckpt
from flows.core.params import save_resolved
from flows.core.train_state import TrainState


class TrainerFiles:
    """Checkpoint, restore and export for the Trainer (which holds every attribute used here)."""

    def _checkpoint(self, folder: Path, key: str, epoch: int, batch: int, partial: dict | None) -> Path:
        state = {
            "run_key": key, "epoch": epoch, "batch": batch, "partial": partial,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": ckpt.rng_state(self.gen), **self.state.to_checkpoint(),
        }
        return ckpt.save(folder, state)

    def _restore(self, state: dict) -> tuple[int, int, dict | None]:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        ckpt.restore_rng(state["rng"], self.gen)
        self.state = TrainState.from_checkpoint(state)
        return state["epoch"], state["batch"], state["partial"]

    def _export(self, out: Path, seconds: float) -> dict:
        from flows.contracts import ModelCard
        from flows.core.model_file import save_model, sha256

        out.mkdir(parents=True, exist_ok=True)
        weights = out / "model.safetensors"
        card = ModelCard(
            model_name=self.params.model.name, classes=self.classes, image_size=self.image_size,
            mean=list(self.prep.mean), std=list(self.prep.std), interpolation=self.prep.interpolation,
            data_version=self.data_version, temperature=self._temperature(),
            weights_from=self.weights_from, best_epoch=self.state.best.epoch + 1, val_accuracy=self.state.best.val_acc,
            weights=self.state.best.weights, micro_batch=self.state.micro, accum_steps=self.state.accum,
            oom_events=self.state.oom_events,
            sha256="", train_seconds=round(seconds, 1),
        )
        save_model(weights, self.state.best.state, card.meta())
        card = card.model_copy(update={"sha256": sha256(weights)})
        card.write(out)
        config = card.model_dump()
        save_resolved(self.params, out)
        return config

    def _temperature(self) -> float:
        """Temperature scaling of the best weights, fitted on the validation split (1.0 without one)."""
        from flows.core.calibration import fit_temperature
        from flows.core.scoring import logits_of

        if not len(self.val_y):
            return 1.0
        self.model.load_state_dict(self.state.best.state)  # training is over: the model becomes the best weights
        logits = logits_of(self.model, self.norm, self.val_x, self.params.evaluate.batch_size)
        return fit_temperature(logits, self.val_y)

