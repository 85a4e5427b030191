"""Re-ranking speed: the matching head on a query's top 16 candidates, batched (one forward of 16 pairs, as
`retrieval.rerank_with_matching_head` does) against one pair at a time.

    python benchmarks/rerank_speed.py [--config paper|demo] [--top_k 16] [--queries 4] [--json out.json]

`paper` is `AudioQFormerConfig()` (a bert-base sized Q-Former, 32 queries; random weights) reading 10 s of BEATs
tokens (496 x 768) per candidate; `demo` is the demo preset's size. BEATs itself does not run: the tokens are given,
as they are stored at indexing time. Both sides score the same pairs; the benchmark checks they agree.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_utils import interleaved_timing, machine_info, median, print_machine, print_table  # noqa: E402
from configuration_audio_qformer import AudioQFormerConfig  # noqa: E402
from modeling_audio_qformer import AudioQFormerModel  # noqa: E402
from audio_qformer.retrieval import rerank_with_matching_head  # noqa: E402
from train import DEMO_BEATS  # noqa: E402


# The report's sizes, and the demo preset's (train.py: its BEATs, MiniLM's first two layers, 16 queries).
CONFIGS = {
    "paper": dict(),
    "demo": dict(audio_config=DEMO_BEATS, qformer_config=dict(hidden_size=384, num_hidden_layers=2,
                 num_attention_heads=12, intermediate_size=1536), num_query_tokens=16),  # fmt: skip
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    parser.add_argument("--top_k", type=int, default=16)
    parser.add_argument("--queries", type=int, default=4, help="Queries per timed repeat.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--audio_tokens", type=int, default=496, help="BEATs tokens per candidate (496: 10 s).")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = AudioQFormerModel(AudioQFormerConfig(**CONFIGS[args.config])).eval()
    hidden = model.config.audio_config.hidden_size
    rng = np.random.default_rng(0)
    # Every query has its own candidates (as separate searches do), so no clip is shared between queries and the
    # batched side is one forward of `top_k` pairs per query (shared clips take another path; clotho_scale_eval.py).
    tokens = [rng.standard_normal((args.audio_tokens, hidden)).astype(np.float16)
              for _ in range(args.top_k * args.queries)]  # fmt: skip
    input_ids = torch.randint(1000, 2000, (args.queries, 12))
    attention_mask = torch.ones_like(input_ids)
    candidates = torch.arange(args.top_k * args.queries).view(args.queries, args.top_k)
    cosines = torch.rand(args.queries, args.top_k)

    def batched():
        return rerank_with_matching_head(model, candidates, cosines, input_ids, attention_mask,
                                         lambda ids: [tokens[i] for i in ids], batch_size=args.top_k)  # fmt: skip

    def one_at_a_time():
        return rerank_with_matching_head(model, candidates, cosines, input_ids, attention_mask,
                                         lambda ids: [tokens[i] for i in ids], batch_size=1)  # fmt: skip

    with torch.inference_mode():
        order_batched, scores_batched = batched()
        order_single, scores_single = one_at_a_time()
        difference = (scores_batched - scores_single).abs().max().item()
        seconds = interleaved_timing({"batched": batched, "one pair at a time": one_at_a_time}, args.repeats)
    info = machine_info()
    per_query = {name: 1000 * median(values) / args.queries for name, values in seconds.items()}
    print_machine(info)
    print(f"config {args.config}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M "
          f"Q-Former parameters, {model.config.num_query_tokens} queries, {args.audio_tokens} audio tokens per "
          f"candidate, top {args.top_k}; max score difference between the two sides {difference:.1e}")  # fmt: skip
    print_table(["re-rank top %d" % args.top_k, "ms per query", "vs one pair at a time"],
                [[name, f"{ms:.0f}", f"{per_query['one pair at a time'] / ms:.2f}x"] for name, ms in per_query.items()])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "args": vars(args), "ms_per_query": per_query, "max_score_difference": difference},
                      handle, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
