# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Ranking metrics of text-to-audio retrieval (DCASE task 6B definitions) on similarity matrices and ranks, and the
order they assume: a stable sort by descending score, ties to the lower item index. The `evaluate` module in
`metrics/audio_retrieval` computes the same on ranked lists."""

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
    return metrics_from_ranks(target_ranks(similarity, targets), recall_at, map_at)


def chance_metrics(num_items: int, recall_at=(1, 5, 10), map_at: int = 10) -> dict:
    """The expected metrics of a random ranking of `num_items` items (one relevant per query)."""
    metrics = {f"R@{k}": min(k, num_items) / num_items for k in recall_at}
    metrics[f"mAP@{map_at}"] = sum(1.0 / r for r in range(1, min(map_at, num_items) + 1)) / num_items
    return metrics


def rank_items(similarity: torch.Tensor, top: int | None = None) -> torch.Tensor:
    """
    Item indices of each query, best first `(queries, top)`; among equal scores the lower index comes first (the
    tie-break of `target_ranks`).
    """
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    return order[:, :top] if top is not None else order


def ranks_in(rankings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based position of each query's target in its ranking; `rankings.shape[1] + 1` when it is not listed."""
    found = rankings == targets[:, None]
    positions = found.float().argmax(dim=1) + 1
    return torch.where(found.any(dim=1), positions, torch.full_like(positions, rankings.shape[1] + 1))


def metrics_from_ranks(ranks: torch.Tensor, recall_at=(1, 5, 10), map_at: int = 10) -> dict:
    """R@k and mAP@k (fractions) from 1-based ranks of each query's one relevant item (see `retrieval_metrics`)."""
    ranks = ranks.float()
    metrics = {f"R@{k}": (ranks <= k).float().mean().item() for k in recall_at}
    metrics[f"mAP@{map_at}"] = torch.where(ranks <= map_at, 1.0 / ranks, torch.zeros_like(ranks)).mean().item()
    return metrics


@torch.no_grad()
def audio_to_text_metrics(similarity: torch.Tensor, caption_clips: torch.Tensor, recall_at=(1, 5, 10)) -> dict:
    """
    Audio-to-text R@k: the share of clips with one of their own captions among their k best-scored captions.
    `similarity` is `(clips, captions)`, `caption_clips` the clip index of each caption; ties go to the lower index.
    """
    best_rank = torch.full((similarity.shape[0],), similarity.shape[1] + 1, dtype=torch.long)
    rankings = rank_items(similarity)
    for clip in range(similarity.shape[0]):
        own = (caption_clips[rankings[clip]] == clip).nonzero()
        if len(own):
            best_rank[clip] = own[0, 0] + 1
    return {f"R@{k}": (best_rank <= k).float().mean().item() for k in recall_at}


__all__ = [
    "audio_to_text_metrics",
    "chance_metrics",
    "metrics_from_ranks",
    "rank_items",
    "ranks_in",
    "retrieval_metrics",
    "target_ranks",
]
