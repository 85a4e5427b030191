"""The `evaluate` module metrics/audio_retrieval on hand-computed rankings, and its agreement with retrieval.py."""

import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from audio_qformer.ranking_metrics import retrieval_metrics


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_PATH = os.path.join(ROOT, "metrics", "audio_retrieval")


def clip_ids(n: int, prefix: str = "clip") -> list[str]:
    return [f"{prefix}_{i:03d}" for i in range(n)]


def ranking_with(relevant: dict[int, str], length: int) -> list[str]:
    """`length` filler ids with `relevant[rank]` placed at each 1-based rank."""
    ranking = clip_ids(length, prefix="other")
    for rank, audio_id in relevant.items():
        ranking[rank - 1] = audio_id
    return ranking


@pytest.fixture(scope="module")
def evaluate_module():
    evaluate = pytest.importorskip("evaluate")
    return evaluate


@pytest.fixture(scope="module")
def metric(evaluate_module):
    return evaluate_module.load(METRIC_PATH)


@pytest.fixture(scope="module")
def multi_metric(evaluate_module):
    return evaluate_module.load(METRIC_PATH, "multi_relevant")


@pytest.fixture(scope="module")
def pure(metric):
    """The module's pure functions, from the copy `evaluate` imported."""
    return sys.modules[type(metric).__module__]


# ---------------------------------------------------------------- one relevant clip per caption (mAP@10, R@k)


@pytest.mark.parametrize(
    "rank, expected",
    [
        (1, {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "mAP@10": 1.0}),  # AP = 1/1
        (5, {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0, "mAP@10": 0.2}),  # AP = 1/5, last rank counted by R@5
        (10, {"R@1": 0.0, "R@5": 0.0, "R@10": 1.0, "mAP@10": 0.1}),  # AP = 1/10, still in the top 10
        (11, {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "mAP@10": 0.0}),  # just outside: AP = 0, R@10 false
    ],
)
def test_single_query_at_rank(metric, rank, expected):
    ranking = ranking_with({rank: "target"}, length=20)
    assert metric.compute(predictions=[ranking], references=["target"]) == pytest.approx(expected, abs=1e-12)


def test_relevant_missing_from_the_ranking_scores_zero(metric):
    results = metric.compute(predictions=[clip_ids(10)], references=["not_ranked"])
    assert results == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "mAP@10": 0.0}


def test_small_batch_by_hand(metric):
    # Four captions whose relevant clip ranks 1, 3, 7 and 12 (the last beyond the top 10):
    #   R@1  = 1/4 (rank 1)                 = 0.25
    #   R@5  = 2/4 (ranks 1, 3)             = 0.5
    #   R@10 = 3/4 (ranks 1, 3, 7)          = 0.75
    #   mAP@10 = (1/1 + 1/3 + 1/7 + 0) / 4 = (21 + 7 + 3) / 21 / 4 = 31/84 = 0.369047...
    ranks = [1, 3, 7, 12]
    predictions = [ranking_with({rank: f"target_{q}"}, length=15) for q, rank in enumerate(ranks)]
    references = [f"target_{q}" for q in range(len(ranks))]
    results = metric.compute(predictions=predictions, references=references)
    assert results == pytest.approx({"R@1": 0.25, "R@5": 0.5, "R@10": 0.75, "mAP@10": 31 / 84}, abs=1e-12)
    assert list(results) == ["R@1", "R@5", "R@10", "mAP@10"]


def test_batches_accumulate_like_one_call(evaluate_module, metric):
    predictions = [ranking_with({rank: "target"}, length=12) for rank in (2, 4, 11)]
    streamed = evaluate_module.load(METRIC_PATH)
    streamed.add_batch(predictions=predictions[:2], references=["target"] * 2)
    streamed.add(prediction=predictions[2], reference="target")
    # (1/2 + 1/4 + 0) / 3 = 0.25; R@1 = 0, R@5 = 2/3, R@10 = 2/3
    expected = {"R@1": 0.0, "R@5": 2 / 3, "R@10": 2 / 3, "mAP@10": 0.25}
    assert streamed.compute() == pytest.approx(expected, abs=1e-12)
    assert metric.compute(predictions=predictions, references=["target"] * 3) == pytest.approx(expected, abs=1e-12)


def test_custom_cutoffs(metric):
    # Relevant at rank 12: outside mAP@10 but inside mAP@15 (AP = 1/12) and R@15.
    ranking = ranking_with({12: "target"}, length=15)
    results = metric.compute(predictions=[ranking], references=["target"], recall_at=(1, 15), map_at=15)
    assert results == pytest.approx({"R@1": 0.0, "R@15": 1.0, "mAP@15": 1 / 12}, abs=1e-12)


# ---------------------------------------------------------------- several relevant clips (DCASE 2025 mAP@16)


