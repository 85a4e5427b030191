"""What a sound library stores, and what storing BEATs tokens buys: bytes per window of each part on disk, and the
latency of a re-ranked search with the tokens stored against decoding the candidates' audio and running BEATs again.

    python benchmarks/library_storage.py [--config paper|demo] [--files 16] [--seconds 10] [--queries 3] [--json out.json]

One library is indexed with `keep_tokens=True` (random weights at the chosen size; `paper` is the report's BEATs
iter3+ and bert-base Q-Former), then copied without its `tokens/` (as `index` leaves a library by default); both
answer the same queries with `search(..., rerank=16)`, alternately, and must return the same ranking (the tokens are
stored in float16, so scores differ by that rounding only). Plain search (no re-rank) is timed beside them for scale.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import soundfile
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_utils import interleaved_timing, machine_info, median, print_machine, print_table  # noqa: E402
from configuration_audio_qformer import AudioQFormerConfig  # noqa: E402
from modeling_audio_qformer import AudioQFormerModel  # noqa: E402
from audio_qformer.building import default_bert_checkpoint  # noqa: E402
from rerank_speed import CONFIGS  # noqa: E402


QUERIES = ["a dog barks while cars pass by", "rain on a tin roof", "a high pitched beep", "people talking in a hall"]


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def main(argv=None):
    from transformers import AutoTokenizer

    from audio_qformer.library import LIBRARY_CONFIG, AudioLibrary
    from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    parser.add_argument("--files", type=int, default=16, help="Files in the library (one window each).")
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of each file.")
    parser.add_argument("--queries", type=int, default=3, help="Queries per timed repeat.")
    parser.add_argument("--rerank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = AudioQFormerModel(AudioQFormerConfig(**CONFIGS[args.config])).eval()
    processor = AudioQFormerProcessor(BeatsFeatureExtractor(), AutoTokenizer.from_pretrained(default_bert_checkpoint()))
    rng = np.random.default_rng(0)
    work = tempfile.mkdtemp(prefix="library-storage-")
    try:
        sounds = os.path.join(work, "sounds")
        os.makedirs(sounds)
        for i in range(args.files):
            t = np.arange(int(args.seconds * 16000)) / 16000
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.05 * rng.standard_normal(t.size)
            soundfile.write(os.path.join(sounds, f"clip{i:03d}.flac"), wave.astype(np.float32), 16000)
        with_tokens = AudioLibrary(os.path.join(work, "with-tokens"), model, processor, None, create=True,
                                   keep_tokens=True)  # fmt: skip
        with_tokens.index(sounds, show_progress=False)
        # The same library without its tokens, as `index` leaves one by default: re-ranking decodes and runs BEATs.
        without = os.path.join(work, "without-tokens")
        shutil.copytree(with_tokens.directory, without, ignore=shutil.ignore_patterns("tokens"))
        config_path = os.path.join(without, LIBRARY_CONFIG)
        config = json.load(open(config_path))
        json.dump({**config, "keep_tokens": False}, open(config_path, "w"))
        without_tokens = AudioLibrary(without, model, processor, None)

        windows = with_tokens.embeddings.shard_array(0).shape[0]
        sizes = {part: folder_bytes(os.path.join(with_tokens.directory, part)) / windows
                 for part in ("embeddings", "tokens")}  # fmt: skip
        queries = (QUERIES * args.queries)[: args.queries]
        sides = {
            "search, no re-rank": lambda: with_tokens.search(queries, k=10),
            f"re-rank {args.rerank}, stored tokens": lambda: with_tokens.search(queries, k=10, rerank=args.rerank),
            f"re-rank {args.rerank}, BEATs again": lambda: without_tokens.search(queries, k=10, rerank=args.rerank),
        }  # fmt: skip
        with torch.inference_mode():
            stored, again = (sides[name]() for name in list(sides)[1:])
            same_order = [[h.path for h in hits] for hits in stored] == [[h.path for h in hits] for hits in again]
            difference = max(abs(a.score - b.score) for x, y in zip(stored, again) for a, b in zip(x, y))
            seconds = interleaved_timing(sides, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_query = {name: 1000 * median(values) / len(queries) for name, values in seconds.items()}
    info = machine_info()
    print_machine(info)
    print(f"config {args.config}: {args.files} files of {args.seconds} s ({windows} windows), "
          f"{model.config.num_query_tokens} x {model.config.embed_dim} embeddings, "
          f"{model.config.audio_config.hidden_size}-wide BEATs tokens; re-ranked results equal: {same_order} "
          f"(scores within {difference:.1e})")  # fmt: skip
    print_table(["stored part", "bytes per window", "per hour of audio (windows every 5.12 s)"],
                [[part, f"{size:,.0f}", f"{size * 3600 / 5.12 / 2**20:,.0f} MiB"] for part, size in sizes.items()])
    print_table(["search", "ms per query"], [[name, f"{ms:.0f}"] for name, ms in per_query.items()])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "args": vars(args), "bytes_per_window": sizes, "ms_per_query": per_query,
                       "same_order": same_order, "max_score_difference": difference}, handle, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
