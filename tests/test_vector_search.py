import sys

import numpy as np
import pytest
import torch

from modeling_audio_qformer import max_over_queries
from audio_qformer.synthetic_embeddings import clustered_embeddings, noisy_queries
from audio_qformer.vector_search import ApproximateAudioIndex, ClipStore, exact_scores, exact_search, import_faiss


def brute_force(queries, audio, k):
    """`max_over_queries` in float64, rounded to float32, then a stable descending sort (ties to the lower index)."""
    audio = torch.from_numpy(np.asarray(audio, dtype=np.float64)) if not isinstance(audio, torch.Tensor) else audio
    queries = torch.as_tensor(queries).double()
    if queries.dim() == 2:
        similarity = max_over_queries(audio.double(), queries).T
    else:  # audio queries: the best pair of a query vector and a clip vector
        similarity = torch.einsum("qpd,ncd->qnpc", queries, audio.double()).amax(dim=(2, 3))
    scores, indices = torch.sort(similarity.float(), dim=1, descending=True, stable=True)
    return scores[:, :k], indices[:, :k]


def small_library(num_clips=600, num_query_tokens=8, dim=32, seed=0):
    return clustered_embeddings(num_clips, num_query_tokens, dim, num_topics=20, seed=seed)


def recall_at_k(found, exact):
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found.tolist(), exact.tolist())]))


# --- exact search ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 7, 50])
def test_exact_search_equals_brute_force_on_float32_tensor(k):
    audio = torch.from_numpy(small_library().astype(np.float32))
    queries = torch.from_numpy(noisy_queries(audio.numpy(), 20, seed=1)[0])
    scores, indices = exact_search(queries, audio, k, batch_size=64)
    expected_scores, expected_indices = brute_force(queries, audio, k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices, expected_indices)
    assert torch.equal(scores, expected_scores)
    # The model's float32 similarity differs from these scores only by its own rounding.
    model_scores = max_over_queries(audio, queries).T.gather(1, indices)
    torch.testing.assert_close(scores, model_scores, atol=1e-6, rtol=0)


def test_exact_search_equals_brute_force_on_float16_memmap(tmp_path):
    path = str(tmp_path / "library.npy")
    library = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(1000, 8, 32))
    clustered_embeddings(1000, 8, 32, num_topics=20, out=library, chunk_size=300)  # generated into the memmap
    library.flush()
    library = np.load(path, mmap_mode="r")
    queries = noisy_queries(library, 16, seed=2)[0]
    scores, indices = exact_search(queries, library, 10, batch_size=37)  # chunks that do not divide the library
    expected_scores, expected_indices = brute_force(queries, library, 10)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(scores, expected_scores)


def test_exact_search_breaks_ties_by_lower_clip_index():
    # Integer-valued embeddings: every dot product is exact in float32, and 40 copies of each clip tie exactly,
    # more than the 2k + 16 candidates kept by the float32 pass, so the pass is repeated with more.
    rng = np.random.default_rng(0)
    distinct = rng.integers(-3, 4, size=(5, 4, 16)).astype(np.float32)
    audio = np.concatenate([distinct] * 40)  # clip i is a copy of clip i % 5
    queries = rng.integers(-3, 4, size=(6, 16)).astype(np.float32)
    scores, indices = exact_search(queries, audio, 12, batch_size=16)
    expected_scores, expected_indices = brute_force(queries, audio, 12)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(scores, expected_scores)
    for row_scores, row_indices in zip(scores, indices):
        for a, b in zip(range(11), range(1, 12)):
            if row_scores[a] == row_scores[b]:
                assert row_indices[a] < row_indices[b]


def test_exact_search_clamps_k_to_library_size():
    audio = torch.from_numpy(small_library(30).astype(np.float32))
    queries = noisy_queries(audio.numpy(), 3, seed=3)[0]
    scores, indices = exact_search(queries, audio, 100)
    assert scores.shape == indices.shape == (3, 30)
    assert torch.equal(indices.sort(dim=1).values, torch.arange(30).expand(3, -1))
    assert torch.equal(indices, brute_force(queries, audio, 30)[1])


def test_exact_search_multi_vector_queries():
    audio = small_library(400)
    queries = small_library(5, seed=9)  # audio-to-audio: (queries, 8, 32)
    scores, indices = exact_search(queries, audio, 10, batch_size=50)
    expected_scores, expected_indices = brute_force(torch.from_numpy(queries.astype(np.float32)), audio, 10)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(scores, expected_scores)
    # A clip searched with itself comes first, with its best self-similarity.
    own_scores, own_indices = exact_search(audio[[3, 17]], audio, 1)
    assert own_indices[:, 0].tolist() == [3, 17]


def test_exact_search_rejects_mismatched_shapes():
    audio = small_library(10)
    with pytest.raises(ValueError, match="dim"):
        exact_search(np.zeros((2, 16), dtype=np.float32), audio, 3)
    with pytest.raises(ValueError, match="float16 or float32"):
        exact_search(np.zeros((2, 32), dtype=np.float32), audio.astype(np.float64), 3)


def test_clip_store_reads_across_blocks():
    library = small_library(50)
    store = ClipStore([library[:20], library[20:35], library[35:]])
    assert store.shape == library.shape and len(store) == 50
    np.testing.assert_array_equal(store[15:40], library[15:40])
    np.testing.assert_array_equal(store[np.array([0, 19, 20, 34, 35, 49])], library[[0, 19, 20, 34, 35, 49]])
    assert torch.equal(exact_search(library[:4], store, 5, batch_size=7)[1], exact_search(library[:4], library, 5)[1])


def test_missing_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        import_faiss()


