# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""The training's cache of BEATs tokens, computed once before training (as the report does) and read memory-mapped.

Stored in an `ArrayStore` folder named by `model_fingerprint`: it hashes BEATs' weights and config and the feature
extractor's settings, so another checkpoint never reads these tokens; a clip's key (`identity.clip_key`) hashes its
path, size and modification time (or its bytes), so an edited file is extracted again. Extraction writes each batch
before the next, so a killed run resumes where it stopped. `datasets.map` caching was not used because it restarts a
killed map from scratch.
"""

import json
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from audio_io import AudioLoadError, load_audio
from audio_qformer.identity import weights_fingerprint
from audio_qformer.store import ArrayStore


logger = logging.get_logger(__name__)


def model_fingerprint(beats_model, feature_extractor) -> str:
    """The token cache's identity: BEATs' config and weights and the feature extractor's settings."""
    return weights_fingerprint(beats_model, feature_extractor.to_json_string())


class FeatureCache(ArrayStore):
    """BEATs tokens of many clips (`extract` computes the missing ones), in a folder named by `model_fingerprint`."""

    @torch.no_grad()
    def extract(
        self,
        clips: list[dict],
        beats_model,
        feature_extractor,
        batch_size: int = 8,
        process_index: int = 0,
        num_processes: int = 1,
        max_seconds: float = 60.0,
        show_progress: bool = True,
    ) -> list[dict]:
        """
        Compute and store the tokens of the `clips` (dicts with `key`, `audio_path`, `audio_bytes`) not yet cached.

        With several processes, each takes every `num_processes`-th missing clip and writes its own shard; call
        `reload()` once all are done. Clips longer than `max_seconds` are cut there (BEATs' attention is quadratic in
        length; training crops to ~10 s anyway) and reported; no more than `max_seconds` + 1 s is decoded. Unreadable
        clips (and clips whose tokens would not be finite) are skipped, recorded, and returned as
        `{"key", "audio", "reason"}`; a failure is retried on the next run.
        """
        todo = [clip for clip in clips if clip["key"] not in self._entries]
        todo = list({clip["key"]: clip for clip in todo}.values())[process_index::num_processes]
        data_path, index_path = self._shard_paths(process_index)
        offset = self._open_for_writing(process_index)

        failures, truncated = [], []
        max_samples = int(max_seconds * feature_extractor.sampling_rate)
        device = next(beats_model.parameters()).device
        progress = tqdm(total=len(todo), desc="Extracting BEATs features", unit="clip", disable=not show_progress)
        with open(data_path, "ab") as data, open(index_path, "a") as index, open(
            os.path.join(self.directory, f"failures-{process_index}.jsonl"), "a"
        ) as failure_log:
            for start in range(0, len(todo), batch_size):
                batch, waveforms = [], []
                for clip in todo[start : start + batch_size]:
                    try:
                        # A second more than is kept is read, so a longer clip is seen as longer (and reported).
                        waveform = load_audio(
                            clip.get("audio_path") or None, clip.get("audio_bytes"), max_seconds=max_seconds + 1
                        )
                    except AudioLoadError as error:
                        failure = {"key": clip["key"], "audio": clip.get("audio_path") or "<bytes>", "reason": str(error)}
                        failures.append(failure)
                        failure_log.write(json.dumps(failure) + "\n")
                        continue
                    if waveform.shape[0] > max_samples:
                        truncated.append(clip.get("audio_path") or "<bytes>")
                        waveform = waveform[:max_samples]
                    batch.append(clip)
                    waveforms.append(waveform)
                if batch:
                    inputs = feature_extractor(waveforms, sampling_rate=feature_extractor.sampling_rate, return_tensors="pt")
                    outputs = beats_model(**inputs.to(device))
                    hidden = outputs.last_hidden_state.to(torch.float16).cpu().numpy()
                    lengths = outputs.audio_attention_mask.sum(-1).tolist()
                    lines = []
                    for clip, states, length in zip(batch, hidden, lengths):
                        if not np.isfinite(states[:length]).all():  # float16 overflow or a broken model: not stored
                            audio = clip.get("audio_path") or "<bytes>"
                            failure = {"key": clip["key"], "audio": audio, "reason": f"{audio}: non-finite tokens"}
                            failures.append(failure)
                            failure_log.write(json.dumps(failure) + "\n")
                            continue
                        data.write(np.ascontiguousarray(states[:length]).tobytes())
                        lines.append(json.dumps({"key": clip["key"], "offset": offset, "length": length}) + "\n")
                        offset += length
                    data.flush()
                    os.fsync(data.fileno())
                    index.writelines(lines)  # only after the tokens are on disk
                    index.flush()
                failure_log.flush()
                progress.update(len(todo[start : start + batch_size]))
        progress.close()
        if truncated:
            logger.warning(f"{len(truncated)} clip(s) longer than {max_seconds:.0f} s were cut: {truncated[:5]}")
        if failures:
            shown = "; ".join(f"{f['audio']} ({f['reason']})" for f in failures[:5])
            logger.warning(f"{len(failures)} clip(s) could not be read and were skipped: {shown}")
        self.reload()
        return failures


def build_cache(
    root: str, clips: list[dict], beats_model, feature_extractor, accelerator=None, batch_size: int = 8, **kwargs
) -> tuple[FeatureCache, list[dict], float]:
    """
    Extract (or reuse) the tokens of `clips` into the cache for this BEATs, sharing the work between the processes
    of `accelerator` if given. Returns the cache, the failures (all processes) and the seconds spent.
    """
    started = time.perf_counter()
    fingerprint = model_fingerprint(beats_model, feature_extractor)
    cache = FeatureCache(root, fingerprint, beats_model.config.hidden_size)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    kwargs.setdefault("show_progress", accelerator.is_local_main_process if accelerator else True)
    cache.extract(clips, beats_model, feature_extractor, batch_size, rank, world, **kwargs)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    cache.reload()
    failures = [
        {"key": clip["key"], "audio": clip.get("audio_path") or "<bytes>", "reason": cache.failure(clip["key"])}
        for clip in {clip["key"]: clip for clip in clips}.values()
        if clip["key"] not in cache
    ]
    return cache, failures, time.perf_counter() - started


__all__ = ["FeatureCache", "build_cache", "model_fingerprint"]
