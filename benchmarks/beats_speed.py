"""Speed of `BeatsModel` against the official BEATs code, on the same random weights and the same 10 s clips.

    python benchmarks/beats_speed.py --unilm_beats_dir /path/to/unilm/beats [--json beats_speed.json]
        [--batch_sizes 1 8] [--repeats 5] [--threads N] [--baseline_rev GIT_REV] [--skip_qformer] [--device cuda]
        [--precisions bfloat16 int8] [--emulate_avx2] [--keep_freed_memory]

Builds the iter3+ AS2M architecture (768 wide, 12 layers) in the official code with random, non-trivial weights,
saves it in the official checkpoint format and loads that file into `BeatsModel`. Timed: the official model, the
model as it ships ("model": public torch only, SDPA), its exact CPU copy ("ours": `beats_cpu.cpu_copy(model,
"float32")`, oneDNN products, what `audio-qformer index` runs), its fast copy ("fast": `cpu_copy(model, "fast")`,
what `index --fast_cpu` runs: bfloat16 products where the CPU has bfloat16 units, int8 elsewhere, float32 where
neither measured faster; the CPU's features, the path chosen and why are printed) and the copies of `--precisions`
("bfloat16", "int8"; each timed and compared with the exact copy whatever "fast" chose). Inputs are the fbank of 10 s
clips from
`BeatsFeatureExtractor`; ours is called as users call it (`model(**features)`, mask included), the official model gets
the same fbank through `extract_features`. All sides run under `torch.inference_mode()`, interleaved in one process
(see `bench_utils.interleaved_timing`); the table gives clips per second (median) and ratios.

Accuracy: the largest absolute difference between ours and the official output; the per-token cosine similarity of
the fast copy's tokens to the exact ones; and, unless `--skip_qformer`, the cosine of the Q-Former's audio embeddings
(`audio_qformer.building.from_components` with this encoder and the packaged MiniLM, random cross-attention) computed from
the fast tokens against those computed from the exact tokens. `--baseline_rev` also times `BeatsModel` as it was at
that git revision (e.g. the commit before an optimisation), and its fast copy where it had one
(`BeatsModel.quantize_for_cpu` before the copies moved to `beats_cpu`), for before/after ratios.

`--emulate_avx2` runs the benchmark as on a CPU with AVX2 and no more (no AVX-512, VNNI, bfloat16 units or AMX), on
a CPU that has them: the script starts itself again with each library's instruction-set cap,

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2

(torch's own kernels, oneDNN's products and convolutions, MKL's float32 products, fbgemm's int8 products) and
`beats_cpu.cpu_flags` reports the CPU's flags less AVX-512, VNNI and AMX. Cores, caches and clock stay this CPU's, so
the ratios carry over better than the clips/s.

`--device cuda` runs every side on the GPU (the fast copy there is the same bfloat16-weight model: bfloat16 against
float32 on the GPU, with the output difference); the issue's clips/s goals are for the CPU and are not judged there.
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_utils import (  # noqa: E402
    AVX2_ENV,
    import_module_at_revision,
    interleaved_timing,
    machine_info,
    median,
    print_machine,
    print_table,
)
from compare_beats_official import official_cfg, test_waveforms  # noqa: E402
from audio_qformer import beats_cpu  # noqa: E402
from audio_qformer.beats_cpu import choose_fast_precision, cpu_copy, product_speedup  # noqa: E402
from configuration_audio_qformer import BeatsConfig  # noqa: E402
from audio_qformer.building import from_components
from modeling_audio_qformer import AudioQFormerModel, BeatsModel  # noqa: E402
from official_beats import (  # noqa: E402
    build_official_model,
    import_official_beats,
    official_features,
    save_official_checkpoint,
)
from processing_audio_qformer import BeatsFeatureExtractor  # noqa: E402


# Goals of issue 7 for this benchmark.
GOAL_EXACT_CLIPS_PER_SECOND = 1.2
GOAL_EXACT_MAX_ABS_DIFF = 1e-4
GOAL_FAST_SPEEDUP = 1.8
GOAL_FAST_COSINE = 0.999
# Goal of issue 17: the fast copy at least this many times the exact copy's speed, on every kind of CPU.
GOAL_FAST_OVER_EXACT = 1.5

# Each library's cap on the instruction sets it uses (read when the library starts: set before torch is imported).
FEATURE_FLAGS = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]


def avx2_only(flags: set[str]) -> set[str]:
    """A CPU's flags less what an AVX2-only CPU lacks: AVX-512, VNNI, AMX, AVX-NE-CONVERT."""
    return {flag for flag in flags if not flag.startswith(("avx512", "amx", "avx_vnni", "avx_ne"))}


