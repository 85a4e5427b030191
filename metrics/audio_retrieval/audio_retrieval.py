# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Text-to-audio retrieval metrics of the DCASE language-based audio retrieval task, as an `evaluate` module."""

# This file is copied into evaluate's module cache when loaded, so it is self-contained: the maths lives in the small
# pure functions below and `AudioRetrieval._compute` only calls them. They agree with `ranking_metrics.retrieval_metrics`
# of this repository, which works on a similarity matrix instead of ranked lists (see tests/test_metrics.py).

import datasets
import evaluate


_CITATION = """\
@inproceedings{Xie2022Language,
    author = {Xie, Huang and Lipping, Samuel and Virtanen, Tuomas},
    title = {Language-Based Audio Retrieval Task in {DCASE} 2022 Challenge},
    booktitle = {Proceedings of the 7th Workshop on Detection and Classification of Acoustic Scenes and Events (DCASE)},
    year = {2022},
    pages = {216--220}
}
@misc{DCASE2025Task6,
    title = {{DCASE} 2025 Challenge Task 6: Language-Based Audio Retrieval},
    author = {Xie, Huang and Virtanen, Tuomas and Weck, Benno and Primus, Paul},
    year = {2025},
    howpublished = {\\url{https://dcase.community/challenge2025/task-language-based-audio-retrieval}}
}
"""

_DESCRIPTION = """\
Ranking metrics of text-to-audio retrieval as the DCASE language-based audio retrieval task defines them. Every
caption is a query and the system returns a ranked list of audio ids.

Config "default" (DCASE 2022-2024, one relevant clip per caption): R@k is the share of queries whose relevant clip
is among the first k results; AP@10 of a query is 1/rank when the clip ranks in the top 10 and 0 otherwise; mAP@10
is the mean over queries.

Config "multi_relevant" (DCASE 2025 task 6, several relevant clips per caption from the additional relevance
annotations): AP@16 of a query is the sum, over its relevant clips ranked in the top 16, of the precision at each
such clip's rank, divided by the number of relevant clips of the query (all of them, including those ranked
below 16); mAP@16 is the mean over queries.

All values are fractions in [0, 1]; papers and the DCASE result tables report them as percentages. The metric
takes rankings, so it sees no ties: the caller breaks them (`ranking_metrics.target_ranks` of this repository puts the
lower item index first among equal scores, i.e. a stable sort by descending score).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str`): for each query, audio ids ranked best first, without duplicates. A list
        must hold at least as many ids as the largest cutoff asked (10 for the defaults of "default", 16 for
        "multi_relevant"); a relevant id absent from it counts as ranked below every cutoff.
    references: for each query, config "default": the one relevant audio id (`str`); config "multi_relevant": the
        relevant audio ids (`list` of `str`, at least one, without duplicates).
    recall_at (`tuple` of `int`, *optional*, defaults to `(1, 5, 10)`): cutoffs k of R@k (config "default" only).
    map_at (`int`, *optional*, defaults to 10 for "default" and 16 for "multi_relevant"): cutoff k of mAP@k.
Returns:
    config "default": `R@1`, `R@5`, `R@10` and `mAP@10` (keys follow `recall_at` and `map_at`), floats in [0, 1].
    config "multi_relevant": `mAP@16` (key follows `map_at`), a float in [0, 1].
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("metrics/audio_retrieval")
    >>> ranked = [f"clip_{i}" for i in range(10)]
    >>> metric.compute(predictions=[ranked, ranked], references=["clip_0", "clip_4"])
    {'R@1': 0.5, 'R@5': 1.0, 'R@10': 1.0, 'mAP@10': 0.6}
    >>> metric = evaluate.load("metrics/audio_retrieval", "multi_relevant")
    >>> ranked = [f"clip_{i}" for i in range(16)]
    >>> metric.compute(predictions=[ranked], references=[["clip_0", "clip_3", "clip_99"]])
    {'mAP@16': 0.5}
"""

