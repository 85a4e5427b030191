# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""The search core of the retrieval engine: top-k clips for text (or audio) embeddings under the paper's score.

A clip is `(num_query_tokens, dim)` normalised vectors (32 x 256 for the released model) and its score for a text
embedding is the cosine of its best query vector (`max_over_queries`); an audio query of several vectors scores the
best pair. Two searches share one return contract, `(scores (Q, k), indices (Q, k))` sorted best first with ties
broken by the lower clip index:

- `exact_search` scans every clip in chunks (matmul plus a running top-k), from a torch tensor or a numpy array /
  `np.memmap` in float16 or float32, so a library far larger than RAM is read once per call and never held in fp32.
- `ApproximateAudioIndex` is for libraries where a scan per query is too slow: a FAISS inverted file over all the
  query vectors of all clips (product-quantised, so a clip costs ~2.3 kB of RAM instead of 16 kB) proposes candidate
  clips, which are then re-scored exactly from the stored embeddings (a float16 memmap on disk, read only for the
  candidates). Its scores are therefore the exact scores of the clips it returns; only missing a true top-k clip is
  approximate. FAISS is optional: it is imported when an index is created or loaded.

`clustered_embeddings` and `noisy_queries` generate the synthetic libraries the tests and
`benchmarks/search_speed.py` use; why they are clustered is explained there.
"""

import json
import math
import os

import numpy as np
import torch
from transformers.utils import logging

from modeling_audio_qformer import max_over_queries


logger = logging.get_logger(__name__)

# The largest score block (query vectors x clip vectors) one matmul produces, in float32 elements (256 MiB).
_MAX_BLOCK_ELEMENTS = 64 * 1024 * 1024


# --- inputs ----------------------------------------------------------------------------------------------------------


def as_query_vectors(query_embeds) -> torch.Tensor:
    """
    Queries as float32 `(Q, P, D)`: a text batch `(Q, D)` becomes one vector per query (`P = 1`), an audio batch
    `(Q, P, D)` is kept as is. Accepts torch tensors and numpy arrays.
    """
    queries = query_embeds if isinstance(query_embeds, torch.Tensor) else torch.tensor(np.asarray(query_embeds))
    if queries.dim() == 2:
        queries = queries[:, None, :]
    if queries.dim() != 3:
        raise ValueError(
            f"Expected query embeddings (queries, dim) or (queries, vectors, dim); got {tuple(queries.shape)}."
        )
    return queries.float()


def check_library(audio_embeds) -> tuple[int, int, int]:
    """`(clips, vectors per clip, dim)` of a library `(N, P, D)`, which must be float16 or float32."""
    if len(audio_embeds.shape) != 3:
        raise ValueError(f"Expected audio embeddings (clips, query_tokens, dim); got {tuple(audio_embeds.shape)}.")
    dtype = str(audio_embeds.dtype).replace("torch.", "")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"Audio embeddings must be float16 or float32; got {dtype}.")
    return tuple(int(n) for n in audio_embeds.shape)


class ChunkReader:
    """
    Reads clips `start:end` of a library into one reused float32 buffer. Allocating a fresh 8 MiB tensor per chunk
    costs more than the widening itself (page faults): measured 1.5 ms against 0.24 ms for 256 clips of 32 x 256.
    A numpy source is staged through a reused buffer of its own dtype, since a memmap slice is read-only and
    `torch.from_numpy` warns about read-only arrays.
    """

    def __init__(self, audio_embeds, batch_size: int, device=None):
        self.audio_embeds = audio_embeds
        shape = (batch_size, *audio_embeds.shape[1:])
        self.buffer = torch.empty(shape, dtype=torch.float32, device=device)
        self.stage = None if isinstance(audio_embeds, torch.Tensor) else np.empty(shape, dtype=audio_embeds.dtype)

    def __call__(self, start: int, end: int) -> torch.Tensor:
        size = end - start
        if self.stage is None:
            return self.buffer[:size].copy_(self.audio_embeds[start:end])
        np.copyto(self.stage[:size], self.audio_embeds[start:end])
        return self.buffer[:size].copy_(torch.from_numpy(self.stage[:size]))


def gather_clips(audio_embeds, indices: np.ndarray) -> torch.Tensor:
    """Clips at sorted, distinct `indices` as float32; on a memmap only their rows are read."""
    if isinstance(audio_embeds, torch.Tensor):
        return audio_embeds[torch.from_numpy(indices).to(audio_embeds.device)].float()
    return torch.from_numpy(np.asarray(audio_embeds[indices])).float()


# --- scoring ---------------------------------------------------------------------------------------------------------

# Unit roundoff of float32: a float32 dot product of length D is within D * U * |q| * |x| of the exact value.
_FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def exact_scores(queries: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
    """
    The scores both searches return, `(Q, C)` float32: the model's score (`max_over_queries`, every pair of a query
    vector and a clip vector) accumulated in float64 (the products
    of float32 inputs are exact there) and rounded to float32. An fp32 matmul's result depends on its shapes
    (MKL picks kernels by size), so without this a clip's score would change in the last bit with the chunk or the
    candidate set it is scored in, and equal scores would not reliably tie.
    """
    return max_over_queries(clips.double(), queries.double()).T.float()


def merge_top_k(best_scores, best_indices, scores, indices, k: int):
    """
    The best `k` of a running top-k and a new block, ties to the lower clip index. Relies on the pool being ordered
    by clip index among equal scores (the running top-k is, and precedes a block of later clips in index order),
    which a stable sort preserves.
    """
    pool_scores = torch.cat([best_scores, scores], dim=1)
    pool_indices = torch.cat([best_indices, indices], dim=1)
    order = torch.sort(pool_scores, dim=1, descending=True, stable=True).indices[:, :k]
    return pool_scores.gather(1, order), pool_indices.gather(1, order)


def sort_candidates(scores: torch.Tensor, indices: torch.Tensor, k: int):
    """The best `k` of candidate clips `(n,)` scored exactly, best first, ties to the lower clip index."""
    order = torch.from_numpy(np.lexsort((indices.numpy(), -scores.numpy()))[:k])
    return scores[order], indices[order]


def scan_top_k(queries: torch.Tensor, audio_embeds, k: int, batch_size: int):
    """
    One pass over the library in float32: each query's `k` best clips `(Q, k)` by `max_over_queries`, and the
    largest clip vector norm seen (for the rounding bound). Queries are split so that one score block stays under
    `_MAX_BLOCK_ELEMENTS`.
    """
    num_clips = check_library(audio_embeds)[0]
    num_queries = queries.shape[0]
    best_scores = torch.empty(num_queries, 0, device=queries.device)
    best_indices = torch.empty(num_queries, 0, dtype=torch.long, device=queries.device)
    max_norm = torch.zeros((), device=queries.device)
    read = ChunkReader(audio_embeds, min(batch_size, num_clips), queries.device)
    for start in range(0, num_clips, batch_size):
        clips = read(start, min(start + batch_size, num_clips))
        max_norm = torch.maximum(max_norm, torch.linalg.vector_norm(clips, dim=-1).amax())
        query_block = max(1, _MAX_BLOCK_ELEMENTS // (queries.shape[1] * clips.shape[0] * clips.shape[1]))
        scores = torch.cat(
            [max_over_queries(clips, queries[q : q + query_block]).T for q in range(0, num_queries, query_block)]
        )
        indices = torch.arange(start, start + clips.shape[0], device=queries.device).expand(num_queries, -1)
        best_scores, best_indices = merge_top_k(best_scores, best_indices, scores, indices, k)
    return best_scores, best_indices, max_norm.item()


def rescore(queries: torch.Tensor, audio_embeds, candidates: torch.Tensor, k: int):
    """
    Exact scores of each query's candidate clips `(Q, n)` (distinct within a row) and the best `k` of them, sorted
    best first with ties to the lower index. Every candidate row is read from the library once.
    """
    rows = candidates.cpu()
    needed = np.unique(rows.numpy())
    clips = gather_clips(audio_embeds, needed).to(queries.device)
    positions = torch.from_numpy(np.searchsorted(needed, rows.numpy())).to(queries.device)
    scores, indices = [], []
    for q in range(queries.shape[0]):
        row_scores = exact_scores(queries[q : q + 1], clips[positions[q]])[0].cpu()
        best_scores, best_indices = sort_candidates(row_scores, rows[q], k)
        scores.append(best_scores)
        indices.append(best_indices)
    return torch.stack(scores), torch.stack(indices)


@torch.no_grad()
def exact_search(query_embeds, audio_embeds, k: int, batch_size: int = 256):
    """
    The `k` best clips for each query by brute force, with the paper's score.

    A float32 pass over every clip keeps each query's `2k + 16` best, which are then scored by `exact_scores`
    (float64 accumulation) and sorted. The float32 error is bounded (`D * 2^-24 * |q| * max|x|`); when the
    `(2k + 16)`-th float32 score comes within that bound of the k-th exact score, the pass is repeated for that
    query with four times as many candidates, so the result is the exact top-k, not an fp32 approximation of it.

    Args:
        query_embeds: text embeddings `(Q, D)`, or audio embeddings `(Q, P, D)` (audio-to-audio: a clip scores the
            best pair of a query vector and a clip vector). Tensor or array; read as float32.
        audio_embeds: the library `(N, P, D)`, a torch tensor or a numpy array / `np.memmap`, float16 or float32.
            It is read `batch_size` clips at a time and widened to float32 one chunk at a time, so a float16 memmap
            larger than RAM works (streamed through the page cache once per call).
        k: clips per query; clamped to `N`.
        batch_size: clips per chunk. Small chunks (256 clips of 32 x 256 are 8 MiB in float32) stay in the CPU
            cache between widening and matmul, which measured 5.6x faster than 2048-clip chunks.

    Returns:
        `(scores, indices)`, float32 and int64 `(Q, min(k, N))`, best first, ties to the lower clip index (as
        `ranking_metrics.target_ranks` ranks them): sorting `max_over_queries(audio.double(), text.double()).float().T`
        with a stable descending sort gives the same scores and indices.
    """
    num_clips, _, dim = check_library(audio_embeds)
    device = audio_embeds.device if isinstance(audio_embeds, torch.Tensor) else torch.device("cpu")
    queries = as_query_vectors(query_embeds).to(device)
    if queries.shape[2] != dim:
        raise ValueError(f"Query dim {queries.shape[2]} does not match the library's dim {dim}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    k = min(int(k), num_clips)
    return _exact_top_k(queries, audio_embeds, k, min(num_clips, 2 * k + 16), batch_size)


def _exact_top_k(queries, audio_embeds, k: int, keep: int, batch_size: int):
    num_clips, _, dim = check_library(audio_embeds)
    if k == 0:
        return torch.empty(queries.shape[0], 0), torch.empty(queries.shape[0], 0, dtype=torch.long)
    approximate, candidates, max_norm = scan_top_k(queries, audio_embeds, keep, batch_size)
    scores, indices = rescore(queries, audio_embeds, candidates, k)
    if keep == num_clips:
        return scores, indices
    # A clip left out has a float32 score <= the last kept one, so an exact score <= that plus the rounding bound.
    bound = (dim + 2) * _FLOAT32_UNIT_ROUNDOFF * max_norm * torch.linalg.vector_norm(queries, dim=-1).amax(dim=1)
    unsure = (approximate[:, -1].cpu() + bound.cpu() >= scores[:, -1]).nonzero()[:, 0]
    if len(unsure):
        retry = _exact_top_k(queries[unsure.to(queries.device)], audio_embeds, k, min(num_clips, 4 * keep), batch_size)
        scores[unsure], indices[unsure] = retry
    return scores, indices


# --- approximate index -----------------------------------------------------------------------------------------------


def import_faiss():
    """FAISS, or an ImportError that says how to install it (it is an optional dependency)."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "ApproximateAudioIndex needs FAISS, an optional dependency: `pip install faiss-cpu`. "
            "exact_search works without it."
        ) from error
    return faiss


