"""Speed of `BeatsFeatureExtractor` against kaldi-native-fbank (a C++ port of Kaldi's fbank) on the same audio.

    python benchmarks/fbank_speed.py [--json fbank_speed.json] [--batch_sizes 1 8] [--seconds 10] [--repeats 7]
        [--baseline_rev GIT_REV]

kaldi-native-fbank refuses 128 mel bins at 16 kHz (one filter covers no FFT bin), so the comparison runs at 80 bins
through the same code path as `tests/test_feature_extraction.py`: `BeatsFeatureExtractor(feature_size=80,
fbank_mean=0.0, fbank_std=0.5)`, whose normalisation is then the identity. Ours is timed as users call it (one call
per batch: checks, fbank, padding, a NumPy batch); kaldi-native-fbank clip by clip, stacked into a batch. BEATs'
own setting (128 bins) is timed as well. The sides alternate in one process (`bench_utils.interleaved_timing`); the
table gives clips per second (median) and ratios. Differences: the largest over all values, and the largest within
80 dB of each frame's peak (where the float32 arithmetic of Kaldi is not the limit), as the tests measure them.
`--baseline_rev` also times the extractor as it was at that git revision, for before/after ratios.
"""

import argparse
import json
import os
import sys

import numpy as np


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_utils import (  # noqa: E402
    import_module_at_revision,
    interleaved_timing,
    machine_info,
    median,
    print_machine,
    print_table,
)
from compare_beats_official import test_waveforms  # noqa: E402
from processing_audio_qformer import BeatsFeatureExtractor  # noqa: E402
from references import kaldi_native_fbank  # noqa: E402


COMPARISON_BINS = 80  # the most kaldi-native-fbank accepts here; see the module docstring


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="Batch sizes to time.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of every clip in seconds.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed calls per side and batch size (median).")
    parser.add_argument(
        "--baseline_rev",
        default=None,
        help="Also time BeatsFeatureExtractor from processing_audio_qformer.py at this git revision.",
    )
    args = parser.parse_args()
    if any(size < 1 for size in args.batch_sizes):
        raise ValueError(f"--batch_sizes must be positive, got {args.batch_sizes}.")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}.")
    try:
        import kaldi_native_fbank as knf
    except ImportError as error:
        raise ImportError("fbank_speed.py compares with kaldi-native-fbank: pip install kaldi-native-fbank") from error

    comparable = BeatsFeatureExtractor(feature_size=COMPARISON_BINS, fbank_mean=0.0, fbank_std=0.5)
    beats = BeatsFeatureExtractor()
    baseline = None
    if args.baseline_rev:
        module = import_module_at_revision(args.baseline_rev, "processing_audio_qformer.py", "baseline_processing")
        baseline = module.BeatsFeatureExtractor(feature_size=COMPARISON_BINS, fbank_mean=0.0, fbank_std=0.5)
    waveforms = test_waveforms([args.seconds] * max(args.batch_sizes))

    info = machine_info()
    info["kaldi_native_fbank"] = getattr(knf, "__version__", "unknown")
    print_machine(info)
    results = {"machine": info, "args": vars(args), "comparison_bins": COMPARISON_BINS, "batches": {}}
    for batch_size in args.batch_sizes:
        clips = waveforms[:batch_size]
        ours = comparable(clips, sampling_rate=16000, return_tensors="np")["input_features"]
        reference = np.stack([kaldi_native_fbank(clip, COMPARISON_BINS) for clip in clips])
        audible = reference > reference.max(axis=-1, keepdims=True) - np.log(1e8)
        row = {
            "shape": list(ours.shape),
            "max_abs_diff_vs_kaldi": float(np.abs(ours - reference).max()),
            "max_abs_diff_vs_kaldi_within_80dB": float(np.abs(ours - reference)[audible].max()),
        }
        sides = {
            "kaldi_native_fbank": lambda: np.stack([kaldi_native_fbank(clip, COMPARISON_BINS) for clip in clips]),
            "ours": lambda: comparable(clips, sampling_rate=16000, return_tensors="np"),
            "ours_128_bins": lambda: beats(clips, sampling_rate=16000, return_tensors="np"),
        }
        if baseline is not None:
            before = baseline(clips, sampling_rate=16000, return_tensors="np")["input_features"]
            row["max_abs_diff_vs_baseline"] = float(np.abs(ours - before).max())
            sides["baseline"] = lambda: baseline(clips, sampling_rate=16000, return_tensors="np")
        seconds = interleaved_timing(sides, args.repeats)
        row["seconds"] = seconds
        row["clips_per_second"] = {name: batch_size / median(values) for name, values in seconds.items()}
        results["batches"][str(batch_size)] = row
    results["load_average_after"] = machine_info().get("load_average_1_5_15min")

    header = ["batch", "kaldi-native-fbank clips/s", "ours clips/s", "ours / kaldi", "ours 128 bins clips/s"]
    if baseline is not None:
        header += ["baseline clips/s", "ours / baseline", "max diff vs baseline"]
    header += ["max diff vs kaldi", "max diff vs kaldi within 80 dB"]
    rows = []
    met = True
    for batch_size, row in results["batches"].items():
        speed = row["clips_per_second"]
        line = [
            batch_size,
            f"{speed['kaldi_native_fbank']:.1f}",
            f"{speed['ours']:.1f}",
            f"{speed['ours'] / speed['kaldi_native_fbank']:.2f}x",
            f"{speed['ours_128_bins']:.1f}",
        ]
        if baseline is not None:
            line += [
                f"{speed['baseline']:.1f}",
                f"{speed['ours'] / speed['baseline']:.2f}x",
                f"{row['max_abs_diff_vs_baseline']:.1e}",
            ]
        line += [f"{row['max_abs_diff_vs_kaldi']:.1e}", f"{row['max_abs_diff_vs_kaldi_within_80dB']:.1e}"]
        rows.append(line)
        met &= speed["ours"] >= speed["kaldi_native_fbank"]
    print_table(header, rows)
    print(f"load average after: {results['load_average_after']}")
    status = "met" if met else "NOT met"
    print(f"goal: ours at least as fast per clip as kaldi-native-fbank at every batch size: {status}")
    results["goal_met"] = met
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