CONFIGS = ("default", "multi_relevant")


def check_ranking(ranking, min_length: int, query: int) -> None:
    """Raise `ValueError` unless `ranking` is a list of distinct ids at least `min_length` long."""
    if isinstance(ranking, str) or not isinstance(ranking, (list, tuple)):
        raise ValueError(f"predictions[{query}] should be a list of audio ids ranked best first, got {ranking!r}.")
    if len(ranking) < min_length:
        raise ValueError(
            f"predictions[{query}] ranks {len(ranking)} audio ids but the largest cutoff asked is {min_length}: "
            f"rank at least {min_length} ids per query."
        )
    if len(set(ranking)) != len(ranking):
        seen, duplicates = set(), []
        for audio_id in ranking:
            if audio_id in seen and audio_id not in duplicates:
                duplicates.append(audio_id)
            seen.add(audio_id)
        raise ValueError(f"predictions[{query}] ranks these audio ids more than once: {duplicates[:5]}.")


def rank_of(ranking, audio_id) -> int | None:
    """1-based position of `audio_id` in `ranking`, or `None` when the ranking does not contain it."""
    try:
        return ranking.index(audio_id) + 1
    except ValueError:
        return None


def single_relevant_metrics(rankings, relevant_ids, recall_at=(1, 5, 10), map_at: int = 10) -> dict:
    """
    R@k and mAP@k with one relevant id per query (DCASE 2022-2024 task 6B / task 8): R@k is the share of queries
    whose relevant id ranks in the top k; AP@k of a query is `1 / rank` in the top k, else 0; mAP@k is their mean.
    """
    if len(rankings) != len(relevant_ids) or not rankings:
        raise ValueError(
            f"Expected as many rankings as references, at least one; got {len(rankings)} and {len(relevant_ids)}."
        )
    cutoffs = [*recall_at, map_at]
    if any(not isinstance(k, int) or k < 1 for k in cutoffs):
        raise ValueError(f"Cutoffs should be positive integers, got recall_at={recall_at!r} and map_at={map_at!r}.")
    ranks = []
    for query, (ranking, relevant) in enumerate(zip(rankings, relevant_ids)):
        check_ranking(ranking, max(cutoffs), query)
        if not isinstance(relevant, str):
            raise ValueError(
                f"references[{query}] should be one audio id (a string), got {relevant!r}; the config "
                '"multi_relevant" takes several relevant ids per query.'
            )
        ranks.append(rank_of(list(ranking), relevant))
    metrics = {f"R@{k}": sum(r is not None and r <= k for r in ranks) / len(ranks) for k in recall_at}
    metrics[f"mAP@{map_at}"] = sum(1.0 / r for r in ranks if r is not None and r <= map_at) / len(ranks)
    return metrics


def average_precision_at_k(relevant_ranks, num_relevant: int, k: int) -> float:
    """
    AP@k of one query with several relevant items, as the DCASE 2025 task 6 baseline computes it: the precision at
    the rank of each relevant item in the top k (relevant items up to that rank / rank), summed and divided by the
    number of relevant items of the query, those ranked below k (or absent from the ranking) included.

    `relevant_ranks` are the 1-based ranks of the relevant items found in the ranking, all distinct.
    """
    # Definition: `average_precision_at_k` in `d25_t6/retrieval_module.py` of the organisers' DCASE 2025 task 6
    # baseline (https://github.com/OptimusPrimus/dcase2025_task6_baseline; read in its public forks, which carry the
    # function unchanged). It sorts the 0-based ranks of the relevant items, adds (position among the relevant) /
    # (rank + 1) for each rank < k and divides by the number of relevant items. The baseline logs it with k = 10
    # ("mAP@10 (new annotations)"); the challenge ranks systems by the same average precision at k = 16, averaged
    # over queries ("mAP@16", https://dcase.community/challenge2025/task-language-based-audio-retrieval-results).
    hits = [rank for rank in sorted(relevant_ranks) if rank <= k]
    return sum(found / rank for found, rank in enumerate(hits, start=1)) / num_relevant


