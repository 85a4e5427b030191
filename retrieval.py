# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Text-to-audio retrieval: ranking metrics (DCASE task 6B definitions) and batched embedding of clips and texts."""

import numpy as np
import torch


def target_ranks(similarity: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """
    1-based rank of each query's relevant item. `similarity` is `(queries, items)`, `targets` `(queries,)` item
    indices. Ties are broken deterministically: among equal scores the lower item index ranks first.
    """
    if similarity.dim() != 2 or targets.shape != (similarity.shape[0],):
        raise ValueError(
            f"Expected similarity (queries, items) and targets (queries,); got {tuple(similarity.shape)} and "
            f"{tuple(targets.shape)}."
        )
    target_scores = similarity.gather(1, targets[:, None])
    items = torch.arange(similarity.shape[1], device=similarity.device)[None, :]
    ahead = (similarity > target_scores) | ((similarity == target_scores) & (items < targets[:, None]))
    return ahead.sum(dim=1) + 1


def retrieval_metrics(similarity: torch.Tensor, targets: torch.Tensor, recall_at=(1, 5, 10), map_at: int = 10) -> dict:
    """
    R@k and mAP@k of a ranking, as the DCASE language-based audio retrieval baseline defines them: every query has
    one relevant item; R@k is the share of queries whose item ranks in the top k; AP@k of a query is `1 / rank` when
    the item is in the top k, else 0; mAP@k is their mean. Values are fractions in [0, 1].
    """
    ranks = target_ranks(similarity, targets).float()
    metrics = {f"R@{k}": (ranks <= k).float().mean().item() for k in recall_at}
    metrics[f"mAP@{map_at}"] = torch.where(ranks <= map_at, 1.0 / ranks, torch.zeros_like(ranks)).mean().item()
    return metrics


def chance_metrics(num_items: int, recall_at=(1, 5, 10), map_at: int = 10) -> dict:
    """The expected metrics of a random ranking of `num_items` items (one relevant per query)."""
    metrics = {f"R@{k}": min(k, num_items) / num_items for k in recall_at}
    metrics[f"mAP@{map_at}"] = sum(1.0 / r for r in range(1, min(map_at, num_items) + 1)) / num_items
    return metrics


def group_by_clip(audio_ids: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct clips (in first-seen order) and, for each caption, the index of its clip."""
    clips: dict[str, int] = {}
    targets = [clips.setdefault(audio_id, len(clips)) for audio_id in audio_ids]
    return list(clips), torch.tensor(targets, dtype=torch.long)


@torch.no_grad()
def embed_texts(model, tokenizer, captions: list[str], batch_size: int = 256, max_length: int | None = None):
    """Normalised text embeddings `(len(captions), embed_dim)`."""
    max_length = max_length or model.config.eval_max_text_length
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(
            captions[start : start + batch_size], padding="longest", truncation=True, max_length=max_length,
            return_tensors="pt", return_token_type_ids=False,
        ).to(device)  # fmt: skip
        outputs.append(model.get_text_features(**tokens).text_embeds.float().cpu())
    return torch.cat(outputs)


@torch.no_grad()
def embed_cached_audio(model, arrays: list[np.ndarray], batch_size: int = 32):
    """Normalised audio embeddings `(clips, queries, embed_dim)` from BEATs tokens (e.g. a feature cache's arrays)."""
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(arrays), batch_size):
        chunk = arrays[start : start + batch_size]
        longest = max(a.shape[0] for a in chunk)
        states = torch.zeros(len(chunk), longest, chunk[0].shape[1])
        mask = torch.zeros(len(chunk), longest, dtype=torch.long)
        for i, array in enumerate(chunk):
            states[i, : array.shape[0]] = torch.from_numpy(np.asarray(array, dtype=np.float32))
            mask[i, : array.shape[0]] = 1
        audio = model.get_audio_features(audio_hidden_states=states.to(device), audio_attention_mask=mask.to(device))
        outputs.append(audio.audio_embeds.float().cpu())
    return torch.cat(outputs)
