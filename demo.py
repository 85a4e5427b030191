"""The main job on the embedded default: embed a few generated sounds with BEATs and show what happened.

    python demo.py [--beats_checkpoint BEATs_iter3_plus_AS2M.pt] [--num_layers N]

Without a checkpoint it builds the BEATs iter3+ architecture with random weights (nothing is downloaded), so the
pipeline's shapes, masks and timings are real while the embeddings carry no meaning. With the official checkpoint the
similarity table shows which generated sounds BEATs finds alike.
"""

import argparse
import time

import numpy as np
import torch

from configuration_audio_qformer import BeatsConfig
from modeling_audio_qformer import BeatsModel
from processing_audio_qformer import BeatsFeatureExtractor


SAMPLING_RATE = 16000


def generated_sounds(seed: int = 0) -> dict[str, np.ndarray]:
    """A few short, distinct sounds made here (no data is downloaded)."""
    rng = np.random.default_rng(seed)

    def seconds(duration):
        return np.arange(int(duration * SAMPLING_RATE)) / SAMPLING_RATE

    t = seconds(2.0)
    clicks = np.zeros(int(3.0 * SAMPLING_RATE))
    clicks[:: SAMPLING_RATE // 4] = 1.0  # four clicks a second
    sounds = {
        "tone 440 Hz": 0.3 * np.sin(2 * np.pi * 440 * t),
        "white noise": 0.1 * rng.standard_normal(t.size),
        "rising chirp": 0.3 * np.sin(2 * np.pi * (200 + 475 * seconds(4.0)) * seconds(4.0)),
        "clicks 4/s": np.convolve(clicks, np.hanning(64), mode="same") * 0.5,
        "hum 110 Hz": 0.3 * np.sin(2 * np.pi * 110 * seconds(1.0)),
    }
    return {name: wave.astype(np.float32) for name, wave in sounds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beats_checkpoint", default=None, help="Official BEATs .pt file or converted directory.")
    parser.add_argument(
        "--num_layers", type=int, default=None, help="Use a shallower random BEATs (faster); ignored with a checkpoint."
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    started = time.perf_counter()
    if args.beats_checkpoint is None:
        overrides = {"encoder_layers": args.num_layers} if args.num_layers else {}
        model = BeatsModel(BeatsConfig(**overrides)).eval()
        origin = "random weights (pass --beats_checkpoint for the official ones)"
    elif args.beats_checkpoint.endswith(".pt"):
        model = BeatsModel.from_original_checkpoint(args.beats_checkpoint)
        origin = args.beats_checkpoint
    else:
        model = BeatsModel.from_pretrained(args.beats_checkpoint).eval()
        origin = args.beats_checkpoint
    parameters = sum(p.numel() for p in model.parameters())
    print(f"BEATs: {model.config.encoder_layers} layers, {parameters / 1e6:.1f}M parameters, {origin}")
    print(f"       built in {time.perf_counter() - started:.1f} s")

    sounds = generated_sounds()
    feature_extractor = BeatsFeatureExtractor()
    inputs = feature_extractor(list(sounds.values()), sampling_rate=SAMPLING_RATE, return_tensors="pt")
    started = time.perf_counter()
    with torch.inference_mode():
        outputs = model(**inputs)
    elapsed = time.perf_counter() - started
    total_seconds = sum(len(wave) for wave in sounds.values()) / SAMPLING_RATE

    print(f"\nOne padded batch of {len(sounds)} clips: input_features {tuple(inputs['input_features'].shape)}, "
          f"tokens {tuple(outputs.last_hidden_state.shape)}")
    print(f"BEATs ran in {elapsed:.2f} s for {total_seconds:.0f} s of audio\n")
    print(f"{'clip':14s} {'seconds':>7s} {'frames':>6s} {'tokens':>6s} {'160 ms patches':>14s}")
    frames = inputs["feature_attention_mask"].sum(-1)
    tokens = outputs.attention_mask.sum(-1)
    for index, name in enumerate(sounds):
        duration = len(sounds[name]) / SAMPLING_RATE
        print(f"{name:14s} {duration:7.1f} {int(frames[index]):6d} {int(tokens[index]):6d} {int(tokens[index]) // 8:14d}")

    # Mean over each clip's real tokens, then cosine similarity between clips.
    mask = outputs.attention_mask[..., None].float()
    pooled = (outputs.last_hidden_state * mask).sum(1) / mask.sum(1)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    similarity = pooled @ pooled.T
    print("\nCosine similarity of the mean-pooled tokens:")
    print(" " * 14 + " ".join(f"{name:>12s}" for name in sounds))
    for index, name in enumerate(sounds):
        print(f"{name:>12s}  " + " ".join(f"{value:12.3f}" for value in similarity[index].tolist()))


if __name__ == "__main__":
    main()
