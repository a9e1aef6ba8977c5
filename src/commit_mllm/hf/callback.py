"""CoMMIT inside ``transformers.Trainer`` / ``trl.SFTTrainer``: callback, mixin, optimizer.

Where each piece of a CoMMIT step runs in the Trainer loop (transformers 5.x)::

    training_step -> compute_loss   [mixin]    forward through the balance meter (keeps p_t,
                                               cached encoder features, RNG), CE + regularizer
                  -> backward                  (the Trainer's accelerator.backward)
                  -> after_backward  [mixin]    per-component grad norms, CD gating / OGM-GE
    clip grad norm                             (the Trainer)
    on_pre_optimizer_step    [callback]        snapshot theta_t when kappa is due
    optimizer.step()                           (the Trainer)
    on_optimizer_step        [callback]        kappa -> kappa_bar -> factors f_c
    lr_scheduler.step()                        (the Trainer: warmup / cosine / ... s(t))
    on_step_end              [callback]        group lr = scheduler lr * f_c (no compounding:
                                               the scheduler recomputes from initial_lr)
    on_log / on_save         [callback]        metrics into ``report_to``; commit_state.pt

The factor multiplies the Trainer's own schedule; it never replaces it.

Example:
    >>> components = build_components(model, "encoder", lrs={"encoder": 1e-4, "llm": 2e-4})
    >>> callback = CoMMITCallback(components, CoMMITConfig(strategy="commit"))
    >>> trainer = CoMMITTrainer(model=model, args=args, train_dataset=ds,
    ...                         data_collator=collate, callbacks=[callback])
    >>> trainer.train()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from ..components import Components
from ..coordinator import CoMMIT, StepReport
from ..strategies import CoMMITConfig
from .adapters import make_adapter, supervised_forward

__all__ = [
    "STATE_FILE",
    "CoMMITCallback",
    "CoMMITTrainer",
    "CoMMITTrainerMixin",
    "commit_optimizer",
    "commit_trainer_class",
    "state_code",
]

logger = logging.getLogger(__name__)

STATE_FILE = "commit_state.pt"


def commit_optimizer(
    components: Components,
    args: Any | None = None,
    optimizer_cls: type[torch.optim.Optimizer] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer with one named group per trainable component.

    Args:
        components: The components (their base LRs become the groups' ``lr`` / ``base_lr``).
        args: ``TrainingArguments``: optimizer class and kwargs are taken from it (``optim``,
            ``adam_beta1`` ...; ``weight_decay`` for components without their own).
        optimizer_cls: Explicit class (default: from ``args``, else ``torch.optim.AdamW``).
        **kwargs: Optimizer keyword arguments (override those from ``args``).

    Returns:
        The optimizer; pass it as ``Trainer(optimizers=(optimizer, None))`` or let
        :class:`CoMMITTrainerMixin` build it.
    """
    opt_kwargs: dict[str, Any] = {}
    if args is not None and optimizer_cls is None:
        optimizer_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        opt_kwargs = {k: v for k, v in opt_kwargs.items() if k != "lr"}
    optimizer_cls = optimizer_cls or torch.optim.AdamW
    opt_kwargs.update(kwargs)
    groups = components.param_groups()
    default_wd = opt_kwargs.pop("weight_decay", None)
    if default_wd is None and args is not None:
        default_wd = args.weight_decay
    for group in groups:
        if "weight_decay" not in group and default_wd is not None:
            group["weight_decay"] = default_wd
    return optimizer_cls(groups, **opt_kwargs)


def state_code(state: str, names: list[str]) -> int:
    """Numeric code of a balance state, for loggers that take numbers only.

    0 warming_up, 1 balanced, 2 oscillating, 3 + i biased-to-<names[i]>, -1 unknown.
    """
    fixed = {"warming_up": 0, "balanced": 1, "oscillating": 2}
    if state in fixed:
        return fixed[state]
    if state.startswith("biased-to-") and state[10:] in names:
        return 3 + names.index(state[10:])
    return -1


