"""commit-mllm: coordinated multimodal instruction tuning (CoMMIT, arXiv 2407.20454).

This namespace is the method (``commit_mllm.method``, torch only); docs/architecture.md maps
the rest.
"""

from .method.balance import BalanceMeter
from .method.components import (
    Component,
    ComponentError,
    Components,
    check_param_groups,
    component_grad_norms,
)
from .method.coordinator import CoMMIT, StepReport
from .method.diagnostics import BalanceState, BalanceTracker, imbalance, target_log_weights
from .method.lookahead import (
    CachedEncoderModel,
    ForwardFn,
    Lookahead,
    Reference,
    causal_lm_forward,
    select_rows,
    supervised_mask,
)
from .method.measurement import BalanceMeasurement, kl_sum
from .method.regularizer import EntropyRegularizer, mean_entropy
from .method.scheduler import (
    CONTROLS,
    SCHEDULES,
    CoordinatedLR,
    FactorController,
    project_log_factors,
    shared_schedule,
)
from .method.snapshot import ParameterSnapshot
from .method.strategies import STRATEGIES, CoMMITConfig, Strategy

__version__ = "0.1.0"

__all__ = [
    "CONTROLS",
    "SCHEDULES",
    "STRATEGIES",
    "BalanceMeasurement",
    "BalanceMeter",
    "BalanceState",
    "BalanceTracker",
    "CachedEncoderModel",
    "CoMMIT",
    "CoMMITConfig",
    "Component",
    "ComponentError",
    "Components",
    "CoordinatedLR",
    "EntropyRegularizer",
    "FactorController",
    "ForwardFn",
    "Lookahead",
    "ParameterSnapshot",
    "Reference",
    "StepReport",
    "Strategy",
    "causal_lm_forward",
    "check_param_groups",
    "component_grad_norms",
    "imbalance",
    "kl_sum",
    "mean_entropy",
    "project_log_factors",
    "select_rows",
    "shared_schedule",
    "supervised_mask",
    "target_log_weights",
]
