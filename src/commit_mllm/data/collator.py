r"""Turn samples into padded training batches (answers-only labels) and generation batches.

Prompt format. With a tokenizer that has no chat template (e.g. the tiny tokenizer) the
plain template is used; each turn is::

    USER: <image>\n{question} ASSISTANT: {answer}</s>

preceded once by the bos token (and an optional system prompt), i.e. for two turns
``<s>USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>``. With a tokenizer that
has a chat template, ``tokenizer.apply_chat_template`` renders the conversation (roles
``user`` / ``assistant``) and the answer span of each assistant turn is found by rendering
growing prefixes of the conversation.

Every text piece is tokenized separately and concatenated, so the answer tokens are known
exactly: ``labels`` are ``-100`` everywhere except the answer tokens and the eos /
end-of-turn tokens that follow each answer. The modality placeholder is one special token;
the model replaces it with the encoder's feature tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from commit_mllm.data.media import (
    TARGET_SAMPLING_RATE,
    audio_features,
    image_features,
    load_audio,
)
from commit_mllm.data.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, add_placeholder_tokens

IGNORE_INDEX = -100
"""Label value of unsupervised positions (PyTorch cross-entropy's default ignore index)."""
PLAIN_USER = "USER: "
PLAIN_ASSISTANT = " ASSISTANT:"

Sample = dict[str, Any]
Segment = tuple[str, bool]  # (text, supervised)


def _chat_messages(turns: Sequence[dict[str, str]], system_prompt: str | None) -> list[dict]:
    """LLaVA turns (``from``: human/gpt) to chat-template messages (``role``: user/assistant)."""
    roles = {"human": "user", "gpt": "assistant"}
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": roles[t["from"]], "content": t["value"]} for t in turns]


@dataclass(eq=False)
class Collator:
    """Collate samples into a training batch.

    Args:
        tokenizer: A transformers tokenizer. ``<image>`` / ``<audio>`` are added as special
            tokens if missing (see :attr:`placeholder_info`: when ``needs_resize`` is true the
            model must ``resize_token_embeddings(len(tokenizer))``).
        image_processor: PIL-based transformers image processor; required for image samples.
        feature_extractor: ``WhisperFeatureExtractor``; required for audio samples.
        max_length: Maximum sequence length; longer samples are truncated on the right (an
            error is raised if that removes the placeholder or every answer token).
        use_chat_template: ``None`` = use the tokenizer's chat template when it has one.
        system_prompt: Optional text put before the first user turn.
        image_token: Image placeholder string.
        audio_token: Audio placeholder string.
        blind: Text-only baseline: every image and clip is replaced by zeros after
            preprocessing (same shapes, same placeholders, no information), so a model can
            only learn the language prior of the questions.

    Calling the collator on ``B`` samples returns a dict with ``input_ids``,
    ``attention_mask``, ``labels`` (long ``[B, L]``, right-padded), plus ``pixel_values``
    (float ``[B, 3, H, W]``) for image samples, ``input_features`` (float
    ``[B, n_mels, T]``, ``T`` = longest clip in frames rounded up to even) and
    ``feature_attention_mask`` (long ``[B, T]``) for audio samples, and ``question_type``
    (``list[str]``) when the samples carry one.
    """

    tokenizer: Any
    image_processor: Any = None
    feature_extractor: Any = None
    max_length: int = 512
    use_chat_template: bool | None = None
    system_prompt: str | None = None
    image_token: str = IMAGE_TOKEN
    audio_token: str = AUDIO_TOKEN
    blind: bool = False

    def __post_init__(self) -> None:
        self.placeholder_info = add_placeholder_tokens(
            self.tokenizer, self.image_token, self.audio_token
        )
        self.image_token_id = self.placeholder_info.image_token_id
        self.audio_token_id = self.placeholder_info.audio_token_id
        if self.use_chat_template is None:
            self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    # ----------------------------------------------------------------- text encoding
    def segments(self, turns: Sequence[dict[str, str]], for_generation: bool) -> list[Segment]:
        """Split a conversation into ``(text, supervised)`` pieces.

        Args:
            turns: LLaVA turns alternating human / gpt, starting with human.
            for_generation: If true, ``turns`` ends with the human turn to answer and the
                result ends with the assistant prompt; otherwise every gpt turn is supervised.

        Returns:
            Text pieces whose concatenation is the full prompt; special tokens are written
            as text (``<s>``, ``<image>``) and recognised by the tokenizer.
        """
        if self.use_chat_template:
            return self._chat_segments(turns, for_generation)
        tok = self.tokenizer
        out: list[Segment] = [(tok.bos_token or "", False)]
        prefix = f"{self.system_prompt} " if self.system_prompt else ""
        for turn in turns:
            if turn["from"] == "human":
                out.append((f"{prefix}{PLAIN_USER}{turn['value']}{PLAIN_ASSISTANT}", False))
                prefix = ""
            else:
                # The space goes with the answer so generation after "ASSISTANT:" matches.
                out.append((f" {turn['value']}{tok.eos_token or ''}", True))
        return out

    def _chat_segments(
        self, turns: Sequence[dict[str, str]], for_generation: bool
    ) -> list[Segment]:
        """Segments from the chat template, by rendering growing conversation prefixes."""
        messages = _chat_messages(turns, self.system_prompt)
        offset = 1 if self.system_prompt else 0
        out: list[Segment] = []
        rendered = ""
        for i, turn in enumerate(turns):
            is_answer = turn["from"] == "gpt"
            text = self.tokenizer.apply_chat_template(
                messages[: offset + i + 1], tokenize=False, add_generation_prompt=not is_answer
            )
            if not text.startswith(rendered):
                raise ValueError(
                    "the tokenizer's chat template does not render conversation prefixes as "
                    "prefixes of the full text; pass use_chat_template=False"
                )
            out.append((text[len(rendered) :], is_answer))
            rendered = text
        if not for_generation and out and not out[-1][1]:
            out.pop()  # a trailing generation prompt has nothing to supervise
        return out

    def encode(self, sample: Sample, for_generation: bool = False) -> tuple[list[int], list[int]]:
        """Tokenize one sample.

        Args:
            sample: A sample dict (see :mod:`commit_mllm.data`).
            for_generation: Drop the last answer and end with the assistant prompt.

        Returns:
            ``(input_ids, labels)``, lists of equal length (labels all ``-100`` for
            generation).
        """
        turns = sample["conversations"]
        if for_generation:
            turns = turns[:-1] if turns and turns[-1]["from"] == "gpt" else turns
        input_ids: list[int] = []
        labels: list[int] = []
        for text, supervised in self.segments(turns, for_generation):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            input_ids += ids
            labels += ids if supervised and not for_generation else [IGNORE_INDEX] * len(ids)
        return self._truncate_and_check(sample, input_ids, labels, for_generation)

    def _truncate_and_check(
        self, sample: Sample, input_ids: list[int], labels: list[int], for_generation: bool
    ) -> tuple[list[int], list[int]]:
        """Apply ``max_length`` and check one placeholder per present modality."""
        sid = sample.get("id", "?")
        if len(input_ids) > self.max_length:
            if for_generation:  # keep the assistant prompt, the model must continue it
                input_ids, labels = input_ids[-self.max_length :], labels[-self.max_length :]
            else:
                input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            if not for_generation and all(v == IGNORE_INDEX for v in labels):
                raise ValueError(f"sample {sid}: max_length={self.max_length} cuts every answer")
        for key, tid, name in (
            ("image", self.image_token_id, self.image_token),
            ("audio", self.audio_token_id, self.audio_token),
        ):
            want = int(sample.get(key) is not None)
            have = input_ids.count(tid)
            if have != want:
                raise ValueError(
                    f"sample {sid}: expected {want} '{name}' placeholder token(s), found {have}"
                    + (f" (max_length={self.max_length} may have cut it)" if want else "")
                )
        return input_ids, labels

    # ----------------------------------------------------------------- batching
    def _pad(self, rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
        """Pad lists of ids into a long tensor ``[B, max_len]``."""
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                start = width - len(r) if left else 0
                out[i, start : start + len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def media(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Image / audio features of a batch.

        Args:
            samples: ``B`` samples; within one batch either all or none have an image (same
                for audio), since the model expects one feature row per sample.

        Returns:
            ``pixel_values`` ``[B, 3, H, W]`` and/or ``input_features`` ``[B, n_mels, T]`` +
            ``feature_attention_mask`` ``[B, T]``; empty for text-only batches.
        """
        out: dict[str, torch.Tensor] = {}
        for key in ("image", "audio"):
            present = [s.get(key) is not None for s in samples]
            if any(present) and not all(present):
                raise ValueError(f"batch mixes samples with and without '{key}'")
            if not any(present):
                continue
            if key == "image":
                if self.image_processor is None:
                    raise ValueError("image samples need Collator(image_processor=...)")
                out["pixel_values"] = image_features(
                    [s["image"] for s in samples], self.image_processor
                )
            else:
                if self.feature_extractor is None:
                    raise ValueError("audio samples need Collator(feature_extractor=...)")
                rate = getattr(self.feature_extractor, "sampling_rate", TARGET_SAMPLING_RATE)
                clips = [load_audio(s["audio"], s.get("sampling_rate"), rate) for s in samples]
                feats, mask = audio_features(clips, self.feature_extractor)
                out["input_features"], out["feature_attention_mask"] = feats, mask
        if self.blind:
            for key in ("pixel_values", "input_features"):
                if key in out:
                    out[key] = torch.zeros_like(out[key])
        return out

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """Build a training batch; see the class docstring for keys and shapes."""
        encoded = [self.encode(s) for s in samples]
        pad_id = self.tokenizer.pad_token_id
        ids = [e[0] for e in encoded]
        batch: dict[str, Any] = {
            "input_ids": self._pad(ids, pad_id, left=False),
            "attention_mask": self._pad([[1] * len(r) for r in ids], 0, left=False),
            "labels": self._pad([e[1] for e in encoded], IGNORE_INDEX, left=False),
        }
        batch.update(self.media(samples))
        if any(s.get("question_type") is not None for s in samples):
            batch["question_type"] = [s.get("question_type") or "" for s in samples]
        return batch

    def generation_batch(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """Build a prompt-only, left-padded batch for ``generate`` plus the references.

        The conversation is cut before its last gpt turn; that turn's text is the reference.

        Args:
            samples: ``B`` samples.

        Returns:
            ``input_ids`` / ``attention_mask`` long ``[B, L]`` left-padded, the media tensors
            of :meth:`media`, ``answers`` (``list[str]``, reference answers), ``ids``
            (``list[str]``) and ``question_type`` (``list[str]``) when present.
        """
        ids = [self.encode(s, for_generation=True)[0] for s in samples]
        batch: dict[str, Any] = {
            "input_ids": self._pad(ids, self.tokenizer.pad_token_id, left=True),
            "attention_mask": self._pad([[1] * len(r) for r in ids], 0, left=True),
        }
        batch.update(self.media(samples))
        batch["answers"] = [reference_answer(s) for s in samples]
        batch["ids"] = [str(s.get("id", i)) for i, s in enumerate(samples)]
        if any(s.get("question_type") is not None for s in samples):
            batch["question_type"] = [s.get("question_type") or "" for s in samples]
        return batch


def reference_answer(sample: Sample) -> str:
    """Text of the last gpt turn of a sample (``""`` if it has none)."""
    turns = sample.get("conversations") or []
    return turns[-1]["value"] if turns and turns[-1]["from"] == "gpt" else ""


def collate_for_generation(
    samples: Sequence[Sample],
    tokenizer: Any,
    image_processor: Any = None,
    feature_extractor: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Functional form of :meth:`Collator.generation_batch`.

    Args:
        samples: ``B`` samples.
        tokenizer: Transformers tokenizer.
        image_processor: Image processor for image samples.
        feature_extractor: Whisper feature extractor for audio samples.
        **kwargs: Other :class:`Collator` arguments (``max_length``, ``system_prompt``...).

    Returns:
        The generation batch (left-padded ``input_ids`` ``[B, L]``, media, ``answers``).
    """
    collator = Collator(tokenizer, image_processor, feature_extractor, **kwargs)
    return collator.generation_batch(samples)
