"""The Trainer side of CoMMIT: :class:`CoMMITTrainerMixin` and :class:`CoMMITTrainer`.

The mixin goes first in a Trainer's bases and works with a :class:`~.callback.CoMMITCallback`
among its callbacks. It owns what a callback cannot reach:

* the optimizer (:func:`~.optim.commit_optimizer`: per component a decay and a no-decay
  group, both named after it; components without their own rate take
  ``TrainingArguments.learning_rate``);
* the training forward and loss (through the balance meter: p_t, cached encoder features,
  RNG states; CE + regularizer);
* the logs: :meth:`CoMMITTrainerMixin.log` merges the newest CoMMIT metrics into every
  training log *before* ``Trainer.log`` appends it to ``state.log_history`` and hands it to
  the reporting callbacks (TensorBoard, W&B, ...), so the order of the callbacks does not
  matter; the logged ``learning_rate`` is ``TrainingArguments.learning_rate`` through the
  Trainer's schedule (the applied rates are ``lr/<component>``);
* the start-up checks: a setting under which kappa would be wrong (FSDP, a gradient-editing
  strategy under DeepSpeed, a DeepSpeed optimizer or scheduler section, ...) fails before
  the first step with one line that says what works.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn
from transformers import Trainer

from ..method.components import ComponentError, check_param_groups
from .callback import CoMMITCallback, TrainerSetupError
from .deepspeed import check_deepspeed, deepspeed_config
from .optim import commit_optimizer

__all__ = ["CoMMITTrainer", "CoMMITTrainerMixin", "commit_trainer_class"]

logger = logging.getLogger(__name__)


class CoMMITTrainerMixin:
    """Routes a Trainer's training forward, loss, optimizer and logs through CoMMIT.

    Put it first in the bases (``class T(CoMMITTrainerMixin, SFTTrainer)``) and pass a
    :class:`CoMMITCallback` in ``callbacks``. Evaluation uses the base class's loss.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer divides by the GA steps.
    loss_is_scaled_for_ga = False

    def commit_callback(self) -> CoMMITCallback:
        """The :class:`CoMMITCallback` among the Trainer's callbacks."""
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, CoMMITCallback):
                return cb
        raise TrainerSetupError(
            "no CoMMITCallback among the Trainer's callbacks: pass "
            "callbacks=[CoMMITCallback(components, config)]"
        )

    def train(self, *args: Any, **kwargs: Any):
        """Check the set-up (one-line errors), bind the callback, then ``Trainer.train``."""
        cb = self.commit_callback()
        cb.bind(self)
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if isinstance(resume, str):  # DeepSpeed resumes without _load_from_checkpoint
            cb.resume_from = resume
        if getattr(self, "is_fsdp_enabled", False):
            raise TrainerSetupError(
                "CoMMIT through the Trainer does not support FSDP: use DDP or DeepSpeed ZeRO-2 "
                "with the Trainer, or FSDP with commit-mllm's own trainer (train.fsdp: true)"
            )
        ds = deepspeed_config(self.accelerator)
        if ds is not None:
            check_deepspeed(ds, cb.config)
        if self.optimizer is not None and cb.group_params is None:  # optimizers=(opt, ...)
            try:
                check_param_groups(self.optimizer, cb.components)
            except ComponentError as err:
                raise TrainerSetupError(
                    f"the optimizer passed to the Trainer is not CoMMIT's ({err}): build it "
                    "with commit_mllm.hf.commit_optimizer(components, args, model=model)"
                ) from None
            cb.group_params = [list(g["params"]) for g in self.optimizer.param_groups]
        return super().train(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None):
        """Named groups per component, decay / no-decay as the Trainer splits them."""
        if self.optimizer is None:
            cb = self.commit_callback()
            cls, kwargs = self.optimizer_cls_and_kwargs or (None, {})
            self.optimizer = commit_optimizer(
                cb.components,
                self.args,
                cls,
                decay_names=self.get_decay_parameter_names(self.model),
                **kwargs,
            )
            cb.group_params = [list(g["params"]) for g in self.optimizer.param_groups]
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """CE + regularizer on the supervised logits of the meter's training forward."""
        cb = self.commit_callback()
        if not model.training or cb.commit is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        steps = getattr(self, "current_gradient_accumulation_steps", 1)
        loss, logits = cb.training_loss(model, inputs, steps)
        # A strategy may move its factors inside the forward (held-out progress of the last
        # step); the rates stay the Trainer's schedule times the factors.
        cb.apply_lrs(self.lr_scheduler, self.optimizer)
        return (loss, {"loss": loss, "logits": logits}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The base step; after the last micro-batch's backward, CoMMIT's gradient side."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self.commit_callback().after_backward()
        return loss

    def log(self, logs: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        """Merge the newest CoMMIT metrics into a training log, then log it as the base does."""
        if "loss" in logs:  # training logs; evaluation logs carry eval_loss
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, CoMMITCallback):
                    logs.update(cb.log_metrics())
        return super().log(logs, *args, **kwargs)

    def _get_learning_rate(self) -> float:
        """``TrainingArguments.learning_rate`` times the Trainer's schedule s(t).

        The base class reports group 0's rate (here the first component's); this is the
        rate a component without its own base rate gets before the CoMMIT factor.
        """
        sched = self.lr_scheduler
        try:
            pairs = list(zip(sched.base_lrs, sched.get_last_lr()))
        except (AttributeError, TypeError, AssertionError):
            return super()._get_learning_rate()
        for base, last in pairs:
            if base > 0:
                return self.args.learning_rate * last / base
        return super()._get_learning_rate()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        _reload_converted_weights(self.model, resume_from_checkpoint)
        self.commit_callback().resume_from = resume_from_checkpoint


def _reload_converted_weights(model: nn.Module, checkpoint: str) -> None:
    """Reload full weights whose saved keys use the class's legacy layout.

    transformers 5.23 saves e.g. LLaVA under its legacy key names (``language_model.model.
    layers...``) but ``Trainer._load_from_checkpoint`` loads them non-strictly without the
    key conversion, so nothing is restored (a warning lists every key). ``from_pretrained``
    applies the conversion; copy its weights in. PeftModels (adapter files) are untouched.
    """
    path = os.path.join(checkpoint, "model.safetensors")
    if hasattr(model, "peft_config") or not os.path.isfile(path):
        return
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        saved = set(f.keys())
    own = dict(model.state_dict())
    if saved <= set(own):
        return
    loaded = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
    missing, _ = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing:
        logger.warning("resume: %d tensors not restored from %s", len(missing), checkpoint)


def commit_trainer_class(base: type) -> type:
    """``base`` with :class:`CoMMITTrainerMixin` in front (e.g. ``trl.SFTTrainer``)."""
    return type(f"CoMMIT{base.__name__}", (CoMMITTrainerMixin, base), {})


CoMMITTrainer = commit_trainer_class(Trainer)
"""``transformers.Trainer`` with CoMMIT (pass a :class:`CoMMITCallback`)."""
