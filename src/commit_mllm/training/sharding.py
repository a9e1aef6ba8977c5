"""FSDP for the trainer: wrapping, full state for checkpoints, gathered parameters for eval.

``train.fsdp: true`` shards parameters, gradients and optimizer state over the processes
with torch FSDP (``use_orig_params=True``, ``FULL_SHARD``): the original ``nn.Parameter``
objects stay the ones the components, the optimizer's named groups and the balance meter
hold, each as this rank's flat slice between forwards. One FSDP unit per transformer layer
(the classes the Hugging Face parts list in ``_no_split_modules``), one for the rest of
the model's parameters, and a parameter-free root. Runs on CPU (gloo) and GPU (NCCL); the
trainer never lets accelerate wrap the model in DDP on this path.

What the rest of the trainer does differently under FSDP:

* gradient clipping: :meth:`FSDP.clip_grad_norm_` (the norm over all shards);
* per-component gradient and update norms: squared sums all-reduced (``CoMMIT(sharded=True)``);
* the balance meter's lookaheads run through the FSDP root (all-gather per branch), without
  the cached-encoder shortcut, and write theta_t / theta_{t+1} into the shards in place;
* checkpoints: the full trainable weights and every rank's optimizer shard are gathered on
  rank 0, which writes them; weights are restored into the unwrapped model before
  wrapping (any number of processes), the optimizer shards after (the same number);
* evaluation: every rank generates inside :func:`gathered` (parameters unsharded), because
  the gathered forward is a collective; only rank 0 writes the results.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "clean_name",
    "full_state",
    "gathered",
    "layer_classes",
    "load_optimizer_state",
    "wrap",
]

_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Module classes to make FSDP units of: the parts' ``_no_split_modules`` present in it.

    Args:
        model: The unwrapped model (any parts that are Hugging Face ``PreTrainedModel``).

    Returns:
        The classes (empty when no part declares any: the model is then a single unit).
    """
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return {type(m) for m in model.modules() if type(m).__name__ in names}


class _Root(nn.Module):
    """A parameter-free FSDP root around the model, so the model is an ordinary unit.

    FSDP keeps the *root* unit's parameters gathered after a forward (expecting the
    backward). The balance meter writes theta_t / theta_{t+1} into the shards between
    no-grad forwards, and a gathered copy kept from the previous forward would hide the
    write; a non-root unit re-gathers on every forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap ``model`` with FSDP (full shard, ``use_orig_params``) on ``device``.

    Units: every transformer layer (:func:`layer_classes`), the model itself for the rest of
    its parameters, and a parameter-free root (see ``_Root``).

    Args:
        model: The unwrapped model, weights already loaded (a resumed run loads them first).
        device: This rank's device (``cpu`` with gloo, ``cuda:i`` with NCCL).

    Returns:
        The FSDP root; calling it calls ``model``, which keeps its parameter objects.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    classes = tuple(layer_classes(model))
    policy = functools.partial(
        lambda_auto_wrap_policy,
        lambda_fn=lambda m: m is model or (bool(classes) and isinstance(m, classes)),
    )
    return FullyShardedDataParallel(
        _Root(model),
        auto_wrap_policy=policy,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=True,
        device_id=torch.device("cpu") if device.type == "cpu" else device,  # not "cpu:0"
        sync_module_states=False,  # every rank built the same weights from the same seed
    )


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes (``_fsdp_wrapped_module.``)."""
    for prefix in _PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_state(
    fsdp: nn.Module, optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full trainable weights, and every rank's optimizer shard, on rank 0.

    A collective: every rank must call it; other ranks get empty results. The optimizer
    state stays per rank (each rank's ``optimizer.state_dict()`` over its shards): exact,
    and valid for parameters that have no state yet (coordinate descent gates a component
    off before its first step), which FSDP's name-keyed ``optim_state_dict`` rejects. The
    cost is that a run resumes with the same number of processes.

    Args:
        fsdp: The FSDP root from :func:`wrap`.
        optimizer: Its optimizer.
        model: The model inside the FSDP root (its trainable parameters are what a
            checkpoint holds).

    Returns:
        ``(weights, optimizer_state)``: clean name -> CPU tensor of full shape, and
        ``{"world_size": W, "shards": [state_dict of rank r, ...]}``.
    """
    import torch.distributed as dist
    from accelerate.utils import send_to_device
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    main = dist.get_rank() == 0
    on_gpu = any(p.is_cuda for p in fsdp.parameters())
    weights = {}
    # Offloading to rank 0's CPU keeps GPU memory flat; on CPU every rank gathers.
    with FSDP.summon_full_params(fsdp, writeback=False, rank0_only=on_gpu, offload_to_cpu=on_gpu):
        if main:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    weights[clean_name(name)] = p.detach().cpu().clone()
    shards = [None] * dist.get_world_size() if main else None
    dist.gather_object(send_to_device(optimizer.state_dict(), "cpu"), shards, dst=0)
    if not main:
        return {}, {}
    return weights, {"world_size": len(shards), "shards": shards}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load this rank's shard of an optimizer state from :func:`full_state`.

    Raises:
        ValueError: The state was written by a different number of processes.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    if state.get("world_size") != world:
        raise ValueError(
            f"the optimizer state is sharded over {state.get('world_size')} processes; "
            f"this run has {world}: resume with {state.get('world_size')} processes"
        )
    optimizer.load_state_dict(state["shards"][dist.get_rank()])


@contextlib.contextmanager
def gathered(fsdp: nn.Module | None) -> Iterator[None]:
    """Unshard every parameter for the block (read only); no-op for ``None``.

    Forwards inside run collectives: every rank must run the same ones.
    """
    if fsdp is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(fsdp, writeback=False):
        yield
