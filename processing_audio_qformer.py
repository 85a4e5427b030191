# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Pre-processing of the audio Q-Former system: waveforms to BEATs' normalised Kaldi fbank.

BEATs (microsoft/unilm, `beats/BEATs.py`, `BEATs.preprocess`) scales a 16 kHz mono waveform to the int16 range, takes a
Kaldi-compatible log mel filter bank (128 bins, 25 ms frames every 10 ms, povey window, pre-emphasis 0.97, DC offset
removed, no dither) and normalises it with a fixed mean and twice a fixed standard deviation. The official code calls
`torchaudio.compliance.kaldi.fbank` clip by clip; here the same recipe is written with `transformers.audio_utils`
(`mel_filter_bank(mel_scale="kaldi")`, `window_function("povey")`) and NumPy, framing and transforming all frames of a
clip at once (`BeatsFeatureExtractor._log_mel`), which needs no torchaudio.
"""

import warnings
from typing import Any

import numpy as np
from transformers import BatchFeature, ProcessorMixin, SequenceFeatureExtractor
from transformers.audio_utils import mel_filter_bank, window_function
from transformers.utils import TensorType, logging


# Relative first, as in the modeling file: as Hub remote code the three files form one package.
try:
    from .configuration_audio_qformer import add_decoder_token
except ImportError:
    from configuration_audio_qformer import add_decoder_token


logger = logging.get_logger(__name__)

# Kaldi floors the mel energies at float32 machine epsilon before the log.
KALDI_LOG_FLOOR = float(np.finfo(np.float32).eps)


class BeatsFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns 16 kHz mono waveforms into the normalised Kaldi fbank that [`BeatsModel`] takes, with a mask of the real
    (non-padding) frames.

    Every constant of the recipe is an argument, so it is saved with a checkpoint (`preprocessor_config.json` or the
    processor's config) rather than hard-coded.

    Args:
        feature_size (`int`, *optional*, defaults to 128):
            Number of mel bins. BEATs patches the fbank with 16x16 patches, so use a multiple of 16.
        sampling_rate (`int`, *optional*, defaults to 16000):
            The sampling rate the waveforms must have. Other rates are refused: resample first.
        frame_length_ms (`float`, *optional*, defaults to 25.0):
            Analysis window length in milliseconds (400 samples at 16 kHz).
        frame_shift_ms (`float`, *optional*, defaults to 10.0):
            Hop between frames in milliseconds (160 samples at 16 kHz).
        preemphasis (`float`, *optional*, defaults to 0.97):
            Pre-emphasis coefficient applied inside each frame, as Kaldi does.
        min_frequency (`float`, *optional*, defaults to 20.0):
            Lowest edge of the mel filters in Hz (Kaldi's `low_freq`).
        max_frequency (`float`, *optional*):
            Highest edge of the mel filters in Hz; defaults to the Nyquist frequency (Kaldi's `high_freq=0`).
        waveform_scale (`float`, *optional*, defaults to 32768.0):
            Factor applied to float waveforms in [-1, 1] before the fbank, so they have the int16 range Kaldi expects.
        fbank_mean (`float`, *optional*, defaults to 15.41663):
            Mean subtracted from the log fbank (BEATs' constant).
        fbank_std (`float`, *optional*, defaults to 6.55582):
            Standard deviation of the log fbank; BEATs divides by twice this value (target standard deviation 0.5).
        min_num_frames (`int`, *optional*, defaults to 16):
            Clips are zero-padded (as audio, i.e. with silence that counts as part of the clip) to at least this many
            frames. 16 frames make one BEATs time patch, so every clip yields at least one token.
        padding_value (`float`, *optional*):
            Value of padding frames. Defaults to the normalised fbank of silence, so that padded frames look like a
            zero-padded waveform even when no mask is used.
        return_attention_mask (`bool`, *optional*, defaults to `True`):
            Whether to return `feature_attention_mask` (1 for real frames, 0 for padding). It is not called
            `attention_mask`, a name that pipelines reserve for the text.

    Example:

    ```python
    >>> import numpy as np
    >>> from processing_audio_qformer import BeatsFeatureExtractor

    >>> feature_extractor = BeatsFeatureExtractor()
    >>> clips = [np.zeros(16000, dtype=np.float32), np.zeros(32000, dtype=np.float32)]
    >>> features = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    >>> features["input_features"].shape, features["feature_attention_mask"].sum(-1).tolist()
    (torch.Size([2, 198, 128]), [98, 198])
    ```"""

    model_input_names = ["input_features", "feature_attention_mask"]
    # Frames computed at once (60 s at the defaults). It bounds the memory of long clips and leaves the result
    # unchanged, so it is not part of the saved recipe.
    fbank_block_frames = 6000

    def __init__(
        self,
        feature_size: int = 128,
        sampling_rate: int = 16000,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        preemphasis: float = 0.97,
        min_frequency: float = 20.0,
        max_frequency: float | None = None,
        waveform_scale: float = 32768.0,
        fbank_mean: float = 15.41663,
        fbank_std: float = 6.55582,
        min_num_frames: int = 16,
        padding_value: float | None = None,
        return_attention_mask: bool = True,
        **kwargs,
    ):
        if padding_value is None:
            padding_value = (np.log(KALDI_LOG_FLOOR) - fbank_mean) / (2 * fbank_std)
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=float(padding_value),
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.frame_length_ms = frame_length_ms
        self.frame_shift_ms = frame_shift_ms
        self.preemphasis = preemphasis
        self.min_frequency = min_frequency
        self.max_frequency = max_frequency
        self.waveform_scale = waveform_scale
        self.fbank_mean = fbank_mean
        self.fbank_std = fbank_std
        self.min_num_frames = min_num_frames

        # Derived arrays: recomputed here, never saved (see `to_dict`).
        self.frame_length = int(round(sampling_rate * frame_length_ms / 1000))
        self.hop_length = int(round(sampling_rate * frame_shift_ms / 1000))
        # Kaldi rounds the FFT size up to a power of two (`round_to_power_of_two=True`): 400 -> 512.
        self.fft_length = 1 << (self.frame_length - 1).bit_length()
        with warnings.catch_warnings():
            # At 128 bins and 16 kHz one triangular filter covers no FFT bin; Kaldi's filter bank has the same
            # empty filter, whose log energy is the floor. transformers warns about it; the numbers are right.
            warnings.simplefilter("ignore")
            self.mel_filters = mel_filter_bank(
                num_frequency_bins=self.fft_length // 2 + 1,
                num_mel_filters=feature_size,
                min_frequency=min_frequency,
                max_frequency=max_frequency if max_frequency is not None else sampling_rate / 2,
                sampling_rate=sampling_rate,
                norm=None,
                mel_scale="kaldi",
                triangularize_in_mel_space=True,
            )
        self.window = window_function(self.frame_length, "povey", periodic=False)

    def to_dict(self) -> dict[str, Any]:
        """The saved configuration: the recipe's constants, without the arrays derived from them."""
        output = super().to_dict()
        for derived in ("mel_filters", "window", "frame_length", "hop_length", "fft_length"):
            output.pop(derived, None)
        return output

    def min_num_samples(self) -> int:
        """Shortest waveform that yields `min_num_frames` frames (2800 samples, 0.175 s, at the defaults)."""
        return self.frame_length + (self.min_num_frames - 1) * self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Frames Kaldi cuts from `num_samples` samples (`snip_edges=True`), after padding to the minimum length."""
        num_samples = max(num_samples, self.min_num_samples())
        return 1 + (num_samples - self.frame_length) // self.hop_length

    def _log_mel(self, waveform: np.ndarray) -> np.ndarray:
        """
        Kaldi log mel energies of every frame of `waveform`, shape `(frames, feature_size)`, float64.

        The recipe of `transformers.audio_utils.spectrogram` with Kaldi's options (`center=False` for snip_edges, DC
        offset removed, pre-emphasis inside the frame, povey window, power spectrum, mel filters, log with the float32
        epsilon as floor), vectorised over frames: `spectrogram` runs one FFT per frame in a Python loop, which made
        this extractor three times slower than kaldi-native-fbank.
        """
        # (frames, frame_length) view of the overlapping windows; the float64 copy is the working buffer.
        frames = np.lib.stride_tricks.sliding_window_view(waveform, self.frame_length)[:: self.hop_length]
        frames = np.multiply(frames, self.waveform_scale, dtype=np.float64)
        frames -= frames.mean(axis=1, keepdims=True)
        # Kaldi's pre-emphasis replicates the first sample: x[0] - p * x[0]. The right side is a temporary, so the
        # in-place update reads the original samples.
        frames[:, 1:] -= self.preemphasis * frames[:, :-1]
        frames[:, 0] *= 1.0 - self.preemphasis
        frames *= self.window
        spectrum = np.fft.rfft(frames, n=self.fft_length)
        power = np.square(spectrum.real) + np.square(spectrum.imag)
        return np.log(np.maximum(power @ self.mel_filters, KALDI_LOG_FLOOR))

    def _fbank(self, waveform: np.ndarray) -> np.ndarray:
        """Normalised log mel fbank of one mono clip, shape `(frames, feature_size)`, float32."""
        shortfall = self.min_num_samples() - waveform.shape[0]
        if shortfall > 0:
            waveform = np.pad(waveform, (0, shortfall))
        # Frames are independent (Kaldi's snip_edges), so a long clip is done in blocks of frames: the float64
        # spectrogram of an hour would otherwise take ~4 GB. Only the float32 result grows with the length.
        num_frames = 1 + (waveform.shape[0] - self.frame_length) // self.hop_length
        blocks = []
        for first in range(0, num_frames, self.fbank_block_frames):
            count = min(self.fbank_block_frames, num_frames - first)
            start = first * self.hop_length
            segment = waveform[start : start + self.frame_length + (count - 1) * self.hop_length]
            log_mel = self._log_mel(segment)
            blocks.append(((log_mel - self.fbank_mean) / (2 * self.fbank_std)).astype(np.float32))
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)

    def _as_mono_clips(self, raw_speech) -> list[np.ndarray]:
        """Validate the input and return a list of 1-D float arrays (one per clip)."""
        name = self.__class__.__name__
        if isinstance(raw_speech, np.ndarray) or hasattr(raw_speech, "numpy"):
            array = np.asarray(raw_speech.detach().cpu() if hasattr(raw_speech, "detach") else raw_speech)
            if array.ndim == 1:
                clips = [array]
            elif array.ndim == 2:
                # A 2-D array is a batch (clips, samples). A (samples, channels) recording is the usual mistake.
                if array.shape[1] <= 8 < array.shape[0]:
                    raise ValueError(
                        f"{name} expects mono audio; got an array of shape {array.shape}, which looks like "
                        f"(samples, {array.shape[1]} channels). Downmix it first, e.g. `audio.mean(axis=1)`. "
                        "A 2-D array is otherwise read as a batch of shape (clips, samples)."
                    )
                clips = list(array)
            else:
                raise ValueError(f"{name} expects mono audio; got an array with {array.ndim} dimensions.")
        elif isinstance(raw_speech, (list, tuple)) and len(raw_speech) > 0 and not np.isscalar(raw_speech[0]):
            clips = [np.asarray(clip.detach().cpu() if hasattr(clip, "detach") else clip) for clip in raw_speech]
        elif isinstance(raw_speech, (list, tuple)):
            clips = [np.asarray(raw_speech)]  # one clip given as a list of numbers (or an empty list)
        else:
            raise TypeError(f"{name} expects a waveform or a list of waveforms, got {type(raw_speech).__name__}.")

        if len(clips) == 0:
            raise ValueError(f"{name} got an empty batch: pass at least one waveform.")
        mono = []
        for index, clip in enumerate(clips):
            if clip.ndim > 1:
                if sum(size > 1 for size in clip.shape) > 1:
                    raise ValueError(
                        f"{name} expects mono audio; clip {index} has shape {clip.shape}. Downmix multi-channel "
                        "audio first (e.g. average the channels)."
                    )
                clip = clip.reshape(-1)
            if not np.issubdtype(clip.dtype, np.floating):
                raise ValueError(
                    f"{name} expects float waveforms in [-1, 1]; clip {index} has dtype {clip.dtype}. "
                    "Convert integer PCM first (int16: divide by 32768)."
                )
            if clip.size == 0:
                raise ValueError(f"{name} got an empty waveform (clip {index} has no samples).")
            if not np.isfinite(clip).all():
                raise ValueError(f"{name} got non-finite samples (NaN or inf) in clip {index}.")
            mono.append(clip)  # float64 only block by block, in `_fbank`: no copy of a long clip
        return mono

    def __call__(
        self,
        raw_speech: np.ndarray | list[float] | list[np.ndarray],
        sampling_rate: int | None = None,
        padding: bool | str = "longest",
        max_length: int | None = None,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | TensorType | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Compute BEATs' fbank for one clip or a batch of clips.

        Args:
            raw_speech (`np.ndarray`, `list[float]`, `list[np.ndarray]` or `torch.Tensor`):
                One mono float waveform in [-1, 1], a list of them (lengths may differ), or a 2-D array of shape
                `(clips, samples)`.
            sampling_rate (`int`, *optional*):
                The waveforms' sampling rate. It must equal `self.sampling_rate`; pass it to have that checked.
            padding (`bool` or `str`, *optional*, defaults to `"longest"`):
                Pad to the longest clip (`"longest"`/`True`), to `max_length` frames (`"max_length"`) or not at all
                (`False`, which then requires equal lengths for tensors).
            max_length (`int`, *optional*):
                Length in frames for `padding="max_length"` or `truncation=True`.
            truncation (`bool`, *optional*, defaults to `False`):
                Cut clips longer than `max_length` frames.
            pad_to_multiple_of (`int`, *optional*):
                Pad the frame axis to a multiple of this value (16 aligns it with BEATs' time patches).
            return_attention_mask (`bool`, *optional*):
                Whether to return `feature_attention_mask`; defaults to the extractor's setting.
            return_tensors (`str` or [`~utils.TensorType`], *optional*):
                `"pt"` for PyTorch tensors, `"np"` for NumPy arrays; lists when unset.

        Returns:
            [`BatchFeature`] with `input_features` of shape `(batch, frames, feature_size)` and, unless disabled,
            `feature_attention_mask` of shape `(batch, frames)`. Always a batch, even for a single clip.
        """
        name = self.__class__.__name__
        if sampling_rate is not None:
            if sampling_rate != self.sampling_rate:
                raise ValueError(
                    f"{name} was set up for audio sampled at {self.sampling_rate} Hz, but the input is sampled at "
                    f"{sampling_rate} Hz. Resample the audio to {self.sampling_rate} Hz first."
                )
        else:
            logger.warning(
                f"It is strongly recommended to pass the `sampling_rate` argument to {name}. "
                "Failing to do so can result in silent errors that might be hard to debug."
            )

        clips = self._as_mono_clips(raw_speech)
        if truncation and max_length is not None:
            # Cut as audio first, so that only the frames kept are computed (an hour-long clip costs no more than
            # `max_length` frames).
            clips = [clip[: self.frame_length + (max_length - 1) * self.hop_length] for clip in clips]
        fbanks = [self._fbank(clip) for clip in clips]
        batch = BatchFeature({"input_features": fbanks})
        return_attention_mask = self.return_attention_mask if return_attention_mask is None else return_attention_mask
        padded = self.pad(
            batch,
            padding=padding,
            max_length=max_length,
            truncation=truncation,
            pad_to_multiple_of=pad_to_multiple_of,
            return_attention_mask=return_attention_mask,
        )
        outputs = {"input_features": padded["input_features"]}
        if return_attention_mask:
            outputs["feature_attention_mask"] = padded["attention_mask"]
        # `pad` leaves unpadded ragged lists as lists; tensors need one array per key.
        return BatchFeature(outputs, tensor_type=return_tensors)