# --- approximate index -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered():
    """4000 clips of 8 x 64 in 40 topics and 100 text-like queries, with their exact top-10."""
    library = clustered_embeddings(4000, 8, 64, num_topics=40, seed=5)
    queries = noisy_queries(library, 100, seed=6)[0]
    return library, queries, exact_search(queries, library, 10)


@pytest.fixture(scope="module")
def built(clustered):
    pytest.importorskip("faiss")
    return ApproximateAudioIndex.build(clustered[0])


def test_index_recall_on_clustered_library(clustered, built):
    library, queries, (exact_scores_, exact_indices) = clustered
    scores, indices = built.search(queries, 10)
    assert scores.shape == indices.shape == (100, 10)
    # Measured 1.0 with the defaults (IVF128,PQ32x4fs here, nprobe 32, 512 clips re-scored) and 0.984 with 64 clips
    # re-scored (faiss-cpu 1.15.1); the margins leave room for another FAISS build's k-means.
    assert recall_at_k(indices, exact_indices) >= 0.99
    assert recall_at_k(built.search(queries, 10, rescore_clips=64)[1], exact_indices) >= 0.95


def test_index_returns_exact_scores_best_first(clustered, built):
    library, queries, (exact_scores_, exact_indices) = clustered
    scores, indices = built.search(queries, 10)
    direct = exact_scores(torch.from_numpy(queries)[:, None, :], torch.from_numpy(library))
    assert torch.equal(direct.gather(1, indices), scores)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    same = indices == exact_indices
    assert torch.equal(scores[same], exact_scores_[same])


def test_index_with_k_beyond_its_candidates_falls_back_to_exact(clustered, built):
    library, queries, _ = clustered
    scores, indices = built.search(queries[:3], 5000, rescore_clips=64, token_candidates=64)
    expected_scores, expected_indices = exact_search(queries[:3], library, 5000)
    assert indices.shape == (3, 4000)
    assert torch.equal(indices, expected_indices) and torch.equal(scores, expected_scores)


def test_index_multi_vector_queries(clustered, built):
    library, _, _ = clustered
    queries = library[[10, 2000, 3999]]
    scores, indices = built.search(queries, 5)
    assert indices[:, 0].tolist() == [10, 2000, 3999]
    assert recall_at_k(indices, exact_search(queries, library, 5)[1]) >= 0.9


def test_index_save_load_round_trip(tmp_path, clustered, built):
    library, queries, _ = clustered
    built.metadata["model"] = "audio-qformer-test"
    built.save(str(tmp_path / "index"))
    loaded = ApproximateAudioIndex.load(str(tmp_path / "index"))
    assert len(loaded) == 4000 and loaded.metadata["model"] == "audio-qformer-test"
    assert isinstance(loaded.store.blocks[0], np.memmap)
    for expected, found in zip(built.search(queries, 10), loaded.search(queries, 10)):
        assert torch.equal(expected, found)
    # Adding to a loaded index and saving it in place keeps the memory-mapped block and writes the new one.
    loaded.add(library[:7])
    loaded.save(str(tmp_path / "index"))
    again = ApproximateAudioIndex.load(str(tmp_path / "index"))
    assert len(again) == 4007 and len(again.store.blocks) == 2
    assert again.search(library[:1], 2)[1][0].sort().values.tolist() == [0, 4000]


def test_save_can_reference_a_memmapped_library_instead_of_copying_it(tmp_path, clustered):
    pytest.importorskip("faiss")
    library, queries, _ = clustered
    np.save(tmp_path / "library.npy", library)
    mapped = np.load(tmp_path / "library.npy", mmap_mode="r")
    index = ApproximateAudioIndex.create(64, 8, nlist=32).train(mapped).add(mapped).add(mapped[:10])
    index.save(str(tmp_path / "index"), copy_embeddings=False)
    # The whole-file memmap is referenced; the slice of it (not a whole .npy file) is copied.
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["config.json", "embeddings-00001.npy", "index.faiss"]
    loaded = ApproximateAudioIndex.load(str(tmp_path / "index"))
    assert len(loaded) == 4010 and loaded.store.blocks[0].filename == str(tmp_path / "library.npy")
    for expected, found in zip(index.search(queries, 10), loaded.search(queries, 10)):
        assert torch.equal(expected, found)


def test_load_reports_a_missing_index(tmp_path):
    pytest.importorskip("faiss")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ApproximateAudioIndex.load(str(tmp_path))


def test_incremental_add_equals_building_at_once(tmp_path, clustered):
    pytest.importorskip("faiss")
    library, queries, _ = clustered
    # One trained, empty index, saved and loaded twice, so both copies share the quantisers.
    trained = ApproximateAudioIndex.create(64, 8, nlist=64).train(library, max_clips=2000)
    trained.save(str(tmp_path / "trained"))
    at_once = ApproximateAudioIndex.load(str(tmp_path / "trained")).add(library)
    in_steps = ApproximateAudioIndex.load(str(tmp_path / "trained"))
    for start, end in ((0, 1500), (1500, 1501), (1501, 4000)):
        in_steps.add(torch.from_numpy(library[start:end]))  # tensors are accepted and copied
    assert len(in_steps) == len(at_once) == 4000 and len(in_steps.store.blocks) == 3
    for expected, found in zip(at_once.search(queries, 10), in_steps.search(queries, 10)):
        assert torch.equal(expected, found)
    assert recall_at_k(in_steps.search(queries, 10)[1], clustered[2][1]) >= 0.95


def test_index_rejects_wrong_clip_shape(built):
    with pytest.raises(ValueError, match="vectors per clip"):
        built.add(np.zeros((2, 4, 64), dtype=np.float16))
