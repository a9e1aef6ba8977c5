"""Image and audio loading, resampling and feature extraction.

Everything here is PIL / numpy / soundfile based: torchvision and torchaudio are not
usable in the target environment, so images go through transformers' PIL image processors
and audio through ``WhisperFeatureExtractor`` (numpy).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

TARGET_SAMPLING_RATE = 16_000
"""Sampling rate (Hz) that every audio clip is converted to before feature extraction."""

ImageLike = Any  # str | os.PathLike | PIL.Image.Image
AudioLike = Any  # str | os.PathLike | np.ndarray | {"array": ..., "sampling_rate": ...}


class MediaError(ValueError):
    """A media file is missing, unreadable or corrupt; the message names the file."""


def load_image(image: ImageLike) -> Any:
    """Load an image as an RGB ``PIL.Image``.

    Args:
        image: A path or an already opened ``PIL.Image.Image``.

    Returns:
        The image, converted to RGB and fully decoded.

    Raises:
        MediaError: If the file does not exist or cannot be decoded (the message names it).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    path = Path(os.fspath(image))
    if not path.is_file():
        raise MediaError(f"image file not found: '{path}'")
    try:
        with Image.open(path) as img:
            # .load() forces a full decode so truncated files fail here, not in a worker later.
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several unrelated exception types
        raise MediaError(
            f"cannot read image '{path}': corrupt or unsupported file ({exc})"
        ) from exc


def _to_mono(audio: np.ndarray) -> np.ndarray:
    """Average channels; accepts ``[n]``, ``[n, channels]`` or ``[channels, n]``."""
    if audio.ndim == 1:
        return audio
    if audio.ndim != 2:
        raise MediaError(f"audio array must be 1-D or 2-D, got shape {audio.shape}")
    # soundfile returns [frames, channels]; a short first axis means [channels, frames].
    axis = 0 if audio.shape[0] < audio.shape[1] and audio.shape[0] <= 8 else 1
    return audio.mean(axis=axis)


def _lowpass(audio: np.ndarray, cutoff: float, num_taps: int = 63) -> np.ndarray:
    """Windowed-sinc FIR low-pass; ``cutoff`` is a fraction of the sampling rate (< 0.5)."""
    n = np.arange(num_taps) - (num_taps - 1) / 2
    taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(num_taps)
    taps /= taps.sum()
    return np.convolve(audio, taps, mode="same")


def resample(
    audio: np.ndarray, orig_rate: int, target_rate: int = TARGET_SAMPLING_RATE
) -> np.ndarray:
    """Resample a mono clip with linear interpolation (low-pass filtered when downsampling).

    Args:
        audio: Float array ``[n_samples]``.
        orig_rate: Sampling rate of ``audio`` in Hz.
        target_rate: Desired sampling rate in Hz.

    Returns:
        Float32 array ``[round(n_samples * target_rate / orig_rate)]``.
    """
    if orig_rate == target_rate or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    if orig_rate <= 0:
        raise MediaError(f"invalid sampling rate {orig_rate}")
    if target_rate < orig_rate:
        # Remove content above the new Nyquist frequency first, otherwise it aliases.
        audio = _lowpass(audio, 0.5 * target_rate / orig_rate * 0.95)
    n_out = max(1, round(audio.size * target_rate / orig_rate))
    t_out = np.arange(n_out) * (orig_rate / target_rate)
    return np.interp(t_out, np.arange(audio.size), audio).astype(np.float32)


