"""BEATs on the CPU with glibc's default allocator against `beats_cpu.keep_freed_memory()` (as `audio-qformer index`).

    python benchmarks/allocator_speed.py [--precisions float32 int8 bfloat16] [--batch_sizes 8 1] [--pairs 3]
        [--repeats 3] [--threads N] [--emulate_avx2] [--json allocator_speed.json]

An allocator setting holds for a whole process and cannot be undone (once set, glibc stops adapting its thresholds), so
the two sides run in separate processes, started in turn: `--pairs` pairs of (default, kept) processes. Each process
builds the paper-size BEATs (iter3+ AS2M architecture, random weights), makes its CPU copies (`beats_cpu.cpu_copy`:
"float32" is the exact copy `index` runs, "int8" and "bfloat16" the fast ones), and times one pass over
`(batch, 998 frames, 128 mel bins)` fbank per batch size and copy, `--repeats` times after a warm-up, interleaved;
it also reports its peak resident memory and the page faults of one pass. The table gives, per copy and batch size,
the median clips/s of each side over the pairs and the median of the pairs' ratios (kept / default).

`--emulate_avx2` starts every process with `bench_utils.AVX2_ENV`'s instruction-set caps (AVX2 only, as
`beats_speed.py`).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_utils import AVX2_ENV, machine_info, median, print_machine, print_table  # noqa: E402


SIDES = ("default", "kept")


def worker(side: str, precisions: list[str], batch_sizes: list[int], repeats: int, threads: int) -> dict:
    """One process's timings: `{"precision/batch": clips per second}`, its peak memory and faults per pass."""
    from audio_qformer import beats_cpu

    applied = beats_cpu.keep_freed_memory() if side == "kept" else False
    if side == "kept" and not applied:
        raise SystemExit("keep_freed_memory() did not apply here (glibc on Linux only).")
    import torch

    from configuration_audio_qformer import BeatsConfig
    from modeling_audio_qformer import BeatsModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BeatsModel(BeatsConfig()).eval()
    copies = {precision: beats_cpu.cpu_copy(model, precision)[0] for precision in precisions}
    features = torch.randn(max(batch_sizes), 998, 128)
    seconds, faults = {}, {}
    with torch.inference_mode():
        for batch in batch_sizes:
            inputs = features[:batch]
            for copy in copies.values():  # warm-up: packing, kernel generation, the allocator's first blocks
                copy(inputs)
            for _ in range(repeats):
                for precision, copy in copies.items():
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start = time.perf_counter()
                    copy(inputs)
                    seconds.setdefault(f"{precision}/{batch}", []).append(time.perf_counter() - start)
                    faults.setdefault(f"{precision}/{batch}", []).append(
                        resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                    )
    return {
        "side": side,
        "clips_per_second": {key: int(key.split("/")[1]) / median(values) for key, values in seconds.items()},
        "faults_per_pass": {key: median(values) for key, values in faults.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", nargs="+", default=["float32", "int8", "bfloat16"],
                        choices=["float32", "int8", "bfloat16"])  # fmt: skip
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--pairs", type=int, default=3, help="Pairs of processes (default, kept), run in turn.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes per copy and batch size in a process.")
    parser.add_argument("--threads", type=int, help="Threads per process (default: the CPUs this process may use).")
    parser.add_argument("--emulate_avx2", action="store_true", help="Cap every process at AVX2 (see beats_speed.py).")
    parser.add_argument("--json", help="Also write the results here.")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(*args.batch_sizes, args.pairs, args.repeats, 1 if args.threads is None else args.threads) < 1:
        parser.error("--batch_sizes, --pairs, --repeats and --threads must be positive")
    threads = args.threads or len(os.sched_getaffinity(0))
    if args.worker:
        warnings.filterwarnings("ignore")
        print(json.dumps(worker(args.worker, args.precisions, args.batch_sizes, args.repeats, threads)))
        return 0

    info = machine_info()
    print_machine(info)
    print(f"{threads} threads per process; {args.pairs} pairs of processes" + (
        "; capped at AVX2: " + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) if args.emulate_avx2 else ""))
    env = {**os.environ, **(AVX2_ENV if args.emulate_avx2 else {})}
    command = [sys.executable, os.path.abspath(__file__), "--precisions", *args.precisions, "--batch_sizes",
               *map(str, args.batch_sizes), "--repeats", str(args.repeats), "--threads", str(threads)]  # fmt: skip
    runs = {side: [] for side in SIDES}
    for pair in range(args.pairs):
        for side in SIDES:
            done = subprocess.run([*command, "--worker", side], env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"The {side} process failed:\n{done.stderr[-3000:]}")
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            speeds = runs[side][-1]["clips_per_second"]
            print(f"pair {pair + 1}, {side}: " + ", ".join(f"{key} {value:.3f}" for key, value in speeds.items()),
                  flush=True)  # fmt: skip

    rows, results = [], []
    for key in runs["default"][0]["clips_per_second"]:
        precision, batch = key.split("/")
        speeds = {side: [run["clips_per_second"][key] for run in runs[side]] for side in SIDES}
        faults = {side: median([run["faults_per_pass"][key] for run in runs[side]]) for side in SIDES}
        ratio = median([kept / default for default, kept in zip(speeds["default"], speeds["kept"])])
        results.append({"precision": precision, "batch": int(batch), "ratio": ratio, "faults_per_pass": faults,
                        **{f"{side}_clips_per_second": median(speeds[side]) for side in SIDES}})  # fmt: skip
        rows.append([precision, batch, f"{median(speeds['default']):.3f}", f"{median(speeds['kept']):.3f}",
                     f"{ratio:.2f}x", f"{faults['default']:.0f} / {faults['kept']:.0f}"])  # fmt: skip
    print_table(["copy", "batch", "default clips/s", "kept clips/s", "kept / default", "page faults per pass"], rows)
    peak = {side: median([run["peak_rss_mib"] for run in runs[side]]) for side in SIDES}
    print(f"peak resident memory per process: default {peak['default']:.0f} MiB, kept {peak['kept']:.0f} MiB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "threads": threads, "emulate_avx2": args.emulate_avx2, "results": results,
                       "peak_rss_mib": peak, "runs": runs}, handle, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