def cpu_features(precision_reason: tuple[str, str], width: int, ffn_width: int) -> dict:
    """What the fast path is chosen from: flags, torch's kernel level, the emulation caps, measured product ratios."""
    flags = beats_cpu.cpu_flags()
    features = {
        "flags": [flag for flag in FEATURE_FLAGS if flag in flags],
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "emulation_env": {name: os.environ[name] for name in AVX2_ENV if name in os.environ},
        "fast_precision": precision_reason[0],
        "fast_reason": precision_reason[1],
        # one thread, fc1's shape (496 x 768 -> 3072): the measurement `choose_fast_precision` makes
        "product_speedup": {
            precision: product_speedup(precision, width, ffn_width)
            for precision in ("bfloat16", "int8")
            if precision != "int8" or beats_cpu.int8_available()
        },
    }
    return features


def gflop_per_clip(config: BeatsConfig, num_frames: int, num_mel_bins: int = 128) -> float:
    """
    Multiply-adds x 2 of one clip through BEATs (projections, attention, convolutions), in GFLOP. The positional
    convolution is counted as done directly (4.7 of the 98.6 GFLOP of a 10 s clip), as the official code and the model
    do it; the CPU copies compute it through the FFT (`beats_cpu.FftConv1d`) with a thirtieth of that.
    """
    patch = config.input_patch_size
    tokens = (num_frames // patch) * (num_mel_bins // patch)
    width, ffn, heads = config.encoder_embed_dim, config.encoder_ffn_embed_dim, config.encoder_attention_heads
    flops = tokens * patch * patch * config.patch_embed_dim  # patch embedding
    flops += tokens * config.patch_embed_dim * width  # post_extract_proj
    flops += tokens * width * (width // config.conv_pos_groups) * config.conv_pos  # positional convolution
    per_layer = tokens * (4 * width * width + 2 * width * ffn)  # q, k, v, out, fc1, fc2
    per_layer += 2 * tokens * tokens * width  # q k^T and attention x v
    per_layer += tokens * heads * (width // heads) * 8  # relative-position gates
    flops += config.encoder_layers * per_layer
    return 2 * flops / 1e9


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unilm_beats_dir", required=True, help="Path of the beats/ folder of microsoft/unilm.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="Batch sizes to time.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of every clip in seconds.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per side and batch size (median).")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the CPUs this process may use; on a machine shared with other jobs fewer "
        "threads than cores can be faster).",
    )
    parser.add_argument(
        "--keep_freed_memory",
        action="store_true",
        help="Keep freed memory for reuse (beats_cpu.keep_freed_memory), as audio-qformer index does on the CPU.",
    )
    parser.add_argument(
        "--baseline_rev",
        default=None,
        help="Also time BeatsModel from modeling_audio_qformer.py at this git revision (before/after ratios).",
    )
    parser.add_argument("--skip_qformer", action="store_true", help="Skip the Q-Former audio-embedding cosine.")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every side runs.")
    parser.add_argument(
        "--precisions",
        nargs="*",
        default=["bfloat16", "int8"],
        choices=["bfloat16", "int8"],
        help="Also time these copies of cpu_copy (and their accuracy) next to the fast one; none: only the fast one.",
    )
    parser.add_argument(
        "--emulate_avx2",
        action="store_true",
        help="Run as on an AVX2-only CPU: restart with " + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items())
        + " and the CPU's flags less AVX-512, VNNI and AMX.",
    )
    args = parser.parse_args()
    if args.emulate_avx2 and any(os.environ.get(name) != value for name, value in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})  # torch reads them at start
    if args.emulate_avx2:
        real_flags = beats_cpu.cpu_flags()
        beats_cpu.cpu_flags = lambda: avx2_only(real_flags)
    if args.keep_freed_memory and not beats_cpu.keep_freed_memory():
        raise SystemExit("--keep_freed_memory: the C allocator here is not glibc's; nothing to keep.")
    if any(size < 1 for size in args.batch_sizes):
        raise ValueError(f"--batch_sizes must be positive, got {args.batch_sizes}.")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}.")

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*weight_norm.*")  # the official code's legacy weight norm
    official = import_official_beats(args.unilm_beats_dir)
    config = BeatsConfig()
    cfg = official_cfg(config, official)
    reference = build_official_model(official, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "BEATs_random_iter3_plus.pt")
        save_official_checkpoint(reference, cfg, path)
        ours = BeatsModel.from_original_checkpoint(path)
        baseline = None
        if args.baseline_rev:
            module = import_module_at_revision(args.baseline_rev, "modeling_audio_qformer.py", "baseline_modeling")
            baseline = module.BeatsModel.from_original_checkpoint(path)
    device = torch.device(args.device)
    reference, model = reference.to(device), ours.to(device)
    baseline = baseline.to(device) if baseline is not None else None
    ours, _ = cpu_copy(model, "float32")
    chosen = choose_fast_precision(config.encoder_embed_dim, config.encoder_ffn_embed_dim)
    fast, fast_precision = cpu_copy(model, "fast")
    features = cpu_features(chosen, config.encoder_embed_dim, config.encoder_ffn_embed_dim)
    emulation = " ".join(f"{name}={value}" for name, value in features["emulation_env"].items())
    print(
        f"CPU features: {', '.join(features['flags']) or 'none of ' + ', '.join(FEATURE_FLAGS)}; torch kernels "
        f"{features['aten_capability']}" + (f"; emulating AVX2: {emulation}" if args.emulate_avx2 else "")
    )
    print(
        "one-thread product speed over float32 (496 x 768 -> 3072): "
        + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in features["product_speedup"].items())
    )
    print(f"fast path: {fast_precision} ({chosen[1]})")
    print("freed memory: " + ("kept for reuse (as index)" if args.keep_freed_memory else "glibc's default"))
    # Other precisions, timed whatever the fast path chose (int8 is the fast path on other CPUs).
    extra = {precision: cpu_copy(model, precision)[0] for precision in args.precisions
             if precision != fast_precision and (precision != "int8" or beats_cpu.int8_available())}  # fmt: skip
    # The baseline revision's fast copy too, where it had one: before/after ratios of the fast mode.
    baseline_fast = baseline.quantize_for_cpu() if hasattr(baseline, "quantize_for_cpu") else None
    feature_extractor = BeatsFeatureExtractor()
    waveforms = test_waveforms([args.seconds] * max(args.batch_sizes))

    info = machine_info(device)
    print_machine(info)
    results = {"machine": info, "args": vars(args), "batches": {}, "fast_precision": fast_precision,
               "cpu_features": features, "extra_precisions": list(extra)}  # fmt: skip
    exact_outputs = None
    for batch_size in args.batch_sizes:
        inputs = feature_extractor(waveforms[:batch_size], sampling_rate=16000, return_tensors="pt").to(device)
        fbank = inputs["input_features"]
        with torch.inference_mode():
            exact = ours(**inputs)
            theirs = official_features(reference, fbank)
            fast_tokens = fast(**inputs).last_hidden_state
            extra_tokens = {precision: side(**inputs).last_hidden_state for precision, side in extra.items()}
            cosine = token_cosine(fast_tokens, exact.last_hidden_state)
            row = {
                "gflop_per_clip": gflop_per_clip(config, fbank.shape[1]),
                "max_abs_diff_ours_vs_official": (exact.last_hidden_state - theirs).abs().max().item(),
                "max_abs_diff_model_vs_official": (model(**inputs).last_hidden_state - theirs).abs().max().item(),
                "fast_token_cosine_min": cosine.min().item(),
                "fast_token_cosine_mean": cosine.mean().item(),
                "fast_max_abs_diff_vs_exact": (fast_tokens - exact.last_hidden_state).abs().max().item(),
            }
            for precision, tokens in extra_tokens.items():
                row[f"{precision}_token_cosine_min"] = token_cosine(tokens, exact.last_hidden_state).min().item()
            sides = {
                "official": lambda: official_features(reference, fbank),
                "model": lambda: model(**inputs),
                "ours": lambda: ours(**inputs),
                "ours_fast": lambda: fast(**inputs),
                **{f"ours_{precision}": functools.partial(side, **inputs) for precision, side in extra.items()},
            }
            if baseline is not None:
                row["max_abs_diff_ours_vs_baseline"] = (
                    (baseline(**inputs).last_hidden_state - exact.last_hidden_state).abs().max().item()
                )
                sides["baseline"] = lambda: baseline(**inputs)
                if baseline_fast is not None:
                    sides["baseline_fast"] = lambda: baseline_fast(**inputs)
            if device.type == "cuda":  # a side's time ends when its kernels have finished
                sides = {name: _synchronized(side) for name, side in sides.items()}
            seconds = interleaved_timing(sides, args.repeats)
        row["seconds"] = seconds
        row["clips_per_second"] = {name: batch_size / median(values) for name, values in seconds.items()}
        results["batches"][str(batch_size)] = row
        if exact_outputs is None or batch_size > exact_outputs[0].shape[0]:
            compared = {"fast": fast_tokens.cpu(), **{name: tokens.cpu() for name, tokens in extra_tokens.items()}}
            exact_outputs = (exact.last_hidden_state.cpu(), exact.audio_attention_mask.cpu(), compared)
        print(f"batch {batch_size}: " + ", ".join(f"{k} {v:.3f} clips/s" for k, v in row["clips_per_second"].items()))

    if not args.skip_qformer:
        results["qformer"] = qformer_cosines(model.cpu(), *exact_outputs)
    info_after = machine_info()
    results["load_average_after"] = info_after.get("load_average_1_5_15min")
    report(results, baseline is not None)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def _synchronized(side):
    def run():
        output = side()
        torch.cuda.synchronize()
        return output

    return run


