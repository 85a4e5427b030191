"""The GPU check: one command, under 8 minutes on a CUDA GPU, one table of what a user asks first.

    python benchmarks/gpu_check.py [--json gpu_check.json]   # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --dry_run                 # the same steps on the CPU at tiny sizes (seconds)

1. BEATs (iter3+ size, random weights) on 10.24 s windows: windows per second in float32 and in bfloat16 (a bfloat16
   copy of the weights), and how far the bfloat16 tokens are from the float32 ones (largest absolute difference,
   lowest per-token cosine);
2. one paper-size training step (`benchmarks/training_memory.py`: 16 pairs per device, cached BEATs tokens, ATC + ATM
   + ATG, backward, Adam) under bfloat16 and float16 autocast, and bfloat16 with gradient checkpointing: its time,
   the device's peak memory, and whether every loss is finite;
3. the Clotho-size evaluation (`benchmarks/clotho_scale_eval.py`: 1045 clips x 5225 captions, the matching head
   re-ranking each caption's top 16) at the paper's size, in float32 and under bfloat16 autocast;
4. with two GPUs or more, `accelerate launch --multi_gpu --num_processes 2 train.py` on a small synthetic set: the
   2-process training runs (5 steps) and writes its model.

Each step runs in its own process; a failure is a row of the table, not the end of the check.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
GIB = 1024**3


def beats_speed(device: str, tiny: bool, batch_size: int, repeats: int) -> list[list]:
    """Windows/s of BEATs in float32 and bfloat16 on the same windows, and the bfloat16 tokens' distance."""
    import numpy as np

    from configuration_audio_qformer import BeatsConfig
    from modeling_audio_qformer import BeatsModel
    from processing_audio_qformer import BeatsFeatureExtractor
    from train import DEMO_BEATS

    torch.manual_seed(0)
    config = BeatsConfig(**({**DEMO_BEATS, "encoder_layers": 1} if tiny else {}))
    model = BeatsModel(config).to(device).eval()
    waves = [np.random.default_rng(i).standard_normal(163840).astype(np.float32) * 0.1 for i in range(batch_size)]
    features = BeatsFeatureExtractor()(waves, sampling_rate=16000, return_tensors="pt").to(device)
    copy = BeatsModel(config).to(device).eval()
    copy.load_state_dict(model.state_dict())
    copy.to(torch.bfloat16)
    rows, outputs = [], {}
    for name, encoder, dtype in (("float32", model, torch.float32), ("bfloat16", copy, torch.bfloat16)):
        inputs = {"input_features": features["input_features"].to(dtype)}
        with torch.inference_mode():
            encoder(**inputs)  # warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(repeats):
                outputs[name] = encoder(**inputs).last_hidden_state.float()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        rate = batch_size * repeats / (time.perf_counter() - started)
        rows.append([f"BEATs {name}", f"batch {batch_size}", f"{rate:.1f} windows/s", "ok"])
    difference = (outputs["bfloat16"] - outputs["float32"]).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(outputs["bfloat16"], outputs["float32"], dim=-1).min().item()
    rows[-1][3] = f"max |diff| {difference:.3f}, min token cosine {cosine:.5f}"
    return rows


