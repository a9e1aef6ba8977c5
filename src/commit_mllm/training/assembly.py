"""Build everything a run needs: tokenizer, processors, collator, model, components, data.

:func:`assemble` resolves the run config into a :class:`~.model_spec.ModelSpec` once
(:func:`~.model_spec.resolve_model`), then builds the model from that spec alone
(:func:`build_model`); the datasets come from the ``data`` section.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data import Collator, load_llava, train_tiny_tokenizer
from ..method.components import Components
from ..models import MultimodalLM, component_prefixes
from ..tasks import (
    base_task,
    load_task,
    task_question_types,
)
from .config import DataConfig, RunConfig
from .model_spec import ComponentSpec, ModelSpec, TokenizerSource, resolve_model
from .processors import load_processors

__all__ = ["Assembly", "assemble", "build_components", "build_model"]


logger = logging.getLogger(__name__)


@dataclass
class Assembly:
    """What a run is made of.

    Attributes:
        model: The multimodal model.
        tokenizer: Its tokenizer.
        collator: Turns samples into batches (training and generation).
        train_set: Training samples (indexable).
        eval_set: Evaluation samples, or None.
        components: Trainable parameters split into components, with base LRs.
        question_types: Question types of the built-in task (empty for files).
    """

    model: MultimodalLM
    tokenizer: Any
    collator: Collator
    train_set: Sequence[dict]
    eval_set: Sequence[dict] | None
    components: Components
    question_types: tuple[str, ...] = ()


def load_datasets(
    d: DataConfig, seed: int
) -> tuple[Sequence[dict], Sequence[dict] | None, tuple[str, ...]]:
    """The training and evaluation samples and the question types of the ``data`` section."""
    if d.task is not None:
        kw = {"question_types": d.question_types}
        train = load_task(d.task, "train", seed, d.max_train_samples, **kw)
        if d.eval_size is not None:
            if base_task(d.task) == "easy-vqa":
                raise ValueError(
                    f"data.eval_size: {d.task}'s test split is fixed; use data.max_eval_samples"
                )
            kw["size"] = d.eval_size
        eval_seed = seed if d.eval_seed is None else d.eval_seed
        test = load_task(d.task, "test", eval_seed, d.max_eval_samples, **kw)
        return train, test, tuple(task_question_types(d.task))
    if d.format is not None:
        from ..formats import load_format

        train = load_format(d.format, d.train_file, d.train_split, d.media_root)
        src = d.eval_file or d.train_file
        test = load_format(d.format, src, d.eval_split, d.media_root)
    else:
        train = load_llava(d.train_file, media_root=d.media_root)
        test = load_llava(d.eval_file, media_root=d.media_root) if d.eval_file else None
    if d.max_train_samples is not None:
        train = [train[i] for i in range(min(len(train), d.max_train_samples))]
    if test is not None and d.max_eval_samples is not None:
        test = [test[i] for i in range(min(len(test), d.max_eval_samples))]
    return train, test, ()


def build_components(model: torch.nn.Module, spec: ComponentSpec) -> Components:
    """Split the model's trainable parameters into components with their base LRs.

    Prefixes come from ``spec.patterns`` or from the model's layout and the projector side;
    each component's LR from ``spec.lrs``, else ``spec.lr``.
    """
    patterns = spec.patterns or component_prefixes(model, spec.projector_side)
    unknown = sorted(set(spec.explicit) - set(patterns))
    if unknown:
        raise ValueError(
            f"train.component_lrs names unknown components {unknown}; components: {list(patterns)}"
        )
    lrs = {name: spec.lrs.get(name, spec.lr) for name in patterns}
    return Components.from_model(model, patterns, lrs, dict.fromkeys(patterns, spec.weight_decay))


def build_model(
    spec: ModelSpec, log: Callable[[str], None] = logger.info
) -> tuple[MultimodalLM, Any, Collator]:
    """The model, its tokenizer and collator, built from the spec alone (seeded).

    The placeholder tokens' ids (and, for a preset, the vocabulary size) come from the
    collator; the spec itself is left as it was.
    """
    tokenizer = _load_tokenizer(spec.tokenizer)
    image_processor, feature_extractor = load_processors(
        spec.mllm, spec.modality, spec.processors, spec.image_size, log
    )
    collator = Collator(
        tokenizer, image_processor, feature_extractor, max_length=spec.max_length, blind=spec.blind
    )
    mllm = copy.deepcopy(spec.mllm)
    mllm.image_token_id = collator.image_token_id
    mllm.audio_token_id = collator.audio_token_id
    if spec.vocab_follows_tokenizer or collator.placeholder_info.needs_resize:
        mllm.llm.vocab_size = len(tokenizer)
    torch.manual_seed(spec.seed)
    model = MultimodalLM(mllm)
    note = getattr(model.vision_encoder, "load_note", None)
    if note:
        log(note)
    return model, tokenizer, collator


def _load_tokenizer(source: TokenizerSource) -> Any:
    if source.name is None:
        return train_tiny_tokenizer(list(source.texts))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.name)


def assemble(
    cfg: RunConfig, log: Callable[[str], None] = logger.info, *, with_data: bool = True
) -> Assembly:
    """Resolve the run's model once, build it, read its datasets, split its components.

    Args:
        cfg: The run config.
        log: Where one-line notes go (data sizes, a processor built from a config, layers
            not built).
        with_data: Read the training and evaluation sets (False: empty, for evaluating a
            file of one's own).
    """
    spec = resolve_model(cfg)
    model, tokenizer, collator = build_model(spec, log)
    if not with_data:
        components = build_components(model, spec.components)
        return Assembly(model, tokenizer, collator, [], None, components)
    train, test, qtypes = load_datasets(cfg.data, spec.seed)
    log(f"data: {len(train)} train samples, {len(test) if test is not None else 0} eval samples")
    components = build_components(model, spec.components)
    return Assembly(model, tokenizer, collator, train, test, components, qtypes)
