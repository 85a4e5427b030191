"""Run the official BEATs code (microsoft/unilm, folder `beats/`) next to ours, for checks and benchmarks.

The official code is not part of this repository: fetch microsoft/unilm yourself and pass the path of its `beats/`
folder. Its `BEATs.py` imports torchaudio at module level only for the fbank, which has no build for the torch this
project pins; a stub takes its place and the fbank is handed in directly (see `official_features`).
"""

import importlib
import os
import sys
import types

import torch
from references import randomize_beats_parameters


def import_official_beats(beats_dir: str):
    """Import unilm's `beats/BEATs.py` from `beats_dir` and return the module."""
    beats_dir = os.path.abspath(beats_dir)
    if not os.path.isfile(os.path.join(beats_dir, "BEATs.py")):
        raise FileNotFoundError(f"{beats_dir} has no BEATs.py: pass the path of unilm's beats/ folder.")
    if "torchaudio" not in sys.modules:
        kaldi = types.ModuleType("torchaudio.compliance.kaldi")

        def fbank(*args, **kwargs):
            raise NotImplementedError("torchaudio is stubbed: hand the fbank to official_features instead.")

        kaldi.fbank = fbank
        compliance = types.ModuleType("torchaudio.compliance")
        compliance.kaldi = kaldi
        torchaudio = types.ModuleType("torchaudio")
        torchaudio.compliance = compliance
        sys.modules.update(
            {"torchaudio": torchaudio, "torchaudio.compliance": compliance, "torchaudio.compliance.kaldi": kaldi}
        )
    if beats_dir not in sys.path:
        sys.path.insert(0, beats_dir)
    return importlib.import_module("BEATs")


def build_official_model(official, cfg: dict, seed: int = 0):
    """An official `BEATs` model for `cfg` whose every parameter is random and non-trivial, in eval mode."""
    torch.manual_seed(seed)
    model = official.BEATs(official.BEATsConfig(cfg))
    randomize_beats_parameters(model)
    return model.eval()


def official_features(model, fbank: torch.Tensor, token_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """
    The official model's output for a normalised fbank `(batch, frames, bins)`.

    Without a mask this is `BEATs.extract_features` with the fbank step bypassed. With `token_padding_mask`
    (True = padding, per output token) the official encoder runs with that mask instead of the one the official
    `forward_padding_mask` would derive from a waveform mask (which mis-marks the boundary time patch).
    """
    with torch.inference_mode():
        if token_padding_mask is None:
            model.preprocess = lambda source, fbank_mean=None, fbank_std=None: fbank
            return model.extract_features(fbank.new_zeros(fbank.shape[0], 1))[0]
        features = model.patch_embedding(fbank.unsqueeze(1))
        features = features.reshape(features.shape[0], features.shape[1], -1).transpose(1, 2)
        features = model.layer_norm(features)
        if model.post_extract_proj is not None:
            features = model.post_extract_proj(features)
        return model.encoder(features, padding_mask=token_padding_mask.clone())[0]


def save_official_checkpoint(model, cfg: dict, path: str):
    """Save `model` the way the official checkpoints are saved: `{"cfg": cfg, "model": state_dict}`."""
    torch.save({"cfg": dict(cfg), "model": model.state_dict()}, path)