def load_audio(
    audio: AudioLike,
    sampling_rate: int | None = None,
    target_rate: int = TARGET_SAMPLING_RATE,
) -> np.ndarray:
    """Load a clip as mono float32 at ``target_rate``.

    Args:
        audio: A path to a sound file readable by ``soundfile`` (WAV, FLAC, OGG), a numpy
            array ``[n]`` / ``[n, channels]``, or a dict with ``array`` and
            ``sampling_rate`` (the Hugging Face ``datasets`` Audio format).
        sampling_rate: Rate of an array input; ``None`` means it is already ``target_rate``.
            Ignored for files (their header is used).
        target_rate: Output sampling rate in Hz.

    Returns:
        Float32 array ``[n_samples]`` at ``target_rate``.

    Raises:
        MediaError: If a file is missing or unreadable (the message names it).
    """
    if isinstance(audio, dict):
        sampling_rate = audio.get("sampling_rate", sampling_rate)
        audio = audio["array"] if audio.get("array") is not None else audio["path"]
    if isinstance(audio, np.ndarray | torch.Tensor | list):
        array = np.asarray(audio, dtype=np.float32)
        rate = sampling_rate or target_rate
    else:
        array, rate = _read_sound_file(Path(os.fspath(audio)))
    if array.size == 0:
        name = "audio array" if isinstance(audio, np.ndarray | torch.Tensor | list) else audio
        raise MediaError(f"{name}: the clip is empty (0 samples)")
    return resample(_to_mono(array).astype(np.float32), int(rate), target_rate)


def _read_sound_file(path: Path) -> tuple[np.ndarray, int]:
    """Read a sound file with soundfile, mapping every failure to a :class:`MediaError`."""
    import soundfile as sf

    if not path.is_file():
        raise MediaError(f"audio file not found: '{path}'")
    try:
        array, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError
        raise MediaError(
            f"cannot read audio '{path}': corrupt or unsupported file ({exc})"
        ) from exc
    return array, rate


def write_wav(
    path: str | os.PathLike, audio: np.ndarray, sampling_rate: int = TARGET_SAMPLING_RATE
) -> None:
    """Write a mono clip as 16-bit PCM WAV.

    Args:
        path: Output file.
        audio: Float array ``[n_samples]`` in ``[-1, 1]``.
        sampling_rate: Rate in Hz stored in the header.
    """
    import soundfile as sf

    sf.write(os.fspath(path), np.clip(audio, -1.0, 1.0), sampling_rate, subtype="PCM_16")


def image_features(images: Sequence[ImageLike], image_processor: Any) -> torch.Tensor:
    """Load images and run a transformers image processor on them.

    Args:
        images: ``B`` paths or PIL images.
        image_processor: A PIL-based transformers image processor (``CLIPImageProcessor``,
            ``SiglipImageProcessor``, ``ViTImageProcessor``...).

    Returns:
        ``pixel_values`` float tensor ``[B, 3, H, W]``.
    """
    pil_images = [load_image(img) for img in images]
    out = image_processor(images=pil_images, return_tensors="pt")
    return out["pixel_values"].float()


def audio_features(
    clips: Sequence[np.ndarray], feature_extractor: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features padded only to the longest clip of the batch.

    The raw waveforms are zero-padded to the longest clip rounded up to an even number of
    frames (Whisper-style encoders halve the frame count with a stride-2 convolution), so the
    padded region looks like the silence Whisper was trained with, just not 30 s of it.

    Args:
        clips: ``B`` mono float arrays at the extractor's sampling rate (16 kHz).
        feature_extractor: A ``WhisperFeatureExtractor`` (or compatible: ``hop_length``,
            ``sampling_rate`` attributes and the same call signature).

    Returns:
        ``(input_features, feature_attention_mask)``: float tensor ``[B, n_mels, T]`` and long
        tensor ``[B, T]`` (1 = frame overlaps real audio), ``T`` even.
    """
    hop = int(feature_extractor.hop_length)
    longest = max(max(len(c) for c in clips), 1)
    n_frames = math.ceil(longest / hop)
    n_frames += n_frames % 2
    padded = np.zeros((len(clips), n_frames * hop), dtype=np.float32)
    for row, clip in zip(padded, clips, strict=True):
        row[: len(clip)] = clip
    out = feature_extractor(
        list(padded),
        sampling_rate=feature_extractor.sampling_rate,
        padding="do_not_pad",
        truncation=False,
        return_tensors="np",
    )
    features = torch.from_numpy(np.asarray(out["input_features"], dtype=np.float32))
    features = features[:, :, :n_frames]  # the STFT can yield one extra frame; keep T even
    lengths = torch.tensor([math.ceil(len(c) / hop) for c in clips])
    mask = (torch.arange(features.shape[-1])[None, :] < lengths[:, None]).long()
    return features, mask
