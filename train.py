# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Train the audio Q-Former with Accelerate (ATC + ATM + ATG on cached BEATs tokens).

    accelerate launch --multi_gpu --num_processes 4 train.py --preset stage1 --clotho_root clotho \
        --audiocaps_csv train.csv val.csv --audiocaps_audio_dir audiocaps/audio \
        --beats_checkpoint BEATs_iter3_plus_AS2M.pt --bert bert-base-uncased --output_dir outputs/stage1
    accelerate launch --multi_gpu --num_processes 4 train.py --preset stage2 --clotho_root clotho \
        --init_from outputs/stage1 --output_dir outputs/stage2

(`reproduce_report.py` runs both stages and their evaluations: the report's Table 1 in one command.)
    python train.py --preset demo --train_dir data/synthetic/train --validation_dir data/synthetic/validation

The shape follows transformers' `run_*_no_trainer.py` examples: Accelerator, logging, seed, data, model, dataloaders,
optimizer, scheduler, `prepare`, trackers, loop, save. BEATs tokens are extracted once into a feature cache before
training (the report's recipe), split across processes. Contrastive candidates and hard negatives come from the
global micro-batch (all processes); gradient accumulation sums gradients over micro-batches, as the report's
16 per GPU x 4 GPUs x 4 steps = 256 does.
"""

import argparse
import json
import logging
import math
import os
import shutil
import time

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertTokenizer, get_scheduler

from audio_qformer.data import (
    add_hub_arguments,
    combine,
    load_audiocaps,
    load_audiofolder,
    load_clotho,
    load_hub_datasets,
    load_wavcaps,
    split_by_clip,
    split_holding_out,
    with_cache_keys,
)
from configuration_audio_qformer import BeatsConfig
from audio_qformer.features import build_cache
from audio_qformer.hub_pages import push_space, write_model_card, write_space_folder
from audio_qformer.building import default_bert_checkpoint, from_components
from modeling_audio_qformer import AudioQFormerModel
from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor
from audio_qformer.ranking_metrics import chance_metrics
from audio_qformer.retrieval import evaluate_text_to_audio, pad_tokens


logger = get_logger(__name__)

# The report's recipe (section 3) and a few-minute CPU run on the embedded synthetic set. The report gives no total
# step count; stage 1 runs one cosine period after the warm-up.
PRESETS = {
    "stage1": dict(num_query_tokens=32, learning_rate=1e-4, num_warmup_steps=1000, cosine_period_steps=1800, max_train_steps=2800,
                   per_device_train_batch_size=16, total_batch_size=256, eval_steps=200, checkpointing_steps=200),
    "stage2": dict(num_query_tokens=32, learning_rate=1e-5, num_warmup_steps=100, cosine_period_steps=1800, max_train_steps=1900,
                   per_device_train_batch_size=16, total_batch_size=256, eval_steps=100, checkpointing_steps=100),
    "demo": dict(num_query_tokens=16, num_qformer_layers=2, learning_rate=1e-3,
                 num_warmup_steps=20, cosine_period_steps=230, max_train_steps=250, per_device_train_batch_size=16,
                 total_batch_size=16, eval_steps=50, checkpointing_steps=50),
}  # fmt: skip
# A small frozen BEATs (random weights) for the embedded default, when no checkpoint is given.
DEMO_BEATS = dict(encoder_layers=4, encoder_embed_dim=384, encoder_ffn_embed_dim=1536, encoder_attention_heads=6)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--clotho_root", help="Clotho v2.1 folder (clotho_captions_{split}.csv and {split}/ audio).")
    data.add_argument("--clotho_train_splits", nargs="+", default=["development", "validation"],
                      help="Clotho splits pooled into the training data (the report pools development and validation).")
    data.add_argument("--clotho_eval_split", default="evaluation",
                      help="Clotho split used as an extra validation set ('' for none).")
    data.add_argument("--audiocaps_csv", nargs="*", default=[], help="AudioCaps CSV files (train.csv, val.csv).")
    data.add_argument("--audiocaps_audio_dir", nargs="+", default=[],
                      help="Folder of the downloaded AudioCaps clips, searched at any depth: one for every CSV (their "
                           "parent), or one per CSV.")  # fmt: skip
    data.add_argument("--audiocaps_file_pattern", nargs="+", default=[],
                      help="How your download tool names a clip's file, without extension, e.g. "
                           "'{youtube_id}_{start_time}' (fields: {youtube_id} {start_time} {end_time} {start_ms} "
                           "{end_ms} {audiocap_id}); tried before the known tools' names.")  # fmt: skip
    data.add_argument("--wavcaps_json", nargs="*", default=[],
                      help="WavCaps json_files/<source>/*_final.json files to train on.")
    data.add_argument("--wavcaps_audio_dir", nargs="+", default=[],
                      help="Where the WavCaps zips were unpacked (searched at any depth): one folder, or one per JSON.")
    data.add_argument("--wavcaps_exclude", nargs="*", default=[],
                      help="Lists of WavCaps clips to leave out (CSV with an `id` column, or WavCaps' blacklist JSON), "
                           "e.g. those overlapping Clotho and AudioCaps evaluation.")  # fmt: skip
    add_hub_arguments(data, split="train")
    data.add_argument("--audio_cache_dir", default="cache/audio",
                      help="Where the audio of Hub datasets is written, once per clip (the tables hold paths).")
    data.add_argument("--train_dir", nargs="*", default=[], help="audiofolder directories (metadata.csv) to train on.")
    data.add_argument("--validation_dir", nargs="*", default=[],
                      help="audiofolder validation sets; without them, --num_validation examples are drawn from the training data.")
    data.add_argument("--num_validation", type=int, default=1000, help="Validation examples drawn from the pooled data.")
    data.add_argument("--validation_clips",
                      help="A validation_clips.json (which train.py writes beside every model) whose clips are held out "
                           "again instead of drawing new ones; default: --init_from's, so stage 2 validates on clips "
                           "stage 1 never trained on.")  # fmt: skip
    data.add_argument("--split_seed", type=int, default=0, help="Seed of the validation draw.")
    data.add_argument("--feature_cache_dir", default="cache/features", help="Where BEATs tokens are cached.")
    data.add_argument("--extract_batch_size", type=int, default=8, help="Clips per BEATs batch when caching.")
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="Default hyper-parameters.")
    model.add_argument("--beats_checkpoint", help="Official BEATs .pt or converted directory (default: a small random BEATs).")
    model.add_argument("--bert", help="BERT checkpoint for the Q-Former (default: the packaged MiniLM-L6).")
    model.add_argument("--init_from", help="An AudioQFormerModel directory to continue from (stage 2).")
    model.add_argument("--num_query_tokens", type=int, help="Query tokens (the report: 32).")
    model.add_argument("--num_qformer_layers", type=int, help="Keep only the BERT's first N layers (default: all).")
    train = parser.add_argument_group("training (defaults from --preset)")
    train.add_argument("--learning_rate", type=float, help="Peak learning rate (Adam).")
    train.add_argument("--weight_decay", type=float, default=0.0, help="Weight decay (the report uses plain Adam).")
    train.add_argument("--num_warmup_steps", type=int, help="Linear warm-up, in optimizer steps.")
    train.add_argument("--cosine_period_steps", type=int, help="Cosine annealing period, in optimizer steps (restarts).")
    train.add_argument("--max_train_steps", type=int, help="Optimizer steps to train for.")
    train.add_argument("--per_device_train_batch_size", type=int, help="Pairs per process per micro-batch.")
    train.add_argument("--total_batch_size", type=int,
                       help="Pairs per optimizer step over all processes and accumulation steps (the report: 256).")
    train.add_argument("--gradient_accumulation_steps", type=int,
                       help="Micro-batches per optimizer step (default: derived from --total_batch_size).")
    train.add_argument("--max_audio_tokens", type=int, default=512, help="Crop longer clips to this many BEATs tokens.")
    train.add_argument("--max_text_length", type=int,
                       help="Caption length in tokens for training (default: the model config's train_max_text_length, "
                            "32 as in the report; recorded there).")
    train.add_argument("--atc_gather_with_grad", action="store_true",
                       help="Contrastive candidates gathered from the batch carry gradient (open_clip's convention); "
                            "by default they do not, as in LAVIS (config.atc_gather_with_grad).")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute the Q-Former's layers in backward instead of keeping their activations "
                            "(transformers' activation_checkpointing_enable): same losses, less memory, a slower step; see "
                            "benchmarks/training_memory.py.")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                       help="Autocast the forward pass (Accelerate's mixed precision; default: `accelerate launch`'s "
                            "setting, else no). The Q-Former, BEATs and the word embeddings stay float32 weights.")
    train.add_argument("--max_temperature", type=float, default=0.5, help="Clamp of the learnt temperature (upper).")
    train.add_argument("--min_temperature", type=float, default=0.001, help="Clamp of the learnt temperature (lower).")
    train.add_argument("--seed", type=int, default=42, help="Random seed.")
    run = parser.add_argument_group("evaluation, checkpoints, Hub")
    run.add_argument("--output_dir", default="outputs/audio-qformer", help="Where the best model and checkpoints go.")
    run.add_argument("--eval_steps", type=int, help="Evaluate every N optimizer steps.")
    run.add_argument("--per_device_eval_batch_size", type=int, default=64, help="Clips per batch when evaluating.")
    run.add_argument("--checkpointing_steps", type=int, help="Save the training state every N optimizer steps.")
    run.add_argument("--checkpoints_total_limit", type=int, default=2, help="Training states kept (oldest removed).")
    run.add_argument("--resume", action="store_true", help="Continue from the latest step_N in --output_dir.")
    run.add_argument("--resume_from_checkpoint", help="Continue from this training state directory.")
    run.add_argument("--push_to_hub", action="store_true", help="Upload the best model and a model card.")
    run.add_argument("--hub_model_id", help="Hub repository for --push_to_hub (default: the output folder's name).")
    run.add_argument("--push_space", metavar="SPACE_ID",
                     help="Also create or update a Gradio Space that serves the model (hub_pages.py; after --push_to_hub).")
    run.add_argument("--space_sounds", metavar="DIR", help="Sounds to embed into the Space's library (--push_space).")
    run.add_argument("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    run.add_argument("--report_to", default="all", help="Trackers for --with_tracking (tensorboard, wandb, ...).")
    args = parser.parse_args(argv)

    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not (args.clotho_root or args.audiocaps_csv or args.hub_dataset or args.train_dir or args.wavcaps_json):
        raise ValueError("No training data: give --clotho_root, --audiocaps_csv, --hub_dataset, --wavcaps_json and/or "
                         "--train_dir.")  # fmt: skip
    for files, folders, name in ((args.audiocaps_csv, args.audiocaps_audio_dir, "audiocaps"),
                                 (args.wavcaps_json, args.wavcaps_audio_dir, "wavcaps")):  # fmt: skip
        if files and len(folders) not in (1, len(files)):
            raise ValueError(f"--{name}_audio_dir: give one folder (searched at any depth) or one per file of "
                             f"--{name}_{'csv' if name == 'audiocaps' else 'json'}; got {len(folders)} for {len(files)}.")  # fmt: skip
    if args.max_audio_tokens % 8:
        raise ValueError(f"--max_audio_tokens must be a multiple of 8 (one 160 ms time patch); got {args.max_audio_tokens}.")
    if args.learning_rate <= 0 or args.max_train_steps <= 0:
        raise ValueError("--learning_rate and --max_train_steps must be positive.")
    return args



class _DropTiedWeightNotice(logging.Filter):
    """Accelerate warns at every checkpoint that it drops the tied caption-head weights; they are re-tied on load."""

    def filter(self, record):
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_DropTiedWeightNotice())

# --- data ----------------------------------------------------------------------------------------------------------


def _folder_for(folders: list[str], index: int) -> str:
    return folders[0] if len(folders) == 1 else folders[index]


def load_data(args, write: bool = True):
    """
    The training pool, the validation sets ({name: Dataset}) and every skipped clip. `write` is set in the process
    that writes Hub datasets' audio to disk (the main one); the others read what it listed.
    """
    parts, evaluation, skipped = [], {}, []
    if args.clotho_root:
        parts += [load_clotho(args.clotho_root, split) for split in args.clotho_train_splits]
    for i, path in enumerate(args.audiocaps_csv):
        parts.append(load_audiocaps(path, _folder_for(args.audiocaps_audio_dir, i), args.audiocaps_file_pattern))
    for i, path in enumerate(args.wavcaps_json):
        parts.append(load_wavcaps(path, _folder_for(args.wavcaps_audio_dir, i), args.wavcaps_exclude))
    parts += load_hub_datasets(args, args.audio_cache_dir, write)
    parts += [load_audiofolder(directory) for directory in args.train_dir]
    pool, skipped = combine(parts)
    if args.validation_dir:
        train = pool
        for directory in args.validation_dir:
            dataset, more = load_audiofolder(directory)
            evaluation[os.path.basename(os.path.normpath(directory))] = dataset
            skipped += more
    else:
        held_out = args.validation_clips or (args.init_from and os.path.join(args.init_from, VALIDATION_CLIPS))
        if held_out and os.path.isfile(held_out):
            with open(held_out) as handle:
                split = split_holding_out(pool, set(json.load(handle)["clips"]), held_out)
            logger.info(f"Validation: the {len(set(split['validation']['audio_id']))} clips of {held_out} in this data.")
        elif args.validation_clips:
            raise FileNotFoundError(f"--validation_clips {args.validation_clips}: no such file.")
        else:
            split = split_by_clip(pool, args.num_validation, args.split_seed)
        train, evaluation["validation"] = split["train"], split["validation"]
    if args.clotho_root and args.clotho_eval_split:
        evaluation["clotho_" + args.clotho_eval_split], more = load_clotho(args.clotho_root, args.clotho_eval_split)
        skipped += more
    return train, evaluation, skipped


def crop_tokens(tokens: np.ndarray, max_tokens: int, tokens_per_patch: int, rng: np.random.Generator) -> np.ndarray:
    """
    A random window of at most `max_tokens` tokens that starts and ends on whole time patches (`tokens_per_patch`
    tokens, 160 ms), as the report crops clips over ~10 s to 512 tokens for training. Shorter clips are returned whole.
    """
    if max_tokens % tokens_per_patch:
        raise ValueError(f"max_tokens ({max_tokens}) must be a multiple of tokens_per_patch ({tokens_per_patch}).")
    if tokens.shape[0] <= max_tokens:
        return tokens
    num_patches, window = tokens.shape[0] // tokens_per_patch, max_tokens // tokens_per_patch
    start = int(rng.integers(0, num_patches - window + 1)) * tokens_per_patch
    return tokens[start : start + max_tokens]


class CachedPairs(torch.utils.data.Dataset):
    """(BEATs tokens, caption, clip index) training pairs read from the feature cache; tokens cropped per epoch."""

    def __init__(self, rows, cache, max_tokens: int, seed: int):
        self.keys, self.captions = rows["key"], rows["caption"]
        clip_ids: dict[str, int] = {}
        self.audio_ids = [clip_ids.setdefault(audio_id, len(clip_ids)) for audio_id in rows["audio_id"]]
        self.cache, self.max_tokens, self.seed, self.epoch = cache, max_tokens, seed, 0

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        # The crop depends only on (seed, epoch, index): a resumed run crops exactly as the interrupted one.
        rng = np.random.default_rng([self.seed, self.epoch, index])
        tokens = crop_tokens(self.cache.get(self.keys[index]), self.max_tokens, 8, rng)
        return {"tokens": tokens, "caption": self.captions[index], "audio_id": self.audio_ids[index]}


def make_collate(processor, max_text_length: int, pad_audio_to: int | None):
    def collate(examples):
        states, mask = pad_tokens([e["tokens"] for e in examples], pad_audio_to)
        # Fixed-length captions (LAVIS pads to max_length), so batches gather across processes.
        text = processor(text=[e["caption"] for e in examples], padding="max_length", max_length=max_text_length,
                         return_tensors="pt")  # fmt: skip
        return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                "audio_hidden_states": states, "audio_attention_mask": mask,
                "audio_ids": torch.tensor([e["audio_id"] for e in examples])}  # fmt: skip

    return collate


class _GatherWithGradient(torch.autograd.Function):
    """
    All processes' tensors, concatenated; backward sums each slice's gradient over the processes and hands it to the
    process that owns the slice (the `GatherLayer` of LAVIS' and SimCLR's code, on public `torch.distributed` calls).
    """

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        size = grad.shape[0] // torch.distributed.get_world_size()
        rank = torch.distributed.get_rank()
        return grad[rank * size : (rank + 1) * size]


def make_batch_gatherer(accelerator):
    """
    All processes' tensors, concatenated in process order. Differentiable: each slice's gradient returns, summed over
    processes, to the process that owns it, so with gradients averaged over processes (DDP) the losses train exactly
    as one process holding the global batch (tests/two_process_gradients.py).
    """
    if accelerator.num_processes == 1:
        return None

    def gather(tensor):
        return _GatherWithGradient.apply(tensor) if tensor.requires_grad else accelerator.gather(tensor.contiguous())

    return gather


# --- evaluation ----------------------------------------------------------------------------------------------------


def evaluate_sets(model, processor, evaluation, cache, batch_size: int) -> dict:
    """Text-to-audio R@1/5/10 and mAP@10 (contrastive ranking) of each validation set."""
    results = {}
    model.eval()
    for name, rows in evaluation.items():
        key_of = dict(zip(rows["audio_id"], rows["key"]))
        metrics, _ = evaluate_text_to_audio(
            model, processor, rows["caption"], rows["audio_id"], lambda clip: cache.get(key_of[clip]), batch_size
        )
        results[name] = {**metrics["ATC"], "clips": len(key_of), "queries": len(rows)}
    model.train()
    return results


# --- the loop ------------------------------------------------------------------------------------------------------


# What --push_to_hub leaves out of the output folder: checkpoints for resuming, the log, the Space's own folder.
# The clips held out for validation, saved beside the model: the next stage holds out the same (`--validation_clips`).
VALIDATION_CLIPS = "validation_clips.json"
MODEL_UPLOAD_IGNORE = ["step_*", "step_*/**", "train_log.jsonl", "space/**"]


def latest_checkpoint(output_dir: str) -> str | None:
    steps = [int(n[5:]) for n in os.listdir(output_dir) if n.startswith("step_") and n[5:].isdigit()] if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, f"step_{max(steps)}") if steps else None


def main(argv=None):
    args = parse_args(argv)
    # The accumulation that reaches --total_batch_size depends on the number of processes, known before Accelerator.
    # Without a GPU, several launched processes train on the CPU (gloo) only when Accelerate is told so.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    num_processes = PartialState(cpu=cpu).num_processes
    per_step = args.per_device_train_batch_size * num_processes
    if args.gradient_accumulation_steps is None:
        if args.total_batch_size % per_step:
            raise ValueError(
                f"--total_batch_size {args.total_batch_size} is not a multiple of {args.per_device_train_batch_size} "
                f"per device x {num_processes} processes; set --gradient_accumulation_steps instead."
            )
        args.gradient_accumulation_steps = args.total_batch_size // per_step
    args.total_batch_size = per_step * args.gradient_accumulation_steps
    tracking = dict(log_with=args.report_to, project_dir=args.output_dir) if args.with_tracking else {}
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **tracking,
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    # Model and processor
    if args.init_from:
        model = AudioQFormerModel.from_pretrained(args.init_from)
        tokenizer = BertTokenizer.from_pretrained(args.init_from)  # AutoTokenizer would ask for remote code
    else:
        beats = args.beats_checkpoint or BeatsConfig(**DEMO_BEATS)
        model = from_components(
            beats, args.bert, num_qformer_layers=args.num_qformer_layers, num_query_tokens=args.num_query_tokens,
        )
        tokenizer = AutoTokenizer.from_pretrained(args.bert or default_bert_checkpoint())
    model.config.atc_gather_with_grad = args.atc_gather_with_grad
    if args.max_text_length is not None:
        model.config.train_max_text_length = args.max_text_length
    processor = AudioQFormerProcessor(BeatsFeatureExtractor(), tokenizer)
    if args.gradient_checkpointing:  # non-reentrant: works with frozen inputs and keeps the dropout draws
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    # Data, then BEATs tokens for every clip (computed once, shared between processes)
    with accelerator.main_process_first():
        train_rows, evaluation, skipped = load_data(args, write=accelerator.is_main_process)
        train_rows = with_cache_keys(train_rows)
        evaluation = {name: with_cache_keys(rows) for name, rows in evaluation.items()}
    if accelerator.is_main_process and not args.validation_dir:
        with open(os.path.join(args.output_dir, VALIDATION_CLIPS), "w") as handle:
            json.dump({"clips": sorted(set(evaluation["validation"]["audio_id"]))}, handle, indent=0)
    clips = [
        {"key": row["key"], "audio_path": row["audio_path"], "audio_bytes": row["audio_bytes"]}
        for rows in (train_rows, *evaluation.values()) for row in rows.select_columns(["key", "audio_path", "audio_bytes"])
    ]  # fmt: skip
    model.audio_model.to(accelerator.device)  # extraction runs on the accelerator, before `prepare` moves the rest
    cache, failures, seconds = build_cache(
        args.feature_cache_dir, clips, model.audio_model, processor.feature_extractor, accelerator, args.extract_batch_size
    )
    if failures:
        accelerator.print(f"{len(failures)} clip(s) could not be read and are left out: {[f['audio'] for f in failures[:5]]}")
    usable = {clip["key"] for clip in clips if clip["key"] in cache}
    train_rows = train_rows.filter(lambda row: row["key"] in usable, desc="Dropping unreadable clips")
    evaluation = {n: r.filter(lambda row: row["key"] in usable, desc=f"Dropping unreadable clips ({n})") for n, r in evaluation.items()}
    # The size of this run's clips (the cache may also hold other runs'): 8 tokens per 160 ms, float16.
    tokens = sum(cache.get(key).shape[0] for key in usable)
    cache_mib, hours = tokens * cache.hidden_size * 2 / 2**20, tokens * 0.02 / 3600
    accelerator.print(
        f"Feature cache {cache.directory}: {len(usable)} clips, {cache_mib:.1f} MiB "
        f"({cache_mib / max(hours, 1e-9):.0f} MiB per hour of audio), ready in {seconds:.1f} s"
    )

    train_dataset = CachedPairs(train_rows, cache, args.max_audio_tokens, args.seed)
    pad_audio_to = args.max_audio_tokens if accelerator.num_processes > 1 else None
    collate = make_collate(processor, model.config.train_max_text_length, pad_audio_to)
    # Its own generator: starting an iterator then draws nothing from the global RNG, which drives dropout and is
    # restored on resume (so a resumed run's dropout masks continue exactly).
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=collate, drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )

    # Optimizer: Adam on the trainable parameters; no decay on biases, LayerNorms, queries and temperature.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or "query_tokens" in name else decay).append(param)
    optimizer = torch.optim.Adam(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        fused=True,  # one kernel for all parameters: ~4x faster steps of the optimizer on CPU than the default
    )
    # The scheduler counts optimizer steps (after accumulation, all processes together); it is stepped by hand when
    # gradients are synchronised, not prepared (Accelerate would step it once per process).
    cycles = max(1, math.ceil((args.max_train_steps - args.num_warmup_steps) / args.cosine_period_steps))
    scheduler = get_scheduler(
        "cosine_with_restarts", optimizer, num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.num_warmup_steps + cycles * args.cosine_period_steps,
        scheduler_specific_kwargs={"num_cycles": cycles},
    )  # fmt: skip
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)
    batch_gatherer = make_batch_gatherer(accelerator)

    # Accelerate also steps at the end of an epoch, after a partial accumulation.
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.with_tracking:
        accelerator.init_trackers("audio_qformer", {k: v for k, v in vars(args).items() if not isinstance(v, list)})

    completed_steps, start_epoch, skip_batches = 0, 0, 0
    checkpoint = args.resume_from_checkpoint or (latest_checkpoint(args.output_dir) if args.resume else None)
    if checkpoint:
        accelerator.load_state(checkpoint)
        completed_steps = int(os.path.basename(os.path.normpath(checkpoint)).split("_")[1])
        start_epoch = completed_steps // steps_per_epoch
        skip_batches = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
        accelerator.print(f"Resumed from {checkpoint} at step {completed_steps}")
    best_path = os.path.join(args.output_dir, "best_metrics.json")
    best = json.load(open(best_path)) if checkpoint and os.path.exists(best_path) else None

    accelerator.print("***** Running training *****")
    accelerator.print(f"  Training pairs = {len(train_dataset)} ({len(set(train_dataset.audio_ids))} clips)")
    for name, rows in evaluation.items():
        accelerator.print(f"  Validation '{name}' = {len(rows)} captions of {len(set(rows['audio_id']))} clips")
    accelerator.print(f"  Skipped clips = {len(skipped) + len(failures)}")
    accelerator.print(f"  Batch per device = {args.per_device_train_batch_size}, processes = {accelerator.num_processes}, "
                      f"accumulation = {args.gradient_accumulation_steps}, total = {args.total_batch_size}")
    accelerator.print(f"  Optimizer steps = {args.max_train_steps} ({num_epochs} epochs of {steps_per_epoch})")

    progress = tqdm(range(args.max_train_steps), initial=completed_steps, desc="Training",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    generator = torch.Generator()
    started = time.perf_counter()
    running = {}
    model.train()
    for epoch in range(start_epoch, num_epochs):
        if completed_steps >= args.max_train_steps:  # resumed from the final checkpoint: nothing left to train
            break
        train_dataset.epoch = epoch
        train_dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_dataloader, skip_batches) if skip_batches else train_dataloader
        first_batch = skip_batches
        skip_batches = 0
        for batch_in_epoch, batch in enumerate(batches, start=first_batch):
            # The hard-negative draw depends only on (seed, epoch, batch, process): a resumed run draws the same.
            generator.manual_seed(hash((args.seed, epoch, batch_in_epoch, accelerator.process_index)) % 2**63)
            with accelerator.accumulate(model):
                outputs = model(**batch, return_loss=True, batch_gatherer=batch_gatherer, generator=generator)
                accelerator.backward(outputs.loss)
                optimizer.step()
                optimizer.zero_grad()
            # Losses are averaged over processes before logging, so every process logs the same numbers.
            terms = {n: getattr(outputs, n).detach() for n in ("loss", "loss_atc", "loss_atm", "loss_atg")}
            for name, value in terms.items():
                running[name] = running.get(name, 0.0) + accelerator.reduce(value, "mean").item()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            with torch.no_grad():  # BLIP-1's clamp; BLIP-2 leaves the temperature free
                unwrapped.temperature.clamp_(args.min_temperature, args.max_temperature)
            completed_steps += 1
            progress.update(1)
            record = {n: v / args.gradient_accumulation_steps for n, v in running.items()}
            record.update(step=completed_steps, lr=scheduler.get_last_lr()[0], temperature=unwrapped.temperature.item())
            running = {}
            progress.set_postfix(loss=f"{record['loss']:.3f}")
            if args.with_tracking:
                accelerator.log(record, step=completed_steps)

            if completed_steps % args.eval_steps == 0 or completed_steps == args.max_train_steps:
                if accelerator.is_main_process:
                    record["eval"] = evaluate_sets(unwrapped, processor, evaluation, cache, args.per_device_eval_batch_size)
                    first = next(iter(record["eval"].values()))
                    progress.write(f"step {completed_steps}: " + "; ".join(
                        f"{n} mAP@10 {100 * m['mAP@10']:.1f} R@1 {100 * m['R@1']:.1f}" for n, m in record["eval"].items()))  # fmt: skip
                    if best is None or first["mAP@10"] > best["metrics"]["mAP@10"]:
                        best = {"step": completed_steps, "metrics": first, "all": record["eval"]}
                        unwrapped.save_pretrained(args.output_dir)
                        processor.save_pretrained(args.output_dir)
                        with open(best_path, "w") as handle:
                            json.dump(best, handle, indent=2)
                    if args.with_tracking:
                        accelerator.log({f"{n}/{k}": v for n, m in record["eval"].items() for k, v in m.items()}, step=completed_steps)
                accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if completed_steps % args.checkpointing_steps == 0:
                # Written aside, then renamed: a run killed while saving never leaves a step_N that looks complete.
                partial = os.path.join(args.output_dir, f".step_{completed_steps}.partial")
                accelerator.save_state(partial)
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    final = os.path.join(args.output_dir, f"step_{completed_steps}")
                    shutil.rmtree(final, ignore_errors=True)
                    os.replace(partial, final)
                    steps = sorted(int(n[5:]) for n in os.listdir(args.output_dir) if n.startswith("step_") and n[5:].isdigit())
                    for old in steps[: -args.checkpoints_total_limit]:
                        shutil.rmtree(os.path.join(args.output_dir, f"step_{old}"), ignore_errors=True)
            if completed_steps >= args.max_train_steps:
                break
        if completed_steps >= args.max_train_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.end_training()
    if accelerator.is_main_process:
        if best is None:  # no evaluation ran: keep the final weights
            unwrapped.save_pretrained(args.output_dir)
            processor.save_pretrained(args.output_dir)
        chance = {name: chance_metrics(m["clips"]) for name, m in (best or {}).get("all", {}).items()}
        sources = [s for s, on in (("Clotho", args.clotho_root), ("AudioCaps", args.audiocaps_csv),
                                   ("WavCaps", args.wavcaps_json), ("audiofolder data", args.train_dir)) if on]
        sources[1:1] = args.hub_dataset  # fmt: skip
        results = {"best_step": best and best["step"], "best": best and best["all"], "chance": chance, "sources": sources,
                   "train_seconds": time.perf_counter() - started, "steps": completed_steps,
                   "skipped_clips": len(skipped) + len(failures), "feature_cache_mib": cache_mib}  # fmt: skip
        with open(os.path.join(args.output_dir, "all_results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
        model_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        training = {"preset": args.preset, "sources": sources, "steps": completed_steps,
                    "learning_rate": args.learning_rate, "total_batch_size": args.total_batch_size}  # fmt: skip
        write_model_card(args.output_dir, model_id, (best or {}).get("all", {}), training, args.push_space)
        if args.push_to_hub:
            from huggingface_hub import HfApi

            repo_id = HfApi().create_repo(model_id, exist_ok=True).repo_id
            HfApi().upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="audio-qformer training",
                                  ignore_patterns=MODEL_UPLOAD_IGNORE)  # fmt: skip
            accelerator.print(f"Pushed to https://huggingface.co/{repo_id}")
        if args.push_space:
            space_dir = os.path.join(args.output_dir, "space")
            write_space_folder(space_dir, model_id, args.space_sounds, model=args.output_dir)
            accelerator.print(f"Space pushed to {push_space(space_dir, args.push_space)}")
        accelerator.print(f"Done: {completed_steps} steps in {results['train_seconds']:.0f} s; best {results['best_step']}")
    return 0


if __name__ == "__main__":
    main()