def test_multi_relevant_map16_by_hand(multi_metric):
    # AP@16 = (1/n) * sum over relevant clips ranked r_i <= 16 (in rank order, i = 1, 2, ...) of i / r_i,
    # n = number of relevant clips of the query, those beyond rank 16 or missing included.
    # Query a: 4 relevant at ranks 1, 4, 20 and one missing from its 24-id ranking.
    #   AP = (1/1 + 2/4) / 4 = 3/8
    # Query b: 4 relevant at ranks 2, 3, 16, 17 (rank 16 is the last one that counts).
    #   AP = (1/2 + 2/3 + 3/16) / 4 = (24 + 32 + 9) / 48 / 4 = 65/192
    # Query c: 1 relevant at rank 5.
    #   AP = 1/5
    # mAP@16 = (3/8 + 65/192 + 1/5) / 3 = (360 + 325 + 192) / 960 / 3 = 877/2880 = 0.304513...
    predictions = [
        ranking_with({1: "a1", 4: "a2", 20: "a3"}, length=24),
        ranking_with({2: "b1", 3: "b2", 16: "b3", 17: "b4"}, length=24),
        ranking_with({5: "c1"}, length=16),
    ]
    # The order of the relevant ids does not matter.
    references = [["a3", "a_missing", "a2", "a1"], ["b4", "b1", "b3", "b2"], ["c1"]]
    expected = Fraction(3, 8) + Fraction(65, 192) + Fraction(1, 5)
    assert expected / 3 == Fraction(877, 2880)
    results = multi_metric.compute(predictions=predictions, references=references)
    assert list(results) == ["mAP@16"]
    assert results["mAP@16"] == pytest.approx(877 / 2880, abs=1e-12)


def test_average_precision_at_k_pure(pure):
    assert pure.average_precision_at_k([4, 1, 20], num_relevant=4, k=16) == pytest.approx(3 / 8)
    assert pure.average_precision_at_k([16], num_relevant=1, k=16) == pytest.approx(1 / 16)
    assert pure.average_precision_at_k([17], num_relevant=1, k=16) == 0.0
    assert pure.average_precision_at_k([], num_relevant=3, k=16) == 0.0
    # Every relevant clip on top: AP = 1.
    assert pure.average_precision_at_k([1, 2, 3], num_relevant=3, k=16) == pytest.approx(1.0)


def test_multi_relevant_with_one_relevant_matches_single_config(metric, multi_metric):
    # With one relevant clip AP@k is 1/rank, so both configs agree at the same cutoff.
    generator = torch.Generator().manual_seed(1)
    ids = clip_ids(30)
    predictions, references = [], []
    for _ in range(25):
        order = torch.randperm(len(ids), generator=generator).tolist()
        predictions.append([ids[j] for j in order])
        references.append(ids[int(torch.randint(len(ids), (1,), generator=generator))])
    single = metric.compute(predictions=predictions, references=references)["mAP@10"]
    multi = multi_metric.compute(predictions=predictions, references=[[r] for r in references], map_at=10)
    assert 0.0 < single < 1.0
    assert multi == pytest.approx({"mAP@10": single}, abs=1e-12)


# ---------------------------------------------------------------- errors


def test_ranking_shorter_than_the_largest_cutoff(metric, multi_metric):
    with pytest.raises(ValueError, match="largest cutoff asked is 10"):
        metric.compute(predictions=[clip_ids(9)], references=["clip_000"])
    with pytest.raises(ValueError, match="largest cutoff asked is 16"):
        multi_metric.compute(predictions=[clip_ids(15)], references=[["clip_000"]])
    with pytest.raises(ValueError, match="largest cutoff asked is 20"):
        metric.compute(predictions=[clip_ids(16)], references=["clip_000"], recall_at=(1, 20))


def test_duplicates_are_refused(metric, multi_metric):
    with pytest.raises(ValueError, match="more than once"):
        metric.compute(predictions=[clip_ids(10) + ["clip_003"]], references=["clip_003"])
    with pytest.raises(ValueError, match="more than once"):
        multi_metric.compute(predictions=[clip_ids(16)[:15] + ["clip_000"]], references=[["clip_000"]])
    with pytest.raises(ValueError, match="more than once"):
        multi_metric.compute(predictions=[clip_ids(16)], references=[["clip_001", "clip_001"]])


def test_mismatched_lengths(metric, multi_metric):
    with pytest.raises(ValueError, match="Mismatch"):
        metric.compute(predictions=[clip_ids(10)] * 2, references=["clip_000"])
    with pytest.raises(ValueError, match="Mismatch"):
        multi_metric.compute(predictions=[clip_ids(16)], references=[["clip_000"], ["clip_001"]])


def test_wrong_reference_shapes(metric, multi_metric):
    # A bare string where a list of ids is expected would otherwise be split into characters by Arrow.
    with pytest.raises(ValueError, match="should be a list of audio ids"):
        multi_metric.compute(predictions=[clip_ids(16)], references=["clip_000"])
    with pytest.raises(ValueError, match="should be a list of audio ids"):
        metric.compute(predictions=["clip_000 clip_001 clip_002"], references=["clip_000"])
    with pytest.raises(ValueError, match="don't match the expected format"):
        metric.compute(predictions=[clip_ids(10)], references=[["clip_000"]])
    with pytest.raises(ValueError, match="non-empty list"):
        multi_metric.compute(predictions=[clip_ids(16)], references=[[]])