def multi_relevant_map(rankings, relevant_id_lists, map_at: int = 16) -> dict:
    """mAP@k over queries that each have one or more relevant ids (DCASE 2025 task 6, see `average_precision_at_k`)."""
    if len(rankings) != len(relevant_id_lists) or not rankings:
        raise ValueError(
            f"Expected as many rankings as references, at least one; got {len(rankings)} and "
            f"{len(relevant_id_lists)}."
        )
    if not isinstance(map_at, int) or map_at < 1:
        raise ValueError(f"map_at should be a positive integer, got {map_at!r}.")
    average_precisions = []
    for query, (ranking, relevant) in enumerate(zip(rankings, relevant_id_lists)):
        check_ranking(ranking, map_at, query)
        if isinstance(relevant, str) or not isinstance(relevant, (list, tuple)) or not relevant:
            raise ValueError(f"references[{query}] should be a non-empty list of relevant audio ids, got {relevant!r}.")
        if len(set(relevant)) != len(relevant):
            raise ValueError(f"references[{query}] lists a relevant audio id more than once: {relevant!r}.")
        positions = {audio_id: position for position, audio_id in enumerate(ranking, start=1)}
        found = [positions[audio_id] for audio_id in relevant if audio_id in positions]
        average_precisions.append(average_precision_at_k(found, len(relevant), map_at))
    return {f"mAP@{map_at}": sum(average_precisions) / len(average_precisions)}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AudioRetrieval(evaluate.Metric):
    """R@k and mAP@10 (one relevant clip per caption) or mAP@16 (several, DCASE 2025) of ranked audio ids."""

    def _info(self):
        if self.config_name not in CONFIGS:
            raise ValueError(f"Unknown config_name {self.config_name!r} for audio_retrieval; choose one of {CONFIGS}.")
        multi = self.config_name == "multi_relevant"
        reference = datasets.List(datasets.Value("string")) if multi else datasets.Value("string")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.List(datasets.Value("string")), "references": reference}
            ),
            reference_urls=[
                "https://dcase.community/challenge2023/task-language-based-audio-retrieval",
                "https://dcase.community/challenge2025/task-language-based-audio-retrieval",
            ],
            codebase_urls=[
                "https://github.com/xieh97/dcase2023-audio-retrieval",
                "https://github.com/OptimusPrimus/dcase2025_task6_baseline",
            ],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of rankings and references, refusing a bare string where a list of ids is expected."""
        # Arrow would split a bare string into a list of characters where a list of ids is expected, so a string in
        # place of a ranking (or of a list of relevant ids) is refused before it reaches the writer.
        self._check_list_types(predictions, references)
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one ranking and its reference, refusing a bare string where a list of ids is expected."""
        self._check_list_types(None if prediction is None else [prediction], None if reference is None else [reference])
        super().add(prediction=prediction, reference=reference, **kwargs)

    def _check_list_types(self, predictions, references):
        columns = {"predictions": predictions}
        if self.config_name == "multi_relevant":
            columns["references"] = references
        for name, column in columns.items():
            for query, value in enumerate(column if column is not None else []):
                if isinstance(value, str) or not isinstance(value, (list, tuple)):
                    raise ValueError(f"{name}[{query}] should be a list of audio ids, got {value!r}.")

    def _compute(self, predictions, references, recall_at=(1, 5, 10), map_at=None):
        if self.config_name == "multi_relevant":
            return multi_relevant_map(predictions, references, map_at=16 if map_at is None else map_at)
        map_at = 10 if map_at is None else map_at
        return single_relevant_metrics(predictions, references, recall_at=recall_at, map_at=map_at)


__all__ = ["AudioRetrieval", "average_precision_at_k", "multi_relevant_map", "single_relevant_metrics"]
