"""Training throughput: pairs per second when BEATs tokens come from the feature cache (what `train.py` does, as the
report extracts features once before training) against extracting them on the fly (decode, fbank, BEATs each step),
and the cache's size per hour of audio.

    python benchmarks/training_speed.py [--config demo|paper] [--batch_size 8] [--json out.json]

`demo` is the demo preset (4-layer 384-wide BEATs, 2-layer MiniLM-sized Q-Former, 16 queries); `paper` the report's
sizes (BEATs iter3+, bert-base Q-Former, 32 queries), random weights. Clips are generated 10 s WAV files. One
timed unit is one optimizer step (ATC + ATM + ATG, backward, Adam) on a batch; both sides run the same steps.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import soundfile
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_utils import interleaved_timing, machine_info, median, print_machine, print_table  # noqa: E402
from audio_io import load_audio  # noqa: E402
from configuration_audio_qformer import AudioQFormerConfig  # noqa: E402
from audio_qformer.features import build_cache  # noqa: E402
from audio_qformer.identity import clip_key  # noqa: E402
from train import crop_tokens  # noqa: E402
from modeling_audio_qformer import AudioQFormerModel  # noqa: E402
from processing_audio_qformer import BeatsFeatureExtractor  # noqa: E402
from rerank_speed import CONFIGS  # noqa: E402
from audio_qformer.retrieval import pad_tokens  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="demo")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = AudioQFormerModel(AudioQFormerConfig(**CONFIGS[args.config]))
    model.train()
    feature_extractor = BeatsFeatureExtractor()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    work = tempfile.mkdtemp(prefix="training-speed-")
    rng = np.random.default_rng(0)
    t = np.arange(int(args.seconds * 16000)) / 16000
    paths = []
    for i in range(args.clips):
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.05 * rng.standard_normal(t.size)
        paths.append(os.path.join(work, f"clip{i}.wav"))
        soundfile.write(paths[-1], wave.astype(np.float32), 16000)
    clips = [{"key": clip_key(p), "audio_path": p, "audio_bytes": None} for p in paths]
    cache, _, extract_seconds = build_cache(os.path.join(work, "cache"), clips, model.audio_model, feature_extractor,
                                            show_progress=False)  # fmt: skip
    tokens = sum(cache.get(c["key"]).shape[0] for c in clips)
    mib_per_hour = tokens * cache.hidden_size * 2 / 2**20 / (args.clips * args.seconds / 3600)
    input_ids = torch.randint(1000, 2000, (args.batch_size, 24))
    batches = {"count": 0}

    def step(states, mask):
        outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), audio_hidden_states=states,
                        audio_attention_mask=mask, return_loss=True)  # fmt: skip
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def next_batch():
        start = (batches["count"] * args.batch_size) % args.clips
        batches["count"] += 1
        return [clips[(start + i) % args.clips] for i in range(args.batch_size)]

    def from_cache():
        batch = next_batch()
        crops = [crop_tokens(cache.get(c["key"]), 512, 8, rng) for c in batch]
        step(*pad_tokens(crops))

    def on_the_fly():
        batch = next_batch()
        waveforms = [load_audio(c["audio_path"]) for c in batch]
        inputs = feature_extractor(waveforms, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            states, mask = model.get_audio_hidden_states(**inputs)
        step(states[:, :512], mask[:, :512])

    seconds = interleaved_timing({"feature cache": from_cache, "BEATs on the fly": on_the_fly}, args.repeats)
    info = machine_info()
    rates = {name: args.batch_size / median(values) for name, values in seconds.items()}
    print_machine(info)
    print(f"config {args.config}: batch {args.batch_size}, {args.seconds:.0f} s clips; extraction into the cache "
          f"took {extract_seconds:.1f} s for {args.clips} clips ({args.clips / extract_seconds:.2f} clips/s)")  # fmt: skip
    print_table(["training step source", "pairs/s", "vs on the fly"],
                [[name, f"{rate:.2f}", f"{rate / rates['BEATs on the fly']:.2f}x"] for name, rate in rates.items()])
    print(f"feature cache: {mib_per_hour:.0f} MiB per hour of audio ({cache.hidden_size}-wide float16 tokens, "
          f"8 per 160 ms)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "args": vars(args), "pairs_per_second": rates,
                       "cache_mib_per_hour": mib_per_hour, "extraction_clips_per_second": args.clips / extract_seconds},
                      handle, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
