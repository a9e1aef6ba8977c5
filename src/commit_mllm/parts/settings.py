"""Settings of the tiny self-pretrained parts and their cache key."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from commit_mllm.parts.cache import digest, library_versions
from commit_mllm.parts.synthetic import IMAGE_SIZE

__all__ = ["PretrainSettings", "cache_key"]


@dataclass
class PretrainSettings:
    """Everything that determines the cached parts (hashed into the cache key).

    Attributes:
        task: ``"easy-vqa"``, ``"tones-aqa"`` or a must-learn variant
            (:data:`commit_mllm.tasks.VARIANTS`).
        seed: Seed of every initialisation and data stream.
        steps_scale: Multiplies every step count and probe size (tests use ~0.01).
        llm: ``LlamaConfig`` fields of the tiny LLM (vocabulary added from the tokenizer).
        llm_steps: Causal-LM pretraining steps.
        llm_batch: Causal-LM batch size.
        llm_lr: Peak AdamW learning rate of the LLM (warmup then cosine).
        vision: ``CLIPVisionConfig`` fields of the tiny vision encoder.
        audio: ``WhisperConfig`` fields of the tiny audio encoder.
        encoder_steps: Pretext steps of the vision encoder.
        audio_encoder_steps: Pretext steps of the audio encoder (a step costs ~4x a vision
            step on CPU: 1-2 s clips, 100-token sequences).
        encoder_batch: Pretext batch size.
        encoder_lr: Peak AdamW learning rate of the encoder and its head.
        probe_samples: Task training samples used by the linear probe (3/4 fit, 1/4 eval).
        threads: ``torch.set_num_threads`` during pretraining (results depend on it).
    """

    task: str = "easy-vqa"
    seed: int = 0
    steps_scale: float = 1.0
    llm: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
        }
    )
    llm_steps: int = 300
    llm_batch: int = 32
    llm_lr: float = 3e-3
    vision: dict[str, Any] = field(
        default_factory=lambda: {
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
    )
    audio: dict[str, Any] = field(
        default_factory=lambda: {
            "num_mel_bins": 80,
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 256,
            "decoder_layers": 1,
            "decoder_attention_heads": 4,
            "decoder_ffn_dim": 64,
            "vocab_size": 64,
            # Token ids inside the tiny (unused) decoder vocabulary.
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "decoder_start_token_id": 1,
            # 100 positions = 200 mel frames = 2 s: the longest tones-aqa clip in one window.
            "max_source_positions": 100,
            "max_target_positions": 16,
        }
    )
    encoder_steps: int = 600
    audio_encoder_steps: int = 400
    encoder_batch: int = 32
    encoder_lr: float = 3e-3
    probe_samples: int = 2000
    threads: int = 2

    def scaled(self, n: int, minimum: int = 1) -> int:
        """``n`` times :attr:`steps_scale`, rounded, at least ``minimum``."""
        return max(minimum, round(n * self.steps_scale))

    @property
    def modality(self) -> str:
        """``"vision"`` for easy-vqa (and its variants), ``"audio"`` for tones-aqa."""
        from commit_mllm.tasks import base_task

        return "vision" if base_task(self.task) == "easy-vqa" else "audio"

    @property
    def withhold(self) -> str | None:
        """The feature the encoder is pretrained blind to (must-learn variants), or ``None``."""
        from commit_mllm.tasks import withheld_feature

        return withheld_feature(self.task)


def cache_key(settings: PretrainSettings) -> str:
    """Hex digest identifying ``settings`` + library versions (first 16 hex digits)."""
    return digest({"settings": asdict(settings), "versions": library_versions()})
