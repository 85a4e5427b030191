# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Synthetic libraries of query vectors, for measuring the vector search at sizes no real library here has: clustered
like real Q-Former embeddings, or isotropic (an approximate index's worst case), and text-like queries."""

import numpy as np
import torch
import torch.nn.functional as F

from audio_qformer.vector_search import check_library


def _unit(vectors):
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _unit_normal(generator: torch.Generator, *shape) -> torch.Tensor:
    # torch's sampler is several times faster than numpy's, which matters for a 32-million-vector library.
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def _to_numpy(vectors: torch.Tensor, dtype) -> np.ndarray:
    # torch narrows to float16 several times faster than numpy's astype.
    return vectors.half().numpy() if np.dtype(dtype) == np.float16 else vectors.numpy().astype(dtype)


def clustered_embeddings(
    num_clips: int,
    num_query_tokens: int = 32,
    dim: int = 256,
    num_topics: int = 2000,
    topic_spread: float = 0.6,
    slot_weight: float = 0.5,
    token_noise: float = 0.5,
    seed: int = 0,
    out: np.ndarray | None = None,
    chunk_size: int = 8192,
) -> np.ndarray:
    """
    A synthetic library `(num_clips, num_query_tokens, dim)` shaped like real Q-Former embeddings, float16 by default.

    Real embeddings are clustered (clips of one kind of sound are alike) and a clip's query vectors are correlated;
    isotropic noise has neither, so every approximate index fails on it, which says nothing about real libraries.
    Here, with `u(x) = x / |x|` and random unit directions:

    - `num_topics` topic centres `t`, drawn with Zipf-like frequencies (`p ~ rank^-1/2`: some sounds are common);
    - one shared direction `s_j` per query slot (the learned query tokens give every clip's j-th vector a common part);
    - a clip `c = u(t + topic_spread * g)`, its vectors `x_j = u(c + slot_weight * s_j + token_noise * n_j)`.

    With the defaults, a clip's vectors have cosine ~0.67 with one another, ~0.66 with the same slot of a clip of the
    same topic, ~0.17 with the same slot of another topic and ~0 otherwise. Generated `chunk_size` clips at a time
    into `out` (e.g. a float16 `np.memmap`), so a library larger than RAM can be written; deterministic in `seed` and
    `chunk_size`.
    """
    generator = torch.Generator().manual_seed(seed)
    topics = _unit_normal(generator, num_topics, dim)
    slots = _unit_normal(generator, num_query_tokens, dim)
    frequency = 1.0 / torch.arange(1, num_topics + 1).double().sqrt()
    if out is None:
        out = np.empty((num_clips, num_query_tokens, dim), dtype=np.float16)
    for chunk, start in enumerate(range(0, num_clips, chunk_size)):
        size = min(start + chunk_size, num_clips) - start
        generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk + 1)
        topic = torch.multinomial(frequency, size, replacement=True, generator=generator)
        centre = F.normalize(topics[topic] + topic_spread * _unit_normal(generator, size, dim), dim=-1)
        noise = _unit_normal(generator, size, num_query_tokens, dim)
        vectors = F.normalize(centre[:, None, :] + slot_weight * slots[None] + token_noise * noise, dim=-1)
        out[start : start + size] = _to_numpy(vectors, out.dtype)
    return out


def isotropic_embeddings(num_clips: int, num_query_tokens: int = 32, dim: int = 256, seed: int = 0, out=None,
                         chunk_size: int = 8192) -> np.ndarray:  # fmt: skip
    """Uniformly random unit vectors `(num_clips, num_query_tokens, dim)`: the worst case for an approximate index."""
    if out is None:
        out = np.empty((num_clips, num_query_tokens, dim), dtype=np.float16)
    for chunk, start in enumerate(range(0, num_clips, chunk_size)):
        size = min(start + chunk_size, num_clips) - start
        generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk + 1)
        out[start : start + size] = _to_numpy(_unit_normal(generator, size, num_query_tokens, dim), out.dtype)
    return out


def noisy_queries(audio_embeds, num_queries: int, noise: float = 1.0, seed: int = 0):
    """
    Text-like queries `(num_queries, dim)` float32: one random query vector of a random clip plus `noise` times a
    random unit vector, normalised (cosine ~0.71 with its source vector at the default, as a caption only partly
    matches its clip). Returns `(queries, source clip indices)`.
    """
    num_clips, num_query_tokens, dim = check_library(audio_embeds)
    rng = np.random.default_rng(seed)
    clips = np.sort(rng.choice(num_clips, size=num_queries, replace=num_queries > num_clips))
    slots = rng.integers(0, num_query_tokens, size=num_queries)
    source = np.asarray(audio_embeds[clips], dtype=np.float32)[np.arange(num_queries), slots]
    queries = _unit(source + noise * _unit(rng.standard_normal((num_queries, dim), dtype=np.float32)))
    order = rng.permutation(num_queries)
    return queries[order].astype(np.float32), clips[order]


__all__ = ["clustered_embeddings", "isotropic_embeddings", "noisy_queries"]
