"""BeatsFeatureExtractor: Kaldi fbank against an independent implementation, batching, saving, and clear errors."""

import json

import numpy as np
import pytest
import torch
from conftest import make_waveform
from references import kaldi_native_fbank
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from processing_audio_qformer import BeatsFeatureExtractor


@pytest.mark.parametrize("kind", ["mix", "chirp", "quiet"])
def test_fbank_matches_kaldi(kind):
    # kaldi-native-fbank refuses 128 bins at 16 kHz (one mel filter covers no FFT bin), so compare at 80 bins through
    # the same code path, with normalisation constants that make the normalisation the identity.
    extractor = BeatsFeatureExtractor(feature_size=80, fbank_mean=0.0, fbank_std=0.5)
    waveform = make_waveform(3.0, seed=3, kind=kind)
    ours = extractor(waveform, sampling_rate=16000, return_tensors="np")["input_features"][0]
    reference = kaldi_native_fbank(waveform, 80)
    assert ours.shape == reference.shape == (298, 80)
    # Kaldi computes in float32 and this extractor in float64, so bins far below a frame's peak (a pure tone's
    # leakage floor) differ by rounding; compare within 80 dB (18.4 nepers) of each frame's peak.
    audible = reference > reference.max(axis=1, keepdims=True) - np.log(1e8)
    assert audible.mean() > 0.1
    np.testing.assert_allclose(ours[audible], reference[audible], atol=1e-3, rtol=0)


def test_beats_constants_and_frame_count():
    extractor = BeatsFeatureExtractor()
    # 10 s at 16 kHz: 1 + (160000 - 400) // 160 = 998 frames of 128 bins (BEATs' documented layout).
    features = extractor(make_waveform(10.0), sampling_rate=16000, return_tensors="np")
    assert features["input_features"].shape == (1, 998, 128)
    assert features["input_features"].dtype == np.float32
    # Silence hits Kaldi's log floor: (log(float32 eps) - 15.41663) / (2 * 6.55582).
    silence = extractor(np.zeros(16000, np.float32), sampling_rate=16000, return_tensors="np")["input_features"]
    np.testing.assert_allclose(silence, (np.log(np.finfo(np.float32).eps) - 15.41663) / 13.11164, rtol=1e-6)
    np.testing.assert_allclose(extractor.padding_value, silence[0, 0, 0], rtol=1e-6)


def test_batched_equals_unbatched_and_mask():
    extractor = BeatsFeatureExtractor()
    clips = [make_waveform(2.0, seed=1), make_waveform(0.9, seed=2), make_waveform(1.3, seed=3, kind="chirp")]
    batch = extractor(clips, sampling_rate=16000, return_tensors="pt")
    assert batch["input_features"].shape == (3, 198, 128)
    frames = [extractor.num_frames(len(clip)) for clip in clips]
    assert batch["feature_attention_mask"].sum(-1).tolist() == frames == [198, 88, 128]
    for index, clip in enumerate(clips):
        alone = extractor(clip, sampling_rate=16000, return_tensors="pt")["input_features"][0]
        torch.testing.assert_close(batch["input_features"][index, : frames[index]], alone, rtol=0, atol=0)
        assert torch.all(batch["input_features"][index, frames[index] :] == extractor.padding_value)
    # A 2-D array is a batch of equal-length clips.
    stacked = extractor(np.stack([clips[0], clips[0]]), sampling_rate=16000, return_tensors="pt")
    torch.testing.assert_close(stacked["input_features"][1], batch["input_features"][0])


def test_short_clip_is_padded_to_one_patch_and_truncation():
    extractor = BeatsFeatureExtractor()
    features = extractor(make_waveform(0.05), sampling_rate=16000, return_tensors="np")
    assert features["input_features"].shape == (1, 16, 128)  # 16 frames: one BEATs time patch
    assert features["feature_attention_mask"].sum() == 16
    cut = extractor(make_waveform(3.0), sampling_rate=16000, max_length=100, truncation=True, return_tensors="np")
    assert cut["input_features"].shape == (1, 100, 128)


def test_save_and_reload(tmp_path):
    extractor = BeatsFeatureExtractor(fbank_mean=1.0, fbank_std=2.0)
    extractor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["fbank_mean"] == 1.0 and "mel_filters" not in saved and "window" not in saved
    reloaded = BeatsFeatureExtractor.from_pretrained(tmp_path)
    waveform = make_waveform(1.0)
    np.testing.assert_array_equal(
        extractor(waveform, sampling_rate=16000)["input_features"][0],
        reloaded(waveform, sampling_rate=16000)["input_features"][0],
    )


@pytest.mark.parametrize(
    "audio, message",
    [
        ([np.zeros((2, 16000), np.float32)], "mono"),  # a stereo clip in a list
        (np.zeros((16000, 2), np.float32), "channels"),  # (samples, channels) array
        (np.zeros((6, 16000, 1), np.float32), "dimensions"),
        (np.zeros(0, np.float32), "empty waveform"),
        ([], "empty"),
        (np.array([0.0, np.nan] * 2000, np.float32), "non-finite"),
        (np.array([0.0, np.inf] * 2000, np.float32), "non-finite"),
        (np.zeros(16000, np.int16), "float waveforms"),
    ],
)
def test_bad_input_raises_clear_error(audio, message):
    with pytest.raises(ValueError, match=message):
        BeatsFeatureExtractor()(audio, sampling_rate=16000)


def test_sampling_rate_checks():
    extractor = BeatsFeatureExtractor()
    with pytest.raises(ValueError, match=r"16000 Hz.*44100 Hz"):
        extractor(make_waveform(1.0), sampling_rate=44100)
    logger = logging.get_logger("processing_audio_qformer")
    with CaptureLogger(logger) as captured:
        extractor(make_waveform(1.0))
    assert "sampling_rate" in captured.out


def test_mono_channel_axis_is_accepted():
    extractor = BeatsFeatureExtractor()
    waveform = make_waveform(1.0)
    a = extractor([waveform[None, :]], sampling_rate=16000)["input_features"][0]
    b = extractor(waveform, sampling_rate=16000)["input_features"][0]
    np.testing.assert_array_equal(a, b)
    torch_input = extractor(torch.from_numpy(waveform), sampling_rate=16000)["input_features"][0]
    np.testing.assert_array_equal(torch_input, b)