def test_unknown_config(evaluate_module):
    with pytest.raises(ValueError, match="multi_relevant"):
        evaluate_module.load(METRIC_PATH, "multi")


# ---------------------------------------------------------------- agreement with ranking_metrics.retrieval_metrics


def ranked_ids(similarity: torch.Tensor, ids: list[str]) -> list[list[str]]:
    """Ids by descending score; a stable sort keeps the lower item index first among ties, as `target_ranks` does."""
    return [[ids[j] for j in sorted(range(len(ids)), key=lambda j: -row[j])] for row in similarity.tolist()]


def test_agrees_with_retrieval_metrics_on_a_tied_similarity_matrix(metric):
    generator = torch.Generator().manual_seed(0)
    num_queries, num_items = 60, 25
    # Scores on a coarse grid give many ties; a few queries get their target tied with a lower-index item on purpose.
    similarity = torch.randint(0, 6, (num_queries, num_items), generator=generator).float() / 5
    targets = torch.randint(0, num_items, (num_queries,), generator=generator)
    targets[:5] = torch.tensor([3, 7, 12, 20, 24])
    similarity[:5, 0] = similarity[torch.arange(5), targets[:5]]
    target_scores = similarity.gather(1, targets[:, None])
    tied_ahead = ((similarity == target_scores) & (torch.arange(num_items)[None, :] < targets[:, None])).any(dim=1)
    assert tied_ahead.sum() >= 5  # the tie-break really decides some ranks

    ids = clip_ids(num_items)
    expected = retrieval_metrics(similarity, targets)
    results = metric.compute(predictions=ranked_ids(similarity, ids), references=[ids[t] for t in targets.tolist()])
    assert results == pytest.approx(expected, abs=1e-6)
    assert 0.0 < results["R@1"] < results["R@10"] < 1.0

    # Breaking ties the other way (higher index first) changes the numbers: the caller's tie-break matters.
    reversed_ids = ids[::-1]
    flipped = metric.compute(
        predictions=ranked_ids(similarity.flip(1), reversed_ids), references=[ids[t] for t in targets.tolist()]
    )
    assert flipped["mAP@10"] != pytest.approx(expected["mAP@10"], abs=1e-6)


# ---------------------------------------------------------------- offline loading from another directory


def test_loads_offline_from_any_directory(tmp_path):
    script = (
        "import evaluate, json, sys\n"
        "m = evaluate.load(sys.argv[1], 'multi_relevant')\n"
        "ids = [f'clip_{i}' for i in range(16)]\n"
        "print(json.dumps(m.compute(predictions=[ids], references=[['clip_1', 'clip_99']])))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", script, METRIC_PATH], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # Relevant at rank 2 and missing: AP@16 = (1/2) / 2.
    assert out.stdout.strip().splitlines()[-1] == '{"mAP@16": 0.25}'


def test_pad_tokens_takes_arrays_and_tensors_alike():
    from audio_qformer.retrieval import pad_tokens

    ragged = [np.arange(6, dtype=np.float16).reshape(3, 2), np.ones((1, 2), dtype=np.float32)]
    states, mask = pad_tokens(ragged)
    expected = torch.tensor([[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    assert states.dtype == torch.float32 and torch.equal(states, expected)
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    # Tensors (e.g. tokens kept on a GPU for a large evaluation) give the same batch, on their own device.
    from_tensors, tensor_mask = pad_tokens([torch.from_numpy(a) for a in ragged], length=4)
    assert torch.equal(from_tensors[:, :3], expected) and not from_tensors[:, 3].any()
    assert tensor_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_sets_under_ten_clips_score_by_hand(metric):
    from evaluate_retrieval import cutoff_metrics

    # Four clips: ranks 1, 2, 4 and 3. R@5 and R@10 hold every clip; mAP@10 is the mean reciprocal rank.
    clips = ["a", "b", "c", "d"]
    rankings = [["a", "b", "c", "d"], ["a", "b", "c", "d"], ["a", "b", "d", "c"], ["b", "a", "c", "d"]]
    got = cutoff_metrics(metric, rankings, ["a", "b", "c", "c"], len(clips))
    assert got == pytest.approx({"R@1": 0.25, "R@5": 1.0, "R@10": 1.0, "mAP@10": (1 + 1 / 2 + 1 / 4 + 1 / 3) / 4})
    # With ten clips or more it is the metric's own default.
    many = [f"clip{i}" for i in range(12)]
    rankings = [many[i:] + many[:i] for i in range(12)]
    assert cutoff_metrics(metric, rankings, many, 12) == pytest.approx(metric.compute(predictions=rankings, references=many))