class ClipStore:
    """
    The exact embeddings of an index's clips, as the blocks `add` received (arrays or float16 memmaps), read as one
    `(N, P, D)` array: `shape`, `dtype`, slices and sorted index arrays, which is all `exact_search` and the
    re-scoring need. Blocks are never concatenated, so a library of memmaps stays on disk.
    """

    def __init__(self, blocks=()):
        self.blocks, self.offsets = [], [0]
        for block in blocks:
            self.append(block)

    def append(self, block: np.ndarray):
        if self.blocks and (block.shape[1:] != self.blocks[0].shape[1:] or block.dtype != self.blocks[0].dtype):
            raise ValueError(
                f"Block {block.shape} {block.dtype} does not match the store's {self.blocks[0].shape[1:]} "
                f"{self.blocks[0].dtype}."
            )
        self.blocks.append(block)
        self.offsets.append(self.offsets[-1] + block.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        if not self.blocks:
            return (0, 0, 0)
        return (self.offsets[-1], *self.blocks[0].shape[1:])

    @property
    def dtype(self):
        return self.blocks[0].dtype if self.blocks else np.dtype(np.float16)

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key) -> np.ndarray:
        """Clips at a slice (step 1) or at a sorted integer array, in the store's dtype."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("ClipStore slices must have step 1.")
            key = np.arange(start, stop)
            parts = [
                block[max(start, lo) - lo : min(stop, hi) - lo]
                for block, lo, hi in zip(self.blocks, self.offsets, self.offsets[1:])
                if start < hi and stop > lo
            ]
        else:
            key = np.asarray(key, dtype=np.int64)
            edges = np.searchsorted(key, self.offsets)
            parts = [
                block[key[edges[b] : edges[b + 1]] - self.offsets[b]]
                for b, block in enumerate(self.blocks)
                if edges[b + 1] > edges[b]
            ]
        if not parts:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        return np.asarray(parts[0]) if len(parts) == 1 else np.concatenate(parts)


def candidate_clips(approximate_scores: np.ndarray, token_ids: np.ndarray, tokens_per_clip: int, limit: int):
    """
    The clips behind a query's token hits, best approximate score first, at most `limit` of them, returned sorted by
    clip index (so a memmap is read forward). A clip's approximate score is that of its best hit; FAISS pads missing
    hits with id -1.
    """
    valid = token_ids >= 0
    scores, clips = approximate_scores[valid], token_ids[valid] // tokens_per_clip
    order = np.argsort(-scores, kind="stable")
    distinct, first_hit = np.unique(clips[order], return_index=True)
    return np.sort(distinct[np.argsort(first_hit, kind="stable")[:limit]])


class ApproximateAudioIndex:
    """
    Approximate top-k search over a large library, with exact scores for what it returns.

    Candidate generation: every query vector of every clip (`N * 32` vectors) goes into a FAISS inverted-file index
    with product quantisation (`index_factory`, inner product), token `t` being query vector `t % P` of clip
    `t // P`. A search fetches each query vector's `token_candidates` nearest tokens in `nprobe` lists, groups them by
    clip (a clip's approximate score is its best hit), keeps the `rescore_clips` best clips and re-scores them exactly
    from the stored embeddings (`ClipStore`: the arrays given to `add`, or float16 memmaps after `load`). The scores
    returned are exact; a true top-k clip can only be missed. A query left with fewer than `k` candidates is answered
    by `exact_search`.

    Why this design (measurements in `benchmarks/RESULTS.md`, "Search"): a graph index (HNSW) keeps its links and
    vectors in RAM, over 12 kB per clip of 32 vectors even with 8-bit vectors, and builds slowly; an inverted file with
    4-bit PQ costs 64 + 8 (id) bytes per vector, 2.3 kB per clip, so a million clips fit in 2.3 GB, and its "fast
    scan" kernels read a list of codes in a few ms. PQ distorts scores by more than the gaps between neighbouring
    clips, so the ranking comes from exact re-scoring: `rescore_clips` is the setting that buys recall, and with 32
    bytes per vector (8-bit PQ32) it took 8x as many re-scored clips (1024 against 128) for recall@10 0.99 at 10k clips.

    Example:

    ```python
    >>> index = ApproximateAudioIndex.build(audio_embeds)  # (N, 32, 256), e.g. a float16 np.memmap
    >>> scores, indices = index.search(text_embeds, k=10)  # (Q, 10) each, best first
    >>> index.save("library_index")
    >>> index = ApproximateAudioIndex.load("library_index")  # embeddings memory-mapped
    ```
    """

    format_version = 1

    def __init__(
        self,
        faiss_index,
        num_query_tokens: int,
        store: ClipStore | None = None,
        nprobe: int = 32,
        token_candidates: int = 1024,
        rescore_clips: int = 512,
        metadata: dict | None = None,
    ):
        self.faiss_index = faiss_index
        self.num_query_tokens = num_query_tokens
        self.store = store if store is not None else ClipStore()
        self.nprobe, self.token_candidates, self.rescore_clips = nprobe, token_candidates, rescore_clips
        self.metadata = dict(metadata or {})
        if self.faiss_index.ntotal != len(self.store) * num_query_tokens:
            raise ValueError(
                f"The FAISS index holds {self.faiss_index.ntotal} vectors but the store {len(self.store)} clips of "
                f"{num_query_tokens}."
            )

    # --- building --------------------------------------------------------------------------------------------------

    @staticmethod
    def default_nlist(num_vectors: int, num_training_vectors: int | None = None) -> int:
        """
        Inverted lists for `num_vectors`: the power of two nearest to `sqrt(n)` (4096 for a million clips of 32),
        the low end of FAISS' `sqrt(n)..16 sqrt(n)` range because adding a vector costs one distance per list (the
        dominant build cost), with at least 39 training vectors per list.
        """
        nlist = 2 ** round(math.log2(max(1.0, math.sqrt(num_vectors))))
        return int(max(1, min(nlist, (num_training_vectors or num_vectors) // 39)))

    @classmethod
    def create(
        cls,
        dim: int,
        num_query_tokens: int,
        nlist: int,
        index_factory: str = "IVF{nlist},PQ{fs}x4fs",
        **search_defaults,
    ) -> "ApproximateAudioIndex":
        """
        An empty, untrained index. `index_factory` is a FAISS factory string (inner product) in which `{nlist}` is
        `nlist`, and both `{fs}` (`dim // 2` four-bit codes, for `PQ{fs}x4fs`) and `{pq}` (`dim // 4` one-byte codes,
        for `PQ{pq}`) make 64-byte codes. The default, `IVF{nlist},PQ{fs}x4fs`, is scanned with FAISS' SIMD "fast
        scan" kernels; `PQ{pq}` was as accurate and slower to scan; `IVF{nlist},Flat` keeps exact vectors.
        """
        faiss = import_faiss()
        description = index_factory.format(nlist=nlist, fs=dim // 2, pq=dim // 4)
        faiss_index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(faiss_index))
        if hasattr(ivf, "do_polysemous_training"):
            # The factory turns on polysemous training (a code ordering for Hamming pre-filtering, which this search
            # does not use); it was 90% of the training time.
            ivf.do_polysemous_training = False
        index = cls(faiss_index, num_query_tokens, **search_defaults)
        index.metadata["index_factory"] = description
        return index

    def train(self, audio_embeds, max_clips: int = 8192, seed: int = 0) -> "ApproximateAudioIndex":
        """Train the coarse quantiser and the PQ codebooks on the vectors of at most `max_clips` random clips."""
        num_clips, num_query_tokens, dim = check_library(audio_embeds)
        if num_query_tokens != self.num_query_tokens:
            raise ValueError(f"Expected {self.num_query_tokens} vectors per clip, got {num_query_tokens}.")
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(num_clips, size=min(max_clips, num_clips), replace=False))
        vectors = np.asarray(audio_embeds[sample] if not isinstance(audio_embeds, torch.Tensor) else
                             audio_embeds[torch.from_numpy(sample)].numpy(), dtype=np.float32)  # fmt: skip
        self.faiss_index.train(np.ascontiguousarray(vectors.reshape(-1, dim)))
        return self

    def add(self, audio_embeds, batch_size: int = 4096) -> "ApproximateAudioIndex":
        """
        Append clips `(n, P, D)`: their vectors go to the FAISS index (clip ids continue from `len(self)`), the
        embeddings to the store. A numpy memmap is kept by reference (its file must stay); other inputs are copied.
        """
        num_clips, num_query_tokens, dim = check_library(audio_embeds)
        if num_query_tokens != self.num_query_tokens:
            raise ValueError(f"Expected {self.num_query_tokens} vectors per clip, got {num_query_tokens}.")
        if not self.faiss_index.is_trained:
            raise RuntimeError("Train the index (`train`, or use `ApproximateAudioIndex.build`) before `add`.")
        if isinstance(audio_embeds, torch.Tensor):
            block = audio_embeds.detach().cpu().numpy().copy()
        elif isinstance(audio_embeds, np.memmap):
            block = audio_embeds
        else:
            block = np.array(audio_embeds)
        if len(self.store) and block.dtype != self.store.dtype:
            block = block.astype(self.store.dtype)
        for start in range(0, num_clips, batch_size):
            vectors = np.asarray(block[start : start + batch_size], dtype=np.float32).reshape(-1, dim)
            self.faiss_index.add(np.ascontiguousarray(vectors))
        self.store.append(block)
        return self

    @classmethod
    def build(
        cls,
        audio_embeds,
        nlist: int | None = None,
        index_factory: str = "IVF{nlist},PQ{fs}x4fs",
        max_train_clips: int = 8192,
        seed: int = 0,
        **search_defaults,
    ) -> "ApproximateAudioIndex":
        """Create, train (on a sample) and fill an index from a library `(N, P, D)` in one call."""
        num_clips, num_query_tokens, dim = check_library(audio_embeds)
        train_vectors = min(max_train_clips, num_clips) * num_query_tokens
        nlist = nlist or cls.default_nlist(num_clips * num_query_tokens, train_vectors)
        index = cls.create(dim, num_query_tokens, nlist, index_factory, **search_defaults)
        return index.train(audio_embeds, max_train_clips, seed).add(audio_embeds)

    # --- searching -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.store)

    @torch.no_grad()
    def search(self, query_embeds, k: int, nprobe=None, token_candidates=None, rescore_clips=None):
        """
        The `k` best clips for each query, as `exact_search` returns them: `(scores, indices)` float32 / int64
        `(Q, min(k, N))`, best first, ties to the lower clip index, every score exact. `query_embeds` is `(Q, D)`
        text or `(Q, P, D)` audio. The other arguments override the index's search settings for this call.
        """
        faiss = import_faiss()
        queries = as_query_vectors(query_embeds)
        num_queries, query_vectors, dim = queries.shape
        k = min(int(k), len(self))
        nprobe = nprobe or self.nprobe
        token_candidates = min(token_candidates or self.token_candidates, self.faiss_index.ntotal)
        rescore_clips = max(rescore_clips or self.rescore_clips, k)
        scores = torch.empty(num_queries, k)
        indices = torch.empty(num_queries, k, dtype=torch.long)
        if k == 0:
            return scores, indices
        flat = np.ascontiguousarray(queries.reshape(-1, dim).numpy())
        approximate, token_ids = self.faiss_index.search(
            flat, token_candidates, params=faiss.SearchParametersIVF(nprobe=nprobe)
        )
        approximate = approximate.reshape(num_queries, -1)
        token_ids = token_ids.reshape(num_queries, -1)
        for q in range(num_queries):
            clips = candidate_clips(approximate[q], token_ids[q], self.num_query_tokens, rescore_clips)
            if clips.size < k:
                scores[q], indices[q] = (row[0] for row in exact_search(queries[q : q + 1], self.store, k))
                continue
            # The candidates are a small library in clip order, so exact search over them keeps the tie rule.
            best_scores, positions = exact_search(queries[q : q + 1], self.store[clips], k)
            scores[q], indices[q] = best_scores[0], torch.from_numpy(clips)[positions[0]]
        return scores, indices

    # --- memory, saving, loading -----------------------------------------------------------------------------------

    def index_nbytes(self) -> int:
        """
        RAM the FAISS index holds: per vector its code and its 8-byte id, plus the coarse centroids (the PQ tables
        and list overhead are a few MB more). The embeddings are not counted: they stay on disk (`store_nbytes`).
        """
        faiss = import_faiss()
        ivf = faiss.extract_index_ivf(self.faiss_index)
        return int(self.faiss_index.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4)

    def store_nbytes(self) -> int:
        """Bytes of the stored embeddings (on disk once saved; read through the page cache for re-scoring)."""
        num_clips, num_query_tokens, dim = self.store.shape
        return num_clips * num_query_tokens * dim * self.store.dtype.itemsize

    def save(self, directory: str, copy_embeddings: bool = True):
        """
        Write `index.faiss` (FAISS' own format), one `embeddings-NNNNN.npy` per stored block and `config.json` (the
        search settings and `metadata`), last, so a directory with a config is complete. No pickle anywhere.

        A block that is a memmap of a whole `.npy` file is not copied when it already is the file it would be written
        to (a loaded index saved in place), nor with `copy_embeddings=False`: the config then records the file's
        absolute path, which must stay, and saving a million-clip library costs no 16 GB copy.
        """
        faiss = import_faiss()
        os.makedirs(directory, exist_ok=True)
        blocks = []
        for number, block in enumerate(self.store.blocks):
            name = f"embeddings-{number:05d}.npy"
            path, source = os.path.join(directory, name), _whole_npy_file(block)
            if source is not None and os.path.exists(path) and os.path.samefile(source, path):
                pass  # already there
            elif source is not None and not copy_embeddings:
                name = os.path.abspath(source)
            else:
                _write_npy(path, block)
            blocks.append({"file": name, "clips": int(block.shape[0])})
        faiss.write_index(self.faiss_index, os.path.join(directory, "index.faiss.tmp"))
        os.replace(os.path.join(directory, "index.faiss.tmp"), os.path.join(directory, "index.faiss"))
        config = {
            "format_version": self.format_version,
            "num_query_tokens": self.num_query_tokens,
            "dim": int(self.faiss_index.d),
            "dtype": str(self.store.dtype),
            "blocks": blocks,
            "search": {
                "nprobe": self.nprobe,
                "token_candidates": self.token_candidates,
                "rescore_clips": self.rescore_clips,
            },
            "metadata": self.metadata,
        }
        with open(os.path.join(directory, "config.json.tmp"), "w") as file:
            json.dump(config, file, indent=2)
        os.replace(os.path.join(directory, "config.json.tmp"), os.path.join(directory, "config.json"))

    @classmethod
    def load(cls, directory: str) -> "ApproximateAudioIndex":
        """Read an index saved by `save`: the FAISS index into RAM, the embeddings as read-only memmaps."""
        faiss = import_faiss()
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"No index in {directory!r}: {config_path!r} is missing.")
        with open(config_path) as file:
            config = json.load(file)
        if config.get("format_version") != cls.format_version:
            raise ValueError(
                f"{config_path!r} has format_version {config.get('format_version')}; this code reads "
                f"{cls.format_version}."
            )
        blocks = []
        for entry in config["blocks"]:
            block = np.load(os.path.join(directory, entry["file"]), mmap_mode="r", allow_pickle=False)
            expected = (entry["clips"], config["num_query_tokens"], config["dim"])
            if block.shape != expected or str(block.dtype) != config["dtype"]:
                raise ValueError(
                    f"{entry['file']} holds {block.shape} {block.dtype}, the config says {expected} {config['dtype']}."
                )
            blocks.append(block)
        faiss_index = faiss.read_index(os.path.join(directory, "index.faiss"))
        return cls(
            faiss_index, config["num_query_tokens"], ClipStore(blocks), metadata=config["metadata"], **config["search"]
        )


def _whole_npy_file(block) -> str | None:
    """The `.npy` file a memmap maps in full (as `np.load(..., mmap_mode="r")` returns it), else None."""
    filename = getattr(block, "filename", None)
    if not isinstance(block, np.memmap) or not filename or not block.flags.c_contiguous:
        return None
    try:
        with open(filename, "rb") as file:
            version = np.lib.format.read_magic(file)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = header(file)
            header_end = file.tell()
    except (OSError, ValueError):
        return None
    whole = block.offset == header_end and block.shape == shape and block.dtype == dtype and not fortran_order
    return filename if whole else None


def _write_npy(path: str, block, chunk_size: int = 8192):
    """Write `block` as a `.npy` file chunk by chunk (a memmap larger than RAM is copied without loading it)."""
    out = np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=block.dtype, shape=block.shape)
    for start in range(0, block.shape[0], chunk_size):
        out[start : start + chunk_size] = block[start : start + chunk_size]
    out.flush()
    del out
    os.replace(path + ".tmp", path)


__all__ = [
    "ApproximateAudioIndex",
    "ClipStore",
    "candidate_clips",
    "exact_scores",
    "exact_search",
    "import_faiss",
]
