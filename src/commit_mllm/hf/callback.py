"""CoMMIT inside ``transformers.Trainer`` / ``trl.SFTTrainer``: the callback.

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
    Trainer.log              [mixin]           the latest metrics merged into the training
                                               logs: log_history and every report_to
    on_save                  [callback]        commit_state.pt next to the checkpoint

Under DeepSpeed the engine updates inside ``backward``; the gradient norms and the snapshot
then run in a hook on the engine's step (:mod:`.deepspeed`).

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
from transformers import TrainerCallback

from ..method.components import Components
from ..method.coordinator import CoMMIT, StepReport
from ..method.strategies import CoMMITConfig
from .adapters import make_adapter, supervised_forward
from .deepspeed import ComponentGroups, EngineStepHook, deepspeed_config, zero_grad_norms
from .zero3 import install_zero3, zero3_grad_norms

__all__ = ["STATE_FILE", "CoMMITCallback", "TrainerSetupError", "state_code"]

logger = logging.getLogger(__name__)

STATE_FILE = "commit_state.pt"


class TrainerSetupError(ValueError):
    """The Trainer around a :class:`CoMMITCallback` cannot run CoMMIT as set up."""


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


def _all_reduce(t: torch.Tensor) -> None:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


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

    Attributes:
        history: Every step's metrics (what :meth:`metrics` returns), in order.
        latest: The newest value of every metric (what the Trainer's logs get).
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
        self.latest: dict[str, Any] = {}
        self._estimate: dict[str, Any] = {}
        self.resume_from: str | None = None
        self.trainer: Any = None
        self.group_params: list[list[nn.Parameter]] | None = None
        self._hook: EngineStepHook | None = None
        self._reduce: Any = None
        self._zero3 = False

    # ---- set-up ---------------------------------------------------------------------------
    def bind(self, trainer: Any) -> None:
        """Attach the Trainer that runs CoMMIT's forward and optimizer (the mixin does it)."""
        self.trainer = trainer

    def setup(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup: int,
        *,
        all_reduce: Any = None,
        deepspeed_engine: Any = None,
    ) -> CoMMIT:
        """Build the CoMMIT engine on the Trainer's model and optimizer.

        The engine's own schedule is ``constant`` (its rates are overwritten by
        :meth:`apply_lrs`); its warmup is the Trainer's, so no factor moves during warmup.

        Args:
            model: The bare model (not the DDP / DeepSpeed wrapper).
            optimizer: The Trainer's optimizer (named groups).
            total_steps: Optimizer steps of the run.
            warmup: Warmup steps of the Trainer's schedule.
            all_reduce: In-place SUM all-reduce when several processes train (each measures
                its micro-batch; the KL sums are summed so every rank gets the same kappa).
            deepspeed_engine: The DeepSpeed engine, when there is one: the pre-step work
                then runs in a hook on its ``step`` (see :mod:`.deepspeed`).
        """
        self._zero3 = (
            deepspeed_engine is not None and deepspeed_engine.zero_optimization_stage() >= 3
        )
        adapter = make_adapter(model) if self.adapter_choice == "auto" else self.adapter_choice
        if self._zero3:  # the model's own forward, so the engine's hooks gather what it reads
            adapter = None
        self.model, self._reduce = model, all_reduce
        view = optimizer
        if deepspeed_engine is not None:
            if self.group_params is None:
                raise TrainerSetupError(
                    "under DeepSpeed the CoMMIT optimizer must be built by the trainer "
                    "(CoMMITTrainer.create_optimizer); do not pass optimizers="
                )
            view = ComponentGroups(optimizer, self.group_params)
        self.remove_hook()
        self.commit = CoMMIT(
            adapter if adapter is not None else model,
            view,
            self.components,
            self.config,
            total_steps=max(1, total_steps),
            warmup_steps=warmup,
            schedule="constant",
            forward_fn=None if adapter is not None else supervised_forward,
            all_reduce=all_reduce,
        )
        if deepspeed_engine is not None:
            self._hook = EngineStepHook(deepspeed_engine, self._before_engine_step)
        if self._zero3:
            install_zero3(self.commit, deepspeed_engine, all_reduce)
        self.latest, self._estimate = {}, {}
        how = "cached encoder" if adapter is not None else "full forward per branch"
        logger.info("CoMMIT %s (%s)\n%s", self.config.strategy, how, self.components.table())
        return self.commit

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Build the engine, restore a checkpoint's balance state, apply the factors."""
        if self.trainer is None:
            raise TrainerSetupError(
                "CoMMITCallback needs CoMMIT's training forward and optimizer, which a plain "
                "Trainer does not run: train with commit_mllm.hf.CoMMITTrainer (or "
                "commit_trainer_class(YourTrainer)); to pass your own optimizer, build it with "
                "commit_mllm.hf.commit_optimizer(components, args, model=model)"
            )
        acc = self.trainer.accelerator
        engine = None
        if deepspeed_config(acc) is not None:  # a new engine (and optimizer) on every train()
            engine = acc.deepspeed_engine_wrapped.engine
        if self.commit is None or self.model is not model or engine is not None:
            carry = self.commit.state_dict() if self.commit and self.model is model else None
            self.setup(
                model,
                optimizer,
                state.max_steps,
                args.get_warmup_steps(state.max_steps),
                all_reduce=_all_reduce if acc.num_processes > 1 else None,
                deepspeed_engine=engine,
            )
            if carry is not None:  # train() again on the same model: keep the balance state
                self.commit.load_state_dict(carry)
        path = self.resume_from
        if path is None and state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if path is not None and state.global_step > 0:
            self.load(path)
        self.apply_lrs(kwargs.get("lr_scheduler"), optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        """Give the DeepSpeed engine its own ``step`` back."""
        self.remove_hook()

    def remove_hook(self) -> None:
        """Remove the DeepSpeed step hook, if any."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ---- the step ---------------------------------------------------------------------------
    def training_loss(
        self, model: nn.Module, inputs: Mapping[str, Any], ga_steps: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward through the meter; returns (CE + regularizer, [T, V] logits).

        Args:
            model: What the Trainer calls (DDP / DeepSpeed wrapper or the model itself).
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
        """Per-component grad norms, then CD gating / OGM-GE modulation (before clipping).

        Under DeepSpeed this runs in the engine's step hook instead (returns {} here).
        """
        if self._hook is not None:
            return {}
        return self._engine().after_backward()

    def _before_engine_step(self) -> None:
        """DeepSpeed: gradient norms from the engine's buffers, then snapshot theta_t."""
        commit = self._engine()
        norms = zero3_grad_norms if self._zero3 else zero_grad_norms
        commit.after_backward(norms(self.components, self._reduce))
        commit.before_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Snapshot theta_t when kappa is due (under DeepSpeed the step hook did)."""
        if self._hook is None:
            self._engine().before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Measure kappa on the step just taken; update the tracker and factors."""
        self.last = self._engine().after_step()
        record = self.metrics(self.last)
        self.history.append(record)
        if self.last.measurement is not None:
            self._estimate = record
        # The step's own values; kappa, D_c, flags ... of the newest estimate (every K > 1).
        self.latest = {**self._estimate, **record}

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
        """Flat metrics of one step: ``commit/kappa``, ``lr/<c>``, ``grad_norm/<c>`` ...

        Every key of :meth:`StepReport.as_log` but ``step``; ``lr/``, ``grad_norm/`` and
        ``update_norm/`` keep their names, the rest get :attr:`prefix`. Added:
        ``commit/state_code`` (see :func:`state_code`), ``commit/collapse`` as 0/1 and, on
        steps with an estimate, ``commit/estimate_step`` (the Trainer's global step of it).
        """
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
        if report.measurement is not None:
            out[self.prefix + "estimate_step"] = report.step + 1
        return out

    def log_metrics(self) -> dict[str, Any]:
        """What a training log gets: the newest value of every metric.

        With ``logging_steps`` > 1 these are the last step's values (as the Trainer's own
        ``grad_norm`` and ``learning_rate``); with estimates every K > 1 steps, the kappa
        and D_c of the newest estimate (``commit/estimate_step`` says which).
        """
        return dict(self.latest)

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
            raise TrainerSetupError(
                "CoMMITCallback is not set up: train with CoMMITTrainer, "
                "commit_trainer_class(YourTrainer) or a class using CoMMITTrainerMixin"
            )
        return self.commit
