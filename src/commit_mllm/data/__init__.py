r"""Data side of commit-mllm: samples, tokenizers, LLaVA-style loading, media and batching.

A *sample* is a dict::

    {"id": str,
     "image": path | PIL.Image | None,
     "audio": path | np.ndarray | None,
     "sampling_rate": int | None,          # of an array "audio"
     "conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                       {"from": "gpt", "value": "red"}, ...],
     "question_type": str | None}

The placeholder ``<image>`` / ``<audio>`` appears once, in the first human turn.
:class:`Collator` turns samples into batches; see its docstring for the batch keys.
"""

from commit_mllm.data.collator import (
    IGNORE_INDEX,
    Collator,
    collate_for_generation,
    reference_answer,
)
from commit_mllm.data.llava_json import (
    DataFormatError,
    LlavaDataset,
    load_llava,
    read_rows,
    save_llava_json,
    validate_row,
)
from commit_mllm.data.media import (
    TARGET_SAMPLING_RATE,
    MediaError,
    audio_features,
    image_features,
    load_audio,
    load_image,
    resample,
    write_wav,
)
from commit_mllm.data.sample import make_sample
from commit_mllm.data.tokenizer import (
    AUDIO_TOKEN,
    IMAGE_TOKEN,
    PlaceholderInfo,
    add_placeholder_tokens,
    load_tokenizer,
    train_tiny_tokenizer,
)

__all__ = [
    "AUDIO_TOKEN",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "TARGET_SAMPLING_RATE",
    "Collator",
    "DataFormatError",
    "LlavaDataset",
    "MediaError",
    "PlaceholderInfo",
    "add_placeholder_tokens",
    "audio_features",
    "collate_for_generation",
    "image_features",
    "load_audio",
    "load_image",
    "load_llava",
    "load_tokenizer",
    "make_sample",
    "read_rows",
    "reference_answer",
    "resample",
    "save_llava_json",
    "train_tiny_tokenizer",
    "validate_row",
    "write_wav",
]