def qformer_cosines(ours: BeatsModel, exact_tokens, token_mask, compared: dict) -> dict:
    """For each copy's tokens in `compared`: the Q-Former's audio embeddings from them against those from the exact."""
    try:
        torch.manual_seed(0)
        model = from_components(ours).eval()
    except ImportError as error:  # the packaged MiniLM is missing
        return {"skipped": str(error)}
    with torch.inference_mode():
        exact = model.get_audio_features(audio_hidden_states=exact_tokens, audio_attention_mask=token_mask)
        results = {}
        for name, tokens in compared.items():
            other = model.get_audio_features(audio_hidden_states=tokens, audio_attention_mask=token_mask)
            results[name] = embedding_change(exact.audio_embeds, other.audio_embeds)
    return results


def embedding_change(embeds: torch.Tensor, other: torch.Tensor) -> dict:
    cosine = token_cosine(other, embeds)  # (clips, queries)
    results = {
        "clips": embeds.shape[0],
        "audio_embeds_shape": list(embeds.shape),
        "cosine_min": cosine.min().item(),
        "cosine_mean": cosine.mean().item(),
    }
    if embeds.shape[0] > 1:
        # The scale of the measure: with random cross-attention, the embeddings of *different* clips are already
        # close, so the change a copy causes is also given as a fraction of the distance between clips.
        others = embeds.roll(1, dims=0)
        results["different_clips_cosine_mean"] = token_cosine(embeds, others).mean().item()
        change = (other - embeds).norm(dim=-1).mean()
        results["change_over_between_clip_distance"] = (change / (embeds - others).norm(dim=-1).mean()).item()
    return results