class AudioQFormerProcessor(ProcessorMixin):
    r"""
    Wraps a [`BeatsFeatureExtractor`] and a BERT tokenizer into one processor: `processor(text=..., audio=...,
    sampling_rate=16000, return_tensors="pt")` returns `input_ids`, `attention_mask` and `input_features`,
    `feature_attention_mask`, which [`AudioQFormerModel`] takes as they are.

    The tokenizer gets the `[DEC]` token (as `bos_token`) when it lacks it, so any BERT tokenizer works; the model's
    vocabulary must then include it (`audio_qformer.building.from_components` sizes it so).

    Options shared by both sides (`padding`, `max_length`, `truncation`) reach the feature extractor too, where
    lengths count frames; with audio in the same call, give text options as `text_kwargs={"max_length": 32, ...}`.

    Args:
        feature_extractor ([`BeatsFeatureExtractor`]): the audio side.
        tokenizer ([`BertTokenizer`] or any BERT-vocabulary tokenizer): the text side.
    """

    # Texts are truncated to the model's evaluation length (35) unless the tokenizer brings its own `max_length`
    # (transformers gives tokenizer settings priority); training and evaluation pass the config's lengths explicitly.
    # BERT's token type ids are of no use to the Q-Former.
    text_kwargs = {"padding": "longest", "truncation": True, "max_length": 35, "return_token_type_ids": False}

    def __init__(self, feature_extractor, tokenizer):
        add_decoder_token(tokenizer)
        super().__init__(feature_extractor, tokenizer)


BeatsFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
AudioQFormerProcessor.register_for_auto_class("AutoProcessor")


__all__ = ["AudioQFormerProcessor", "BeatsFeatureExtractor", "add_decoder_token"]
