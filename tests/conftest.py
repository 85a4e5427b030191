import os
import sys

import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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


@pytest.fixture
def tiny_beats_config():
    from configuration_audio_qformer import BeatsConfig

    return BeatsConfig(
        embed_dim=24,
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
