"""Compare `BeatsModel` with the official BEATs code on the same random weights and the same input.

    python benchmarks/compare_beats_official.py --unilm_beats_dir /path/to/unilm/beats [--json out.json]

Builds the iter3+ AS2M architecture in the official code with random, non-trivial weights, saves it in the official
checkpoint format, loads that file with `BeatsModel.from_original_checkpoint`, and reports the largest absolute
difference of the outputs on (a) a batch of two 10 s clips and (b) a 10 s clip batched with a 6 s clip, masked with
the exact token mask (the official encoder is given the same mask).
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configuration_audio_qformer import BeatsConfig  # noqa: E402
from modeling_audio_qformer import BeatsModel  # noqa: E402
from official_beats import build_official_model, import_official_beats, official_features, save_official_checkpoint  # noqa: E402
from processing_audio_qformer import BeatsFeatureExtractor  # noqa: E402


def official_cfg(config: BeatsConfig, official) -> dict:
    """The `cfg` dict an official checkpoint of this architecture stores (the official field names only)."""
    names = official.BEATsConfig().__dict__.keys()
    return {name: getattr(config, name) for name in names}


def test_waveforms(seconds: list[float], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    waves = []
    for duration in seconds:
        t = np.arange(int(duration * 16000)) / 16000
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.size)
        waves.append(wave.astype(np.float32))
    return waves


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unilm_beats_dir", required=True, help="Path of the beats/ folder of microsoft/unilm.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args()

    official = import_official_beats(args.unilm_beats_dir)
    cfg = official_cfg(BeatsConfig(), official)
    reference = build_official_model(official, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "BEATs_random_iter3_plus.pt")
        save_official_checkpoint(reference, cfg, path)
        ours = BeatsModel.from_original_checkpoint(path)
    feature_extractor = BeatsFeatureExtractor()
    results = {"parameters": sum(p.numel() for p in ours.parameters())}

    inputs = feature_extractor(test_waveforms([10.0, 10.0]), sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        mine = ours(**inputs).last_hidden_state
    theirs = official_features(reference, inputs["input_features"])
    results["unpadded_max_abs_diff"] = (mine - theirs).abs().max().item()
    results["output_std"] = theirs.std().item()
    results["unpadded_shape"] = list(mine.shape)

    inputs = feature_extractor(test_waveforms([10.0, 6.0], seed=1), sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        outputs = ours(**inputs)
    theirs = official_features(reference, inputs["input_features"], outputs.audio_attention_mask == 0)
    real = outputs.audio_attention_mask.bool()
    results["padded_max_abs_diff_real_tokens"] = (outputs.last_hidden_state - theirs)[real].abs().max().item()
    results["padded_real_tokens"] = real.sum(-1).tolist()

    for key, value in results.items():
        print(f"{key:35s} {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
