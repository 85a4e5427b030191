"""Captioning speed: `AudioQFormerModel.generate` (the queries' keys and values computed once per clip, each new token
through the Q-Former's text path with a cache) against running the whole sequence [queries; caption so far] again at
every step (what a model without a cache does: LAVIS' BERT has one, transformers' Q-Former has none).

    python benchmarks/caption_speed.py [--config paper|demo] [--clips 8] [--max_length 30] [--json out.json]

Clips are given as BEATs tokens (496 x hidden: 10 s), as a library or a feature cache stores them; BEATs does not run.
Every caption is generated to `max_length` tokens (the end token is held back) so both sides do the same number of
steps; greedy decoding, whose tokens the two sides must agree on, and beam search (3 beams, the default) on the cached
side. Random weights: the speed does not depend on them.
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
from rerank_speed import CONFIGS  # noqa: E402
from audio_qformer.retrieval import pad_tokens  # noqa: E402


def whole_sequence_greedy(model, states, mask, max_length: int) -> torch.Tensor:
    """Greedy captions, each step one pass over the queries (reading the audio) and the caption so far."""
    ids = torch.full((states.shape[0], 1), model.config.decoder_bos_token_id)
    while ids.shape[1] < max_length:
        last = model._query_pass(states, mask, ids).last_hidden_state[:, -1]
        logits = model.lm_head(last)
        logits[:, model.config.decoder_eos_token_id] = -float("inf")  # held back, as min_length does on the other side
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    parser.add_argument("--clips", type=int, default=8, help="Clips per batch (one generate call).")
    parser.add_argument("--max_length", type=int, default=30, help="Tokens per caption, [DEC] included (LAVIS: 30).")
    parser.add_argument("--audio_tokens", type=int, default=496, help="BEATs tokens per clip (496: 10 s).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = AudioQFormerModel(AudioQFormerConfig(**CONFIGS[args.config])).eval()
    hidden = model.config.audio_config.hidden_size
    rng = np.random.default_rng(0)
    states, mask = pad_tokens([rng.standard_normal((args.audio_tokens, hidden)).astype(np.float32)
                               for _ in range(args.clips)])  # fmt: skip
    fixed = {"max_length": args.max_length, "min_length": args.max_length}  # no early end: equal work on both sides

    sides = {
        "generate, greedy": lambda: model.generate(audio_hidden_states=states, audio_attention_mask=mask,
                                                   num_beams=1, **fixed),
        "generate, 3 beams (default)": lambda: model.generate(audio_hidden_states=states, audio_attention_mask=mask,
                                                              **fixed),
        "whole sequence each step, greedy": lambda: whole_sequence_greedy(model, states, mask, args.max_length),
    }  # fmt: skip
    with torch.inference_mode():
        cached, whole = sides["generate, greedy"](), sides["whole sequence each step, greedy"]()
        agree = bool(torch.equal(cached, whole))
        seconds = interleaved_timing(sides, args.repeats)
    clips_per_second = {name: args.clips / median(values) for name, values in seconds.items()}
    info = machine_info()
    print_machine(info)
    print(f"config {args.config}: {model.config.qformer_config.num_hidden_layers} Q-Former layers of "
          f"{model.config.qformer_config.hidden_size}, {model.config.num_query_tokens} queries, {args.audio_tokens} "
          f"audio tokens per clip, {args.clips} clips per batch, {args.max_length} tokens per caption; greedy tokens "
          f"equal on both sides: {agree}")  # fmt: skip
    baseline = clips_per_second["whole sequence each step, greedy"]
    print_table(["captioning", "clips/s", "vs whole sequence each step"],
                [[name, f"{rate:.2f}", f"{rate / baseline:.2f}x"] for name, rate in clips_per_second.items()])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "args": vars(args), "clips_per_second": clips_per_second,
                       "greedy_tokens_equal": agree}, handle, indent=2)  # fmt: skip
    if not agree:
        sys.exit("the cached and whole-sequence greedy captions differ")


if __name__ == "__main__":
    main()
