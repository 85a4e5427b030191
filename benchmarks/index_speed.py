"""Indexing end to end against embedding alone: does decoding audio slow `audio-qformer index` down?

    python benchmarks/index_speed.py [--config paper|demo] [--files 16] [--seconds 10] [--batch_size 8]
        [--keep_freed_memory]

Writes `--files` clips of `--seconds` (44.1 kHz stereo, alternately WAV, FLAC and MP3, so decoding and resampling cost
what they cost on real libraries), then times, on the same files and the same model (random weights; `paper` is
BEATs iter3+ and a bert-base Q-Former, `demo` the demo preset's size), interleaved over `--repeats`:

- embedding alone: the windows already decoded in memory through `AudioLibrary.embed_waveforms` (BEATs' CPU copy
  and the Q-Former), nothing decoded, nothing stored;
- `AudioLibrary.index` as the CLI runs it: decoding in a thread ahead of the model (`_decoded`), embedding, storing;
- the same with decoding not overlapped (`ahead=0`: each file decoded while the model waits), the previous behaviour.

Prints windows per second for each and the ratio of the end-to-end rates to embedding alone (the goal: >= 0.9).
`--keep_freed_memory` sets the allocator as `audio-qformer index` does on the CPU (`beats_cpu.keep_freed_memory`).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from bench_utils import machine_info, median, print_machine, print_table  # noqa: E402
from rerank_speed import CONFIGS  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep_freed_memory", action="store_true", help="As `audio-qformer index` runs on the CPU.")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        from audio_qformer.beats_cpu import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("--keep_freed_memory: the C allocator here is not glibc's; nothing to keep.")

    import soundfile
    from transformers import AutoTokenizer

    from audio_io import load_audio
    from audio_qformer.library import AudioLibrary
    from configuration_audio_qformer import AudioQFormerConfig
    from modeling_audio_qformer import AudioQFormerModel
    from audio_qformer.building import default_bert_checkpoint
    from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor

    torch.manual_seed(0)
    model = AudioQFormerModel(AudioQFormerConfig(**CONFIGS[args.config])).eval()
    processor = AudioQFormerProcessor(BeatsFeatureExtractor(), AutoTokenizer.from_pretrained(default_bert_checkpoint()))
    work = tempfile.mkdtemp(prefix="index_speed-")
    sounds = os.path.join(work, "sounds")
    os.makedirs(sounds)
    rng = np.random.default_rng(0)
    rate = 44100
    t = np.arange(int(args.seconds * rate)) / rate
    for i in range(args.files):
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)[:, None] + 0.05 * rng.standard_normal((t.size, 2))
        fmt = ("WAV", "FLAC", "MP3")[i % 3]
        soundfile.write(os.path.join(sounds, f"clip_{i:03d}.{fmt.lower()}"), wave.astype(np.float32), rate, format=fmt)

    try:
        library_dir = os.path.join(work, "library")
        windows_of_files = []
        probe = AudioLibrary(os.path.join(work, "probe"), model, processor, create=True)
        for name in sorted(os.listdir(sounds)):
            windows_of_files += probe.windows(load_audio(os.path.join(sounds, name)))[1]
        num_windows = len(windows_of_files)
        probe.embed_waveforms(windows_of_files[: args.batch_size], args.batch_size)  # warm-up (CPU copy, kernels)

        def embedding_alone():
            probe.embed_waveforms(windows_of_files, args.batch_size)

        def index(ahead):
            shutil.rmtree(library_dir, ignore_errors=True)
            library = AudioLibrary(library_dir, model, processor, create=True)
            library._audio_encoder = probe._audio_encoder  # the same CPU copy: its one-time build is not timed
            if ahead is not None:
                library._decoded = lambda paths, **_: AudioLibrary._decoded(library, paths, ahead=ahead)
            report = library.index(sounds, args.batch_size, show_progress=False)
            assert report["embedded"] == args.files, report

        sides = {"embedding alone": embedding_alone, "index (decoding overlapped)": lambda: index(None),
                 "index (decoding not overlapped)": lambda: index(0)}  # fmt: skip
        seconds = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, run in sides.items():
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_machine(machine_info())
    print(f"config {args.config}: {args.files} files of {args.seconds} s (44.1 kHz stereo WAV/FLAC/MP3), "
          f"{num_windows} windows, batch {args.batch_size}, median of {args.repeats}; freed memory "
          f"{'kept for reuse (as index)' if args.keep_freed_memory else 'returned (glibc default)'}")  # fmt: skip
    alone = num_windows / median(seconds["embedding alone"])
    rows = []
    for name, values in seconds.items():
        speed = num_windows / median(values)
        rows.append([name, f"{median(values):.2f}", f"{speed:.2f}", f"{speed / alone:.2f}"])
    print_table(["side", "seconds", "windows/s", "ratio to embedding alone"], rows)


if __name__ == "__main__":
    main()
