"""Run by tests/test_train.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU).

One global batch of 8 pairs is split over the two processes, which train with `train.py`'s batch gatherer and average
their gradients as DDP does; the gradient of ATC + ATG must equal that of one process holding the whole batch, for
both settings of `atc_gather_with_grad`. ATM is left out: its hard negatives are drawn at random per process.
Rank 0 prints one JSON line: per setting, the largest gradient difference relative to the largest gradient.
"""

import json
import os
import sys

import torch
from accelerate import Accelerator


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_qformer_config  # noqa: E402

from modeling_audio_qformer import AudioQFormerModel  # noqa: E402
from train import make_batch_gatherer  # noqa: E402


def global_batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 2000, (8, 10), generator=generator)
    input_ids[:, 0] = 101
    return {
        "input_ids": input_ids,
        # Captions of equal length: each process's token-mean ATG loss is then a share of the global mean.
        "attention_mask": torch.ones(8, 10, dtype=torch.long),
        "audio_hidden_states": torch.randn(8, 24, 32, generator=generator),
        "audio_attention_mask": (torch.arange(24)[None, :] < torch.tensor([24, 16, 24, 8, 24, 24, 16, 24])[:, None]).long(),
        # Two clips with two captions each, one of them split across the processes.
        "audio_ids": torch.tensor([0, 0, 1, 2, 2, 3, 4, 4]),
    }


def gradients(model, batch, gatherer=None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    outputs = model(**batch, return_loss=True, batch_gatherer=gatherer, generator=torch.Generator().manual_seed(0))
    (outputs.loss_atc + outputs.loss_atg).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]


def relative_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """The largest element difference over all parameters, relative to the largest gradient element of `second`."""
    scale = max(g.abs().max().item() for g in second)
    return max((a - b).abs().max().item() for a, b in zip(first, second)) / scale


def main():
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, "launch with --num_processes 2"
    batch = global_batch()
    rank = accelerator.process_index
    local = {name: value[rank * 4 : (rank + 1) * 4] for name, value in batch.items()}
    report, alone = {}, {}
    for with_grad in (False, True):
        torch.manual_seed(0)
        model = AudioQFormerModel(tiny_qformer_config(atc_gather_with_grad=with_grad)).train()
        shared = [accelerator.reduce(g, "mean") for g in gradients(model, local, make_batch_gatherer(accelerator))]
        alone[with_grad] = gradients(model, batch)  # one process, the whole batch
        report[f"with_grad={with_grad}"] = relative_difference(shared, alone[with_grad])
    report["settings differ by"] = relative_difference(alone[True], alone[False])
    if accelerator.is_main_process:
        print(json.dumps(report), flush=True)
    accelerator.wait_for_everyone()

if __name__ == "__main__":
    main()
