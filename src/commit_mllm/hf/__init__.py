"""CoMMIT on the Hugging Face stack: native MLLM classes, peft LoRA, Trainer / TRL plug-in.

* :mod:`.registry`: component map (encoder / projector / LLM prefixes) of native
  ``transformers`` MLLM classes, ``projector_side``, user overrides.
* :mod:`.adapters`: cached-encoder adapters (the balance meter's ``encode`` / ``decode``).
* :mod:`.lora`: LoRA through peft per part, freezing.
* :mod:`.optim`: :func:`commit_optimizer`, named groups per component with the Trainer's
  weight-decay split.
* :mod:`.callback`: :class:`CoMMITCallback` (the step, the metrics, the balance state).
* :mod:`.mixin`: :class:`CoMMITTrainerMixin` / :class:`CoMMITTrainer` for
  ``transformers.Trainer`` and ``trl.SFTTrainer`` (optimizer, forward, logs, start checks).
* :mod:`.deepspeed`: DeepSpeed hooks (every ZeRO stage) and refusals.
* :mod:`.zero3`: the balance meter on ZeRO-3 partitioned parameters.
* :mod:`.settings_doc`: the ``CoMMITConfig`` settings table of docs/integrations.md.

Needs the ``hf`` extra (transformers, peft, accelerate; trl for SFTTrainer).
"""

from .adapters import HFCachedEncoder, make_adapter, supervised_forward, supervised_positions
from .callback import STATE_FILE, CoMMITCallback, TrainerSetupError, state_code
from .deepspeed import DeepSpeedSetupError
from .lora import configure_training, part_module_regex
from .mixin import CoMMITTrainer, CoMMITTrainerMixin, commit_trainer_class
from .optim import commit_optimizer, decay_parameter_names
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
    "DeepSpeedSetupError",
    "FeatureSpec",
    "HFCachedEncoder",
    "MLLMSpec",
    "TrainerSetupError",
    "UnknownArchitectureError",
    "build_components",
    "commit_optimizer",
    "commit_trainer_class",
    "component_patterns",
    "configure_training",
    "decay_parameter_names",
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
