"""Memory of one training step at the paper's sizes: what fits which GPU.

    python benchmarks/training_memory.py [--batch_sizes 8 16] [--precisions float32 bfloat16 float16] [--json out.json]
    python benchmarks/training_memory.py --config tiny          # seconds: the same code on a tiny model (tests)

One step is what `train.py` runs per micro-batch: the cached-token path (BEATs tokens in, BEATs not run), ATC + ATM
(hard negatives) + ATG, backward, then Adam's update, on `AudioQFormerConfig()` (BEATs iter3+, a bert-base Q-Former,
32 queries) with random weights, 496 BEATs tokens per clip (10 s) and 32-token captions. Each setting (batch size x
precision x gradient checkpointing) runs in its own process and reports, in bytes:

- parameters: the trainable ones (Q-Former, projections, heads; float32 masters, also under autocast) and frozen
  BEATs apart (with cached tokens BEATs never runs; `train.py` keeps it on the device only to save it with the model);
- gradients (trainable parameters, float32) and Adam's state (two float32 moments per trainable parameter);
- activations kept for backward: every tensor autograd saves during the forward pass (`saved_tensors_hooks`, each
  storage counted once), which is what gradient checkpointing and autocast shrink;
- the step's peak above that state, as the device sees it: on a GPU `torch.cuda.max_memory_allocated` over a step
  less what the step started with; on the CPU the process's resident high-water mark (`ru_maxrss`) grown over the
  first steps, less the gradients and Adam's state they allocated. It holds the saved activations and what a step
  also needs for a moment: temporaries, the backward's buffers, the layers recomputed under checkpointing.

Also the step's time (one warm step) and the losses, which must be finite, and equal with and without checkpointing.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

CONFIGS = {
    "paper": dict(),
    "tiny": dict(audio_config=dict(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
                                   patch_embed_dim=16, conv_pos=16, conv_pos_groups=4),
                 qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     encoder_hidden_size=32, vocab_size=200),
                 num_query_tokens=4, embed_dim=16, decoder_bos_token_id=199),
}  # fmt: skip
GIB = 1024**3


def saved_bytes_counter():
    """A `saved_tensors_hooks` pair that adds up the bytes of the storages autograd keeps, each counted once."""
    seen, total = set(), [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and storage.nbytes():
            seen.add(key)
            total[0] += storage.nbytes()
        return tensor

    return pack, (lambda tensor: tensor), total


def one_setting(config_name: str, batch_size: int, precision: str, checkpointing: bool, audio_tokens: int,
                text_tokens: int, device: str) -> dict:  # fmt: skip
    from configuration_audio_qformer import AudioQFormerConfig
    from modeling_audio_qformer import AudioQFormerModel

    torch.manual_seed(0)
    model = AudioQFormerModel(AudioQFormerConfig(**CONFIGS[config_name])).to(device).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    hidden, vocab = model.config.audio_config.hidden_size, model.config.qformer_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batch = {
        "audio_hidden_states": torch.randn(batch_size, audio_tokens, hidden, generator=generator).to(device),
        "audio_attention_mask": torch.ones(batch_size, audio_tokens, dtype=torch.long, device=device),
        "input_ids": torch.randint(min(1000, vocab // 2), vocab - 1, (batch_size, text_tokens), generator=generator).to(device),
        "attention_mask": torch.ones(batch_size, text_tokens, dtype=torch.long, device=device),
        "audio_ids": torch.arange(batch_size, device=device),
    }
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, precision),
                              enabled=precision != "float32")  # fmt: skip

    def step(count_saved=False):
        pack, unpack, saved = saved_bytes_counter()
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, unpack) if count_saved else nullcontext():
            outputs = model(**batch, return_loss=True, generator=torch.Generator().manual_seed(1))
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
        return outputs, saved[0]

    # Warm-up (gradients and Adam's state exist from here on, as in every step after the first), counting what autograd
    # saves: the same tensors as in any later step. On the CPU the resident high-water mark is taken before it, since
    # memory freed after the first step is kept by the C allocator and the second step reuses it.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(1)
    _, saved = step(count_saved=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()  # parameters, gradients, Adam's state, inputs
    started = time.perf_counter()
    torch.manual_seed(1)
    outputs, _ = step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    beats = sum(p.numel() * p.element_size() for p in model.audio_model.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    adam = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    if device.startswith("cuda"):  # the allocator's peak over the step, above what the step started with
        peak = torch.cuda.max_memory_allocated() - before
        device_total = torch.cuda.max_memory_allocated()
    else:  # resident growth over the two steps, less the gradients and Adam's state the first one allocated
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before - trainable_bytes - adam
        device_total = None
    return {
        "batch_size": batch_size, "precision": precision, "checkpointing": checkpointing, "device": device,
        "parameters_trainable": trainable_bytes, "parameters_beats": beats, "gradients": trainable_bytes,
        "optimizer_state": adam, "activations_saved": saved, "activation_peak": peak, "device_peak": device_total, "seconds": seconds,
        "losses": {n: getattr(outputs, n).item() for n in ("loss", "loss_atc", "loss_atm", "loss_atg")},
    }  # fmt: skip


def step_flops(config_name: str, batch_size: int, audio_tokens: int, text_tokens: int) -> dict:
    """Floating-point operations of one training step (forward + backward, float32; `FlopCounterMode` counts the
    matrix products and attention, the bulk of the work), for wall-time estimates on other devices."""
    from torch.utils.flop_counter import FlopCounterMode

    from configuration_audio_qformer import AudioQFormerConfig
    from modeling_audio_qformer import AudioQFormerModel

    torch.manual_seed(0)
    model = AudioQFormerModel(AudioQFormerConfig(**CONFIGS[config_name])).train()
    hidden, vocab = model.config.audio_config.hidden_size, model.config.qformer_config.vocab_size
    batch = {"audio_hidden_states": torch.randn(batch_size, audio_tokens, hidden),
             "audio_attention_mask": torch.ones(batch_size, audio_tokens, dtype=torch.long),
             "input_ids": torch.randint(min(1000, vocab // 2), vocab - 1, (batch_size, text_tokens)),
             "attention_mask": torch.ones(batch_size, text_tokens, dtype=torch.long)}  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        model(**batch, return_loss=True, generator=torch.Generator().manual_seed(1)).loss.backward()
    return {"batch_size": batch_size, "flops": counter.get_total_flops()}


def run_settings(args) -> list[dict]:
    """Each setting in a fresh process, so that peak figures do not carry over."""
    results = []
    for batch_size in args.batch_sizes:
        for precision in args.precisions:
            for checkpointing in (False, True):
                command = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--one",
                           json.dumps([batch_size, precision, checkpointing]), "--audio_tokens", str(args.audio_tokens),
                           "--text_tokens", str(args.text_tokens), "--device", args.device]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{batch_size} / {precision} / checkpointing={checkpointing} failed:\n{done.stderr[-3000:]}")
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = results[-1]
                print(f"  batch {batch_size:>2} {precision:>8} checkpointing={str(checkpointing):5}: activations "
                      f"{r['activations_saved'] / GIB:.2f} GiB, step {r['seconds']:.1f} s", flush=True)  # fmt: skip
    return results


def print_report(results: list[dict]):
    from bench_utils import print_table

    rows = []
    for r in results:
        fixed = r["parameters_trainable"] + r["gradients"] + r["optimizer_state"]
        rows.append([
            r["batch_size"], r["precision"], "yes" if r["checkpointing"] else "no",
            f"{r['parameters_trainable'] / GIB:.2f}", f"{r['parameters_beats'] / GIB:.2f}", f"{r['gradients'] / GIB:.2f}",
            f"{r['optimizer_state'] / GIB:.2f}", f"{r['activations_saved'] / GIB:.2f}", f"{r['activation_peak'] / GIB:.2f}",
            f"{(fixed + r['activations_saved']) / GIB:.2f}", f"{(fixed + r['parameters_beats'] + r['activations_saved']) / GIB:.2f}",
            f"{r['seconds']:.1f}", f"{r['losses']['loss']:.4f}",
        ])  # fmt: skip
    print_table(["batch", "precision", "ckpt", "params GiB", "BEATs GiB", "grads GiB", "Adam GiB", "activations GiB",
                 "peak above state GiB", "total w/o BEATs", "total with BEATs", "step s", "loss"], rows)  # fmt: skip
    by_key = {(r["batch_size"], r["precision"], r["checkpointing"]): r for r in results}
    for (batch_size, precision, checkpointing), r in by_key.items():
        other = by_key.get((batch_size, precision, True))
        if not checkpointing and other:
            diff = max(abs(r["losses"][n] - other["losses"][n]) for n in r["losses"])
            print(f"batch {batch_size} {precision}: checkpointing changes the losses by at most {diff:.2e}, "
                  f"activations {r['activations_saved'] / GIB:.2f} -> {other['activations_saved'] / GIB:.2f} GiB")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "float16"],
                        choices=["float32", "bfloat16", "float16"])  # fmt: skip
    parser.add_argument("--audio_tokens", type=int, default=496, help="BEATs tokens per clip (496: 10 s; train crops 512).")
    parser.add_argument("--text_tokens", type=int, default=32, help="Caption length (the paper's max length, 32).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="Write the settings' figures here.")
    parser.add_argument("--flops", action="store_true", help="Only count one step's operations (batch: the largest).")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting, in this process
    args = parser.parse_args(argv)
    if args.flops:
        result = step_flops(args.config, max(args.batch_sizes), args.audio_tokens, args.text_tokens)
        print(f"one training step, batch {result['batch_size']}: {result['flops'] / 1e12:.2f} TFLOP (forward + backward)")
        return 0
    if args.one:
        batch_size, precision, checkpointing = json.loads(args.one)
        print(json.dumps(one_setting(args.config, batch_size, precision, checkpointing, args.audio_tokens,
                                     args.text_tokens, args.device)))  # fmt: skip
        return 0
    from bench_utils import machine_info, print_machine

    info = machine_info(args.device)
    print_machine(info)
    results = run_settings(args)
    print_report(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "config": args.config, "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
