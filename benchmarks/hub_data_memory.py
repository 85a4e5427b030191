"""Peak memory of loading a Hub copy of captioned audio for training, per process, against the audio's size.

    python benchmarks/hub_data_memory.py [--clips 300] [--seconds 10] [--processes 4] [--baseline_revision REV]

Writes a Parquet copy shaped like `OpenSound/AudioCaps` (a row per caption, five captions a clip, each row repeating
its clip's encoded audio) and loads it with `audio_text_data.load_hub_dataset` as `train.py` does: the first
process streams the rows, writes each clip's audio once under `--audio_cache_dir` and lists the rows; the others
(started after it, as `main_process_first` orders them) read that listing. Each process runs alone in a fresh
interpreter and reports its peak RSS (VmHWM, reset after its imports) above its RSS then. For contrast, the loader as it was at
`--baseline_revision` (`load_dataset` into an Arrow table, the bytes copied into every caption's row) and, keyed as
`train.py` then keyed it (`with_cache_keys`), once per process. Goal: every process under 1 GiB plus 10% of the
audio's size.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

CHILD = """
import json, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/benchmarks")
from audio_qformer.data import load_hub_dataset, with_cache_keys
def status(field):  # kB, from the kernel's accounting of this process
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
if {baseline!r}:
    from bench_utils import import_module_at_revision
    old = import_module_at_revision({baseline!r}, "audio_text_data.py", "old_audio_text_data")
    dataset, skipped = old.load_hub_dataset({copy!r}, "train")
else:
    dataset, skipped = load_hub_dataset({copy!r}, "train", audio_dir={audio_dir!r}, write={write!r})
dataset = with_cache_keys(dataset)
peak = status("VmHWM")
print(json.dumps({{"rows": len(dataset), "clips": len(set(dataset["audio_id"])), "peak_mib": (peak - before) / 1024}}))
"""


def write_copy(folder: str, clips: int, seconds: float, clips_per_file: int = 200) -> int:
    """The Parquet copy, in files of `clips_per_file` clips as the Hub shards them; returns its distinct audio's bytes."""
    import numpy as np
    import soundfile
    from datasets import Audio, Dataset

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    total, files = 0, -(-clips // clips_per_file)
    for shard in range(files):
        rows = {"audiocap_id": [], "youtube_id": [], "start_time": [], "audio": [], "caption": []}
        for clip in range(shard * clips_per_file, min(clips, (shard + 1) * clips_per_file)):
            buffer = io.BytesIO()
            soundfile.write(buffer, (0.1 * rng.standard_normal(int(32000 * seconds))).astype(np.float32), 32000,
                            format="WAV", subtype="PCM_16")  # fmt: skip
            data = buffer.getvalue()
            total += len(data)
            for j in range(5):
                rows["audiocap_id"].append(clip * 5 + j)
                rows["youtube_id"].append(f"{clip:011d}")
                rows["start_time"].append(30)
                rows["audio"].append({"bytes": data, "path": f"{clip:011d}.wav"})
                rows["caption"].append(f"caption {j} of clip {clip}")
        table = Dataset.from_dict(rows).cast_column("audio", Audio(decode=False))
        table.to_parquet(os.path.join(folder, "data", f"train-{shard:05d}-of-{files:05d}.parquet"))
    return total


def run(copy: str, audio_dir: str | None, write: bool, baseline: str | None = None) -> dict:
    script = CHILD.format(root=ROOT, copy=copy, audio_dir=audio_dir, write=write, baseline=baseline)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    from bench_utils import machine_info, print_machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--baseline_revision", default="691ee0e",
                        help="The loader to compare with (a revision before the audio was written to disk).")
    args = parser.parse_args(argv)
    print_machine(machine_info())
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "copy")
        audio_mib = write_copy(copy, args.clips, args.seconds) / 2**20
        goal = 1024 + 0.1 * audio_mib
        print(f"{args.clips} clips x 5 captions, {audio_mib:.0f} MiB of distinct audio ({5 * audio_mib:.0f} MiB in the "
              f"rows); goal per process: under {goal:.0f} MiB above its imports")  # fmt: skip
        results = [("process 0 (writes the audio)", run(copy, os.path.join(tmp, "audio"), True))]
        results += [(f"process {i} (reads the listing)", run(copy, os.path.join(tmp, "audio"), False))
                    for i in range(1, args.processes)]  # fmt: skip
        if args.baseline_revision:  # '' skips it (it holds many times the audio)
            results.append((f"each process at {args.baseline_revision}", run(copy, None, True, args.baseline_revision)))
        for name, result in results:
            verdict = "within the goal" if result["peak_mib"] < goal else "OVER the goal"
            print(f"{name:40s} {result['rows']} rows, {result['clips']} clips: peak +{result['peak_mib']:.0f} MiB "
                  f"({result['peak_mib'] / audio_mib:.2f}x the audio) {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