class CoMMITCallback(TrainerCallback):
    """Runs a CoMMIT strategy inside a ``transformers.Trainer`` (with the mixin).

    Args:
        components: The model's components (e.g. from
            :func:`~commit_mllm.hf.registry.build_components`), built on the model handed
            to the Trainer.
        config: The method's settings (strategy by name; ``CoMMITConfig()`` by default).
        adapter: ``"auto"`` (the registry's cached-encoder adapter when there is one),
            None (full forward per lookahead branch), or an object implementing
            ``encode`` / ``decode`` / ``encoder_parameters``.
        prefix: Prefix of the balance metrics in the logs.
    """

    def __init__(
        self,
        components: Components,
        config: CoMMITConfig | None = None,
        *,
        adapter: Any = "auto",
        prefix: str = "commit/",
    ):
        self.components = components
        self.config = config or CoMMITConfig()
        self.adapter_choice = adapter
        self.prefix = prefix
        self.commit: CoMMIT | None = None
        self.model: nn.Module | None = None
        self.last: StepReport | None = None
        self.history: list[dict[str, Any]] = []
        self.resume_from: str | None = None

    # ---- set-up ---------------------------------------------------------------------------
    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, warmup: int
    ) -> CoMMIT:
        """Build the CoMMIT engine on the Trainer's model and optimizer.

        The engine's own schedule is ``constant`` (its rates are overwritten by
        :meth:`apply_lrs`); its warmup is the Trainer's, so no factor moves during warmup.
        """
        adapter = make_adapter(model) if self.adapter_choice == "auto" else self.adapter_choice
        self.model = model
        self.commit = CoMMIT(
            adapter if adapter is not None else model,
            optimizer,
            self.components,
            self.config,
            total_steps=max(1, total_steps),
            warmup_steps=warmup,
            schedule="constant",
            forward_fn=None if adapter is not None else supervised_forward,
        )
        how = "cached encoder" if adapter is not None else "full forward per branch"
        logger.info("CoMMIT %s (%s)\n%s", self.config.strategy, how, self.components.table())
        return self.commit

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Build the engine, restore a checkpoint's balance state, apply the factors."""
        if self.commit is None or self.model is not model:
            self.setup(model, optimizer, state.max_steps, args.get_warmup_steps(state.max_steps))
        path = self.resume_from
        if path is None and state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if path is not None and state.global_step > 0:
            self.load(path)
        self.apply_lrs(kwargs.get("lr_scheduler"), optimizer)

    # ---- the step ---------------------------------------------------------------------------
    def training_loss(
        self, model: nn.Module, inputs: Mapping[str, Any], ga_steps: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward through the meter; returns (CE + regularizer, [T, V] logits).

        Args:
            model: What the Trainer calls (DDP wrapper or the model itself).
            inputs: The micro-batch (with ``labels``).
            ga_steps: Micro-batches in this optimizer step (scales a lagging-only bonus).
        """
        commit = self._engine()
        via = None if model is self.model else model
        logits = commit.forward(inputs, via=via)
        labels = inputs["labels"]
        targets = labels[:, 1:][labels[:, 1:] != -100]
        ce = F.cross_entropy(logits.float(), targets)
        aux = commit.aux_loss(logits)
        reg = commit.regularizer
        if reg.lagging_only and aux.requires_grad and commit.tracker.z_bar:
            # The Trainer runs one backward; route the bonus's gradient to the lagging part.
            z = commit.tracker.z_bar
            params = self.components[min(z, key=z.get)].params
            grads = torch.autograd.grad(
                aux / ga_steps, params, retain_graph=True, allow_unused=True
            )
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
            aux = aux.detach()
        return ce + aux, logits

    def after_backward(self) -> dict[str, float]:
        """Per-component grad norms, then CD gating / OGM-GE modulation (before clipping)."""
        return self._engine().after_backward()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Snapshot theta_t when kappa is due."""
        self._engine().before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Measure kappa on the step just taken; update the tracker and factors."""
        self.last = self._engine().after_step()
        self.history.append(self.metrics(self.last))

    def on_step_end(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        """Multiply the rates the Trainer's scheduler just set by the CoMMIT factors."""
        self.apply_lrs(lr_scheduler, optimizer)

    def apply_lrs(self, lr_scheduler: Any, optimizer: torch.optim.Optimizer | None) -> None:
        """Set each group lr to scheduler lr * f_c, recomputed each time (never compounded)."""
        if self.commit is None or optimizer is None:
            return
        factors = self.commit.scheduler.controller.factors
        base = lr_scheduler.get_last_lr() if lr_scheduler is not None else None
        for i, group in enumerate(optimizer.param_groups):
            lr = base[i] if base is not None else group.get("base_lr", group["lr"])
            group["lr"] = lr * factors.get(group.get("name"), 1.0)

    # ---- logs and checkpoints -------------------------------------------------------------
    def metrics(self, report: StepReport) -> dict[str, Any]:
        """Flat metrics of one step: ``commit/kappa``, ``lr/<c>``, ``grad_norm/<c>`` ..."""
        rec = report.as_log()
        out: dict[str, Any] = {}
        for key, value in rec.items():
            if value is None or key == "step":
                continue
            head = key.split("/")[0]
            top = head in ("lr", "grad_norm", "update_norm")
            out[key if top else self.prefix + key] = value
        out[self.prefix + "state_code"] = state_code(rec["state"], self.components.names)
        out[self.prefix + "collapse"] = float(rec["collapse"])
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Merge the latest step's balance metrics into the Trainer's training logs."""
        if logs is None or self.last is None or "loss" not in logs:
            return
        logs.update(self.metrics(self.last))

    def on_save(self, args, state, control, **kwargs):
        """Write the balance state (meter window, factors, step) next to the checkpoint."""
        if self.commit is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save({"commit": self.commit.state_dict()}, os.path.join(folder, STATE_FILE))

    def load(self, checkpoint: str) -> bool:
        """Restore the balance state saved in ``checkpoint`` (False when there is none)."""
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            logger.warning("no %s in %s: CoMMIT balance state starts fresh", STATE_FILE, checkpoint)
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._engine().load_state_dict(state["commit"])
        return True

    def _engine(self) -> CoMMIT:
        if self.commit is None:
            raise RuntimeError(
                "CoMMITCallback is not set up: train with CoMMITTrainer, "
                "commit_trainer_class(YourTrainer) or a class using CoMMITTrainerMixin"
            )
        return self.commit


class CoMMITTrainerMixin:
    """Routes a Trainer's training forward, loss and optimizer through CoMMIT.

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
        raise ValueError("add a CoMMITCallback to the Trainer's callbacks")

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """One named parameter group per trainable component (Trainer's optimizer class)."""
        if self.optimizer is None:
            self.optimizer = commit_optimizer(self.commit_callback().components, self.args)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """CE + regularizer on the supervised logits of the meter's training forward."""
        cb = self.commit_callback()
        if not model.training or cb.commit is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        steps = getattr(self, "current_gradient_accumulation_steps", 1)
        loss, logits = cb.training_loss(model, inputs, steps)
        return (loss, {"loss": loss, "logits": logits}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The base step; after the last micro-batch's backward, CoMMIT's gradient side."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self.commit_callback().after_backward()
        return loss

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
