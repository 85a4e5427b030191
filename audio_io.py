# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Audio files in, 16 kHz mono float32 waveforms out: decoding (soundfile), resampling (soxr), listing audio files, and
the windows a long clip is embedded in.

Nothing here imports `datasets`: searching a library reads one file with this module alone.
"""

import glob
import io
import math
import os

import numpy as np
from transformers.utils import logging


logger = logging.get_logger(__name__)

SAMPLING_RATE = 16000
# Frames decoded at a time (about 1.4 s at 48 kHz).
BLOCK_FRAMES = 65536
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aiff", ".aif", ".au")


# 64 BEATs time patches (512 tokens, 10.24 s): the report's training crop, so a window is what the model was trained on.
WINDOW_SECONDS = 10.24
HOP_SECONDS = 5.12


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """First samples of the windows covering a clip: one window if it fits, else every `hop`, the last ending with it."""
    if num_samples <= window:
        return [0]
    starts = list(range(0, num_samples - window + 1, hop))
    if starts[-1] + window < num_samples:
        starts.append(num_samples - window)
    return starts


# A caption describes a whole clip up to this long (Clotho's longest clips, which DCASE captions whole); a longer
# recording gets one caption per window, each saying what happens from its start.
CAPTION_WHOLE_SECONDS = 30.0


def caption_spans(num_samples: int, sampling_rate: int = SAMPLING_RATE) -> list[tuple[int, int]]:
    """`(first, end)` samples of the parts of a clip to caption: all of it, or its windows when it is long."""
    if num_samples <= CAPTION_WHOLE_SECONDS * sampling_rate:
        return [(0, num_samples)]
    window, hop = round(WINDOW_SECONDS * sampling_rate), round(HOP_SECONDS * sampling_rate)
    return [(start, start + window) for start in window_starts(num_samples, window, hop)]


class AudioLoadError(ValueError):
    """A clip that cannot be used: missing, unreadable, empty or with non-finite samples. `str()` is "name: reason"."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def load_audio(
    path: str | None = None,
    data: bytes | None = None,
    sampling_rate: int = SAMPLING_RATE,
    max_seconds: float | None = None,
) -> np.ndarray:
    """
    Read one clip (a file, or encoded bytes) as a mono float32 waveform at `sampling_rate`.

    Channels are averaged; other sampling rates are resampled with soxr (high quality). With `max_seconds`, only the
    start of the clip is decoded, so an hour-long file costs no more than that. Raises `AudioLoadError` naming the clip
    and the reason when it is missing, unreadable, empty or holds NaN/inf samples. A WAV whose header promises more
    data than the file holds (a cut download, or a writer that streamed it) gives the samples present, with a warning.
    """
    import soundfile
    import soxr

    name = path if path else "<bytes>"
    if path and not os.path.isfile(path):
        raise AudioLoadError(name, "no such file")
    if path and not os.access(path, os.R_OK):
        raise AudioLoadError(name, "permission denied")
    if (os.path.getsize(path) if path else len(data or b"")) == 0:
        raise AudioLoadError(name, "empty file (0 bytes)")
    parts = []
    try:
        with soundfile.SoundFile(path if path else io.BytesIO(data)) as handle:
            rate = handle.samplerate
            frames = -1 if max_seconds is None else math.ceil(max_seconds * rate)
            # Read in blocks, each mixed to mono and resampled as it comes (soxr's stream gives the one-shot result
            # exactly): memory holds the 16 kHz mono clip only, whatever the file's channels and sampling rate.
            stream = None if rate == sampling_rate else soxr.ResampleStream(rate, sampling_rate, 1, "float32", "HQ")
            blocks = handle.blocks(BLOCK_FRAMES, frames=frames, dtype="float32", always_2d=True)
            block = next(blocks, None)
            while block is not None:
                following = next(blocks, None)
                mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1)
                if not np.isfinite(mono).all():
                    raise AudioLoadError(name, "NaN or infinite samples")
                parts.append(mono if stream is None else stream.resample_chunk(mono, last=following is None))
                block = following
            if "should be" in handle.extra_info:  # libsndfile's log: a chunk size that disagrees with the file
                logger.warning(f"{name}: the header's sizes disagree with the file (truncated?); read what is there.")
    except AudioLoadError:
        raise
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, TypeError depending on the cause
        # LibsndfileError's own message repeats the file name; its `error_string` is the reason alone.
        reason = getattr(error, "error_string", None) or f"{type(error).__name__}: {error}"
        if name.lower().endswith((".m4a", ".aac", ".mp4", ".webm")):
            reason += "; libsndfile does not decode AAC or WebM audio: convert it first, e.g. `ffmpeg -i in.m4a out.flac`"
        raise AudioLoadError(name, f"unreadable audio ({reason})") from error
    if not parts:
        raise AudioLoadError(name, "no samples")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def resampled(waveform, sampling_rate: int, target: int = SAMPLING_RATE) -> np.ndarray:
    """
    A decoded clip (`(samples,)` or `(samples, channels)`, any rate) as mono float32 at `target`, as `load_audio`
    makes a file's (channels averaged, soxr's high quality): for audio that arrives decoded, e.g. from a dataset.
    """
    import soxr

    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim == 2:
        waveform = waveform[:, 0] if waveform.shape[1] == 1 else waveform.mean(axis=1)
    if waveform.ndim != 1 or waveform.size == 0:
        raise ValueError(f"Expected a non-empty waveform of shape (samples,) or (samples, channels); got {waveform.shape}.")
    if sampling_rate != target:
        waveform = soxr.resample(waveform, sampling_rate, target, quality="HQ").astype(np.float32)
    return waveform


def audio_files(directory: str, extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> list[str]:
    """Every audio file (by `extensions`) under `directory` (recursively), sorted."""
    found = glob.glob(os.path.join(glob.escape(directory), "**", "*"), recursive=True)
    return sorted(p for p in found if p.lower().endswith(extensions) and os.path.isfile(p))


__all__ = [
    "AUDIO_EXTENSIONS", "AudioLoadError", "CAPTION_WHOLE_SECONDS", "HOP_SECONDS", "SAMPLING_RATE", "WINDOW_SECONDS",
    "audio_files", "caption_spans", "load_audio", "resampled", "window_starts",
]  # fmt: skip