def run_json(command: list[str], timeout: int) -> tuple[dict | None, str]:
    """Run a benchmark; its last stdout line (or the --json file it wrote) as JSON, or the error's tail."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    if done.returncode:
        return None, (done.stderr or done.stdout)[-300:].strip().replace("\n", " | ")
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def training_steps(device: str, tiny: bool) -> list[list]:
    rows = []
    config = "tiny" if tiny else "paper"
    for precision, checkpointing in (("bfloat16", False), ("float16", False), ("bfloat16", True)):
        command = [sys.executable, os.path.join(HERE, "training_memory.py"), "--config", config, "--device", device,
                   "--one", json.dumps([16, precision, checkpointing])] + (["--audio_tokens", "64"] if tiny else [])  # fmt: skip
        result, error = run_json(command, timeout=300)
        setting = f"train step, 16 pairs, {precision} autocast" + (", checkpointing" if checkpointing else "")
        if result is None:
            rows.append([setting, "", "", f"FAILED: {error}"])
            continue
        finite = all(value == value and abs(value) != float("inf") for value in result["losses"].values())
        if result["device_peak"] is not None:
            memory = f"peak {result['device_peak'] / GIB:.2f} GiB"
        else:
            memory = f"peak above state {result['activation_peak'] / GIB:.2f} GiB (CPU resident)"
        rows.append([setting, f"{result['seconds']:.2f} s", memory, "losses finite" if finite else "NON-FINITE losses"])
    return rows


def clotho_evaluation(device: str, tiny: bool) -> list[list]:
    rows = []
    size = ["--config", "demo", "--clips", "8", "--captions_per_clip", "2", "--rerank_top_k", "4"] if tiny else []
    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory() as folder:
            output = os.path.join(folder, "eval.json")
            command = [sys.executable, os.path.join(HERE, "clotho_scale_eval.py"), "--device", device, "--dtype", dtype,
                       "--json", output, *size]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
            if done.returncode or not os.path.exists(output):
                rows.append([f"Clotho-size evaluation, {dtype}", "", "", f"FAILED: {done.stderr[-300:]}"])
                continue
            result = json.load(open(output))
        args = result["args"]
        shape = f"{args['clips']} clips x {args['clips'] * args['captions_per_clip']} captions, re-rank {args['rerank_top_k']}"
        rows.append([f"Clotho-size evaluation, {dtype}", shape, f"{result['total_seconds']:.1f} s", "ok"])
    return rows


def two_gpu_training(tiny: bool) -> list[list]:
    if tiny or torch.cuda.device_count() < 2:
        return [["2-GPU accelerate launch", "", "", f"skipped: {torch.cuda.device_count()} GPU(s)"]]
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "data")
        subprocess.run([sys.executable, "-m", "audio_qformer.synthetic_sounds", "--output_dir", data, "--num_train", "32",
                        "--num_validation", "8", "--num_library", "8"], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run([
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "train.py",
            "--preset", "demo", "--train_dir", os.path.join(data, "train"), "--validation_dir",
            os.path.join(data, "validation"), "--output_dir", os.path.join(folder, "model"), "--max_train_steps", "5",
            "--eval_steps", "5", "--per_device_train_batch_size", "8", "--mixed_precision", "bf16",
        ], cwd=ROOT, capture_output=True, text=True, timeout=400)  # fmt: skip
        ok = done.returncode == 0 and os.path.exists(os.path.join(folder, "model", "model.safetensors"))
        status = "ok: 5 steps, model saved" if ok else f"FAILED: {done.stderr[-300:]}"
        return [["2-GPU accelerate launch", "train.py demo, 2 x 8 pairs, bf16", f"{time.perf_counter() - started:.0f} s", status]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny sizes: check that every step runs.")
    parser.add_argument("--json", help="Write the table here.")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; --dry_run runs the same steps on the CPU at tiny sizes.")
    from bench_utils import machine_info, print_machine, print_table

    device = "cpu" if args.dry_run else "cuda"
    started = time.perf_counter()
    info = machine_info(device)
    print_machine(info)
    rows = beats_speed(device, args.dry_run, batch_size=2 if args.dry_run else 32, repeats=1 if args.dry_run else 5)
    rows += training_steps(device, args.dry_run)
    rows += clotho_evaluation(device, args.dry_run)
    rows += two_gpu_training(args.dry_run)
    print_table(["check", "setting", "measured", "result"], rows)
    print(f"gpu_check: {time.perf_counter() - started:.0f} s" + (" (dry run: CPU, tiny sizes)" if args.dry_run else ""))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "dry_run": args.dry_run, "rows": rows}, handle, indent=1)
    failed = [row for row in rows if row[3].startswith(("FAILED", "NON-FINITE"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
