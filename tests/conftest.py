import os
import sys

import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Reference implementations shared with the benchmarks (`benchmarks/references.py`).
if os.path.join(ROOT, "benchmarks") not in sys.path:
    sys.path.append(os.path.join(ROOT, "benchmarks"))


@pytest.fixture(autouse=True)
def allocator_left_alone(monkeypatch):
    """`audio-qformer index` run in the test process leaves glibc's settings alone (they hold for the whole process);
    `test_keep_freed_memory_reuses_large_blocks` tests the real setting in processes of its own."""
    from audio_qformer import beats_cpu

    monkeypatch.setattr(beats_cpu, "keep_freed_memory", lambda: False)


def make_waveform(seconds: float, seed: int = 0, kind: str = "mix") -> np.ndarray:
    """A deterministic 16 kHz test signal: tone plus noise (`mix`), a rising chirp, or quiet noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * 16000))) / 16000
    if kind == "mix":
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(t.size)
    elif kind == "chirp":
        wave = 0.5 * np.sin(2 * np.pi * (100 + 2000 * t) * t)
    elif kind == "quiet":
        wave = 1e-3 * rng.standard_normal(t.size)
    else:
        raise ValueError(kind)
    return wave.astype(np.float32)


TINY_BEATS = dict(
    patch_embed_dim=24,
    encoder_layers=2,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=4,
    conv_pos=16,
    conv_pos_groups=4,
    num_buckets=64,
    max_distance=120,
    encoder_layerdrop=0.0,
)
TINY_QFORMER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


@pytest.fixture
def tiny_beats_config():
    from configuration_audio_qformer import BeatsConfig

    return BeatsConfig(**TINY_BEATS)


def tiny_qformer_config(**overrides):
    from configuration_audio_qformer import AudioQFormerConfig

    return AudioQFormerConfig(
        audio_config=TINY_BEATS, qformer_config=TINY_QFORMER, num_query_tokens=4, embed_dim=16, **overrides
    )


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from audio_qformer.building import default_bert_checkpoint
    from processing_audio_qformer import add_decoder_token

    return add_decoder_token(AutoTokenizer.from_pretrained(default_bert_checkpoint()))


@pytest.fixture
def processor(tokenizer):
    from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor

    return AudioQFormerProcessor(feature_extractor=BeatsFeatureExtractor(), tokenizer=tokenizer)


@pytest.fixture
def tiny_model():
    import torch

    from modeling_audio_qformer import AudioQFormerModel

    torch.manual_seed(0)
    return AudioQFormerModel(tiny_qformer_config()).eval()
