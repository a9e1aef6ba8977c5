"""A training run from a config file: the config, model assembly, the loop and its checkpoints.

The public entry points are :func:`load_config` and :func:`train`::

    from commit_mllm.training import load_config, train

    train(load_config("configs/tiny.yaml"))
"""

from .config import load_config
from .trainer import train

__all__ = ["load_config", "train"]