def report(results: dict, with_baseline: bool) -> None:
    fast_name = f"fast ({results['fast_precision']})"
    extra = results["extra_precisions"]
    header = ["batch", "official clips/s", "model clips/s", "ours clips/s", "ours / official", f"{fast_name} clips/s",
              "fast / official", "fast / ours"]  # fmt: skip
    for precision in extra:
        header += [f"{precision} clips/s", f"{precision} / ours"]
    if with_baseline:
        header += ["baseline clips/s", "ours / baseline"]
        if any("baseline_fast" in row["clips_per_second"] for row in results["batches"].values()):
            header += ["baseline fast clips/s", "fast / baseline fast"]
    header += ["GFLOP/s ours", "max abs diff ours vs official", "fast tokens: 1 - cosine (max)"]
    header += [f"{precision} tokens: 1 - cosine (max)" for precision in extra]
    rows = []
    goals = {"exact_speed": True, "exact_accuracy": True, "fast_speedup": True, "fast_over_exact": True,
             "fast_cosine": True}  # fmt: skip
    for batch_size, row in results["batches"].items():
        speed = row["clips_per_second"]
        line = [
            batch_size,
            f"{speed['official']:.3f}",
            f"{speed['model']:.3f}",
            f"{speed['ours']:.3f}",
            f"{speed['ours'] / speed['official']:.2f}x",
            f"{speed['ours_fast']:.3f}",
            f"{speed['ours_fast'] / speed['official']:.2f}x",
            f"{speed['ours_fast'] / speed['ours']:.2f}x",
        ]
        for precision in extra:
            line += [f"{speed[f'ours_{precision}']:.3f}", f"{speed[f'ours_{precision}'] / speed['ours']:.2f}x"]
        if with_baseline:
            line += [f"{speed['baseline']:.3f}", f"{speed['ours'] / speed['baseline']:.2f}x"]
            if "baseline_fast" in speed:
                line += [f"{speed['baseline_fast']:.3f}", f"{speed['ours_fast'] / speed['baseline_fast']:.2f}x"]
        line += [
            f"{speed['ours'] * row['gflop_per_clip']:.0f}",
            f"{row['max_abs_diff_ours_vs_official']:.1e}",
            f"{1 - row['fast_token_cosine_min']:.1e}",
        ]
        line += [f"{1 - row[f'{precision}_token_cosine_min']:.1e}" for precision in extra]
        rows.append(line)
        goals["exact_speed"] &= speed["ours"] >= GOAL_EXACT_CLIPS_PER_SECOND
        goals["exact_accuracy"] &= row["max_abs_diff_ours_vs_official"] < GOAL_EXACT_MAX_ABS_DIFF
        goals["fast_speedup"] &= speed["ours_fast"] >= GOAL_FAST_SPEEDUP * speed["official"]
        goals["fast_over_exact"] &= speed["ours_fast"] >= GOAL_FAST_OVER_EXACT * speed["ours"]
    qformer = results.get("qformer", {})
    if "fast" in qformer:
        goals["fast_cosine"] = qformer["fast"]["cosine_min"] >= GOAL_FAST_COSINE
        for name, change in qformer.items():
            label = fast_name if name == "fast" else name
            print(
                f"Q-Former audio embeddings {change['audio_embeds_shape']}, {label} vs exact tokens: cosine min "
                f"{change['cosine_min']:.7f}, mean {change['cosine_mean']:.7f}"
                + (f"; moves an embedding by {change['change_over_between_clip_distance']:.2e} of the distance "
                   f"between two clips (whose cosine is {change['different_clips_cosine_mean']:.4f}, random "
                   "cross-attention)" if "different_clips_cosine_mean" in change else "")
            )  # fmt: skip
    else:
        token_cosines = [row["fast_token_cosine_min"] for row in results["batches"].values()]
        goals["fast_cosine"] = min(token_cosines) >= GOAL_FAST_COSINE
    print_table(header, rows)
    first = next(iter(results["batches"].values()))
    print(f"GFLOP per clip: {first['gflop_per_clip']:.1f}; load average after: {results['load_average_after']}")
    if "gpu" in results["machine"]:
        print("(the goals below are the CPU's; on a GPU read the table and the differences)")
    print(
        f"goals: ours >= {GOAL_EXACT_CLIPS_PER_SECOND} clips/s at every batch size: {_met(goals['exact_speed'])}; "
        f"max abs diff < {GOAL_EXACT_MAX_ABS_DIFF:g}: {_met(goals['exact_accuracy'])}; "
        f"fast >= {GOAL_FAST_SPEEDUP}x official: {_met(goals['fast_speedup'])}; "
        f"fast >= {GOAL_FAST_OVER_EXACT}x ours: {_met(goals['fast_over_exact'])}; "
        f"fast embedding cosine >= {GOAL_FAST_COSINE}: {_met(goals['fast_cosine'])}"
    )
    results["goals_met"] = goals


def _met(flag: bool) -> str:
    return "met" if flag else "NOT met"


if __name__ == "__main__":
    main()
