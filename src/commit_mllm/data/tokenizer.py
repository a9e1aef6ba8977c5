"""Offline tokenizers: a tiny byte-level BPE trained on task texts, and placeholder handling.

The tiny tokenizer is trained locally with the ``tokenizers`` library (no hub access), is
lower-case, deterministic for a given corpus, and is wrapped as a transformers fast
tokenizer so ``save_pretrained`` / ``AutoTokenizer.from_pretrained(folder)`` work.
Real Hugging Face tokenizers are supported too: :func:`add_placeholder_tokens` adds the
``<image>`` / ``<audio>`` special tokens when missing and reports whether the model's
embedding matrix must be resized.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

IMAGE_TOKEN = "<image>"
"""Placeholder for the image features in prompts (one token per sample)."""
AUDIO_TOKEN = "<audio>"
"""Placeholder for the audio features in prompts (one token per sample)."""
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN, AUDIO_TOKEN)
"""Special tokens of the tiny tokenizer; their ids are 0..5 in this order."""

# Words of the plain prompt template, so they get their own merges in the tiny tokenizer.
TEMPLATE_TEXTS = ("USER: ASSISTANT:", "user: assistant:")


def train_tiny_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    min_frequency: int = 1,
    model_max_length: int = 2048,
) -> Any:
    """Train a lower-case byte-level BPE tokenizer on ``texts``.

    Byte-level BPE never produces ``<unk>`` and decodes back to the (lower-cased) input
    exactly, which keeps answer matching simple. Training is deterministic: the same texts
    always give the same vocabulary and merges.

    Args:
        texts: Training corpus (e.g. :func:`commit_mllm.tasks.task_texts`). The template
            words ``USER:`` / ``ASSISTANT:`` are always added, and every text is also
            seen with a leading space.
        vocab_size: Upper bound of the vocabulary, specials and the 256 byte symbols
            included; the corpus may saturate earlier (easy-VQA alone gives ~370).
        min_frequency: Minimum pair count for a merge.
        model_max_length: Stored as the tokenizer's ``model_max_length``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``<pad>``=0, ``<s>``=1, ``</s>``=2,
        ``<unk>``=3, ``<image>``=4, ``<audio>``=5.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Each text is also fed with a leading space: the plain template puts answers after
    # "ASSISTANT:" as " {answer}", so "Ġyes" must be a merge, not "Ġ" + "yes".
    # Duplicates are dropped (order kept): task corpora repeat a few hundred distinct
    # questions tens of thousands of times, and deduplication makes training ~10x faster.
    unique = dict.fromkeys(texts)
    corpus = [*TEMPLATE_TEXTS, *unique, *(f" {t}" for t in unique)]
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return wrap_tokenizer(tok, model_max_length=model_max_length)


def wrap_tokenizer(tokenizer_object: Any, model_max_length: int = 2048) -> Any:
    """Wrap a raw ``tokenizers.Tokenizer`` containing :data:`SPECIAL_TOKENS` for transformers.

    Args:
        tokenizer_object: A ``tokenizers.Tokenizer``.
        model_max_length: Maximum sequence length recorded in the config.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN, AUDIO_TOKEN],
        model_max_length=model_max_length,
    )


def load_tokenizer(folder: str) -> Any:
    """Load a tokenizer saved with ``save_pretrained`` (offline, local files only).

    Args:
        folder: Directory written by ``tokenizer.save_pretrained``.

    Returns:
        The tokenizer (``AutoTokenizer.from_pretrained(folder, local_files_only=True)``).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@dataclass(frozen=True)
class PlaceholderInfo:
    """Placeholder token ids of a tokenizer, as returned by :func:`add_placeholder_tokens`.

    Attributes:
        image_token_id: Id of ``<image>``.
        audio_token_id: Id of ``<audio>``.
        num_added: Tokens added to the tokenizer (placeholders and possibly ``<pad>``). When
            > 0 the model must call ``resize_token_embeddings(len(tokenizer))``.
        vocab_size: ``len(tokenizer)`` after the additions.
    """

    image_token_id: int
    audio_token_id: int
    num_added: int
    vocab_size: int

    @property
    def needs_resize(self) -> bool:
        """Whether the model's embeddings must be resized to ``vocab_size``."""
        return self.num_added > 0


def add_placeholder_tokens(
    tokenizer: Any, image_token: str = IMAGE_TOKEN, audio_token: str = AUDIO_TOKEN
) -> PlaceholderInfo:
    """Make ``tokenizer`` usable by the collator: placeholders as special tokens, a pad token.

    Tokens already present in the vocabulary (e.g. the tiny tokenizer's) are reused, so the
    call is idempotent. A tokenizer without a pad token gets its eos token as pad (no new
    embedding row needed); only if it has neither is ``<pad>`` added.

    Args:
        tokenizer: Any transformers tokenizer; modified in place.
        image_token: Image placeholder string.
        audio_token: Audio placeholder string.

    Returns:
        The placeholder ids and how many tokens were added (resize the model if > 0).
    """
    size_before = len(tokenizer)
    # A placeholder must encode to exactly one id even inside text ("\n<image>\n"); a plain
    # vocabulary entry may be split by the pre-tokenizer, so register it as special then.
    missing = [
        t
        for t in (image_token, audio_token)
        if len(tokenizer.encode(f"a {t}\nb", add_special_tokens=False))
        != len(tokenizer.encode("a ", add_special_tokens=False))
        + 1
        + len(tokenizer.encode("\nb", add_special_tokens=False))
        or t not in tokenizer.get_vocab()
    ]
    if missing:
        try:  # transformers >= 5 renamed "additional" to "extra" special tokens
            tokenizer.add_special_tokens(
                {"extra_special_tokens": missing}, replace_extra_special_tokens=False
            )
        except (TypeError, ValueError):
            tokenizer.add_special_tokens(
                {"additional_special_tokens": missing}, replace_additional_special_tokens=False
            )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    num_added = len(tokenizer) - size_before
    return PlaceholderInfo(
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        audio_token_id=tokenizer.convert_tokens_to_ids(audio_token),
        num_added=num_added,
        vocab_size=len(tokenizer),
    )
