"""CoMMIT on the Hugging Face stack: native MLLM classes, peft LoRA, Trainer / TRL plug-in.

* :mod:`.registry`: component map (encoder / projector / LLM prefixes) of native
  ``transformers`` MLLM classes, ``projector_side``, user overrides.
* :mod:`.adapters`: cached-encoder adapters (the balance meter's ``encode`` / ``decode``).
* :mod:`.lora`: LoRA through peft per part, freezing.
* :mod:`.callback`: :class:`CoMMITCallback`, :class:`CoMMITTrainerMixin`,
  :func:`commit_optimizer` for ``transformers.Trainer`` and ``trl.SFTTrainer``.

Needs the ``hf`` extra (transformers, peft, accelerate; trl for SFTTrainer).
"""

from .adapters import HFCachedEncoder, make_adapter, supervised_forward, supervised_positions
from .callback import (
    STATE_FILE,
    CoMMITCallback,
    CoMMITTrainer,
    CoMMITTrainerMixin,
    commit_optimizer,
    commit_trainer_class,
    state_code,
)
from .lora import configure_training, part_module_regex
from .registry import (
    PARTS,
    PROJECTOR_SIDES,
    REGISTRY,
    FeatureSpec,
    MLLMSpec,
    UnknownArchitectureError,
    build_components,
    component_patterns,
    part_patterns,
    register_mllm,
    spec_for,
    unwrap_model,
)

__all__ = [
    "PARTS",
    "PROJECTOR_SIDES",
    "REGISTRY",
    "STATE_FILE",
    "CoMMITCallback",
    "CoMMITTrainer",
    "CoMMITTrainerMixin",
    "FeatureSpec",
    "HFCachedEncoder",
    "MLLMSpec",
    "UnknownArchitectureError",
    "build_components",
    "commit_optimizer",
    "commit_trainer_class",
    "component_patterns",
    "configure_training",
    "make_adapter",
    "part_module_regex",
    "part_patterns",
    "register_mllm",
    "spec_for",
    "state_code",
    "supervised_forward",
    "supervised_positions",
    "unwrap_model",
]
