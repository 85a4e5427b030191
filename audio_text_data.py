# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Captioned audio for training and evaluation, as `datasets.Dataset`s of (clip, caption) rows.

Every loader returns a `Dataset` with one row per caption and the columns

- `audio_path` (`str`): the clip's file ("" when the clip comes as bytes from a Hub dataset);
- `audio_bytes` (`bytes` or None): the encoded clip when there is no file;
- `audio_id` (`str`): the same for every caption of one clip, unique across datasets (`"clotho/development/x.wav"`);
- `caption` (`str`);
- `source` (`str`): which dataset the row comes from;

and a list of the clips it skipped (missing files, no usable caption), each `{"audio": ..., "reason": ...}`.
Nothing is dropped silently: skipped clips are logged with their count and first paths. Audio is decoded later, by
`audio_io.load_audio`, with soundfile (libsndfile) and resampled with soxr; `datasets`' own audio decoding (torchcodec) is not
used.
"""

import hashlib
import os
import re
from collections.abc import Sequence

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value, concatenate_datasets, load_dataset
from transformers.utils import logging

from audio_io import AUDIO_EXTENSIONS
from feature_cache import clip_key


logger = logging.get_logger(__name__)

COLUMNS = ("audio_path", "audio_bytes", "audio_id", "caption", "source")
FEATURES = Features(
    {
        "audio_path": Value("string"),
        "audio_bytes": Value("binary"),
        "audio_id": Value("string"),
        "caption": Value("string"),
        "source": Value("string"),
    }
)


def clean_caption(text: str, max_words: int = 50) -> str:
    """LAVIS' `blip_caption` processing: lower case, punctuation to spaces, whitespace collapsed, at most 50 words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", str(text).lower())
    text = re.sub(r"\s{2,}", " ", text).strip()
    return " ".join(text.split(" ")[:max_words])


def _usable_captions(captions) -> list[str]:
    """The captions that keep a word after `clean_caption` (not empty, blank or punctuation only)."""
    return [c for c in captions if isinstance(c, str) and clean_caption(c)]


def _report_skipped(source: str, skipped: list[dict], empty_captions: int = 0):
    if skipped:
        shown = "; ".join(f"{item['audio']} ({item['reason']})" for item in skipped[:5])
        logger.warning(f"{source}: skipped {len(skipped)} clip(s): {shown}{' ...' if len(skipped) > 5 else ''}")
    if empty_captions:
        logger.warning(f"{source}: left out {empty_captions} empty caption(s) of clips that have other captions.")


def _rows_from_files(
    source: str, id_prefix: str, files_and_captions: Sequence[tuple[str, list[str]]]
) -> tuple[Dataset, list[dict]]:
    """Rows for clips on disk, one per non-empty caption; missing files and clips without a caption are reported."""
    rows = {column: [] for column in COLUMNS}
    skipped, empty_captions = [], 0
    for path, captions in files_and_captions:
        if not os.path.isfile(path):
            skipped.append({"audio": path, "reason": "missing file"})
            continue
        usable = _usable_captions(captions)
        if not usable:
            skipped.append({"audio": path, "reason": "no caption"})
            continue
        empty_captions += len(captions) - len(usable)
        captions = usable
        audio_id = f"{id_prefix}/{os.path.basename(path)}"
        for caption in captions:
            rows["audio_path"].append(path)
            rows["audio_bytes"].append(None)
            rows["audio_id"].append(audio_id)
            rows["caption"].append(caption)
            rows["source"].append(source)
    _report_skipped(source, skipped, empty_captions)
    if not rows["caption"]:
        raise ValueError(f"{source}: no usable clip (skipped {len(skipped)}); check the paths.")
    return Dataset.from_dict(rows, features=FEATURES), skipped


def load_clotho(root: str, split: str) -> tuple[Dataset, list[dict]]:
    """
    Clotho v2.1 in its official layout: `root/clotho_captions_{split}.csv` (`file_name, caption_1..caption_5`) and
    the clips in `root/{split}/` (splits `development`, `validation`, `evaluation`).
    """
    csv_path = os.path.join(root, f"clotho_captions_{split}.csv")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"Clotho: no caption file {csv_path} (expected clotho_captions_{{split}}.csv).")
    table = load_dataset("csv", data_files=csv_path, split="train")
    caption_columns = sorted(c for c in table.column_names if c.startswith("caption_"))
    if "file_name" not in table.column_names or not caption_columns:
        raise ValueError(f"{csv_path}: expected columns file_name, caption_1..caption_5; found {table.column_names}.")
    audio_dir = os.path.join(root, split)
    pairs = [
        (os.path.join(audio_dir, row["file_name"]), [row[c] for c in caption_columns]) for row in table
    ]
    return _rows_from_files("clotho", f"clotho/{split}", pairs)


AUDIOCAPS_FILE_PATTERNS = (
    "{audiocap_id}",
    "{youtube_id}_{start_time}",
    "Y{youtube_id}_{start_time}",
    "{youtube_id}",
    "Y{youtube_id}",
)


def load_audiocaps(
    csv_path: str, audio_dir: str, file_patterns: Sequence[str] = AUDIOCAPS_FILE_PATTERNS
) -> tuple[Dataset, list[dict]]:
    """
    AudioCaps in its official CSV layout (`audiocap_id, youtube_id, start_time, caption`, one caption per row) with a
    folder of downloaded clips. Download tools name clips differently, so each row's file is the first that exists
    among `file_patterns` (formatted with the row's fields) with any audio extension. Rows of one YouTube segment
    share an audio id; clips that were not downloaded are skipped and reported.
    """
    table = load_dataset("csv", data_files=csv_path, split="train")
    missing_columns = {"audiocap_id", "youtube_id", "start_time", "caption"} - set(table.column_names)
    if missing_columns:
        raise ValueError(f"{csv_path}: missing AudioCaps columns {sorted(missing_columns)}; found {table.column_names}.")
    existing = {os.path.splitext(name)[0]: name for name in os.listdir(audio_dir) if name.endswith(AUDIO_EXTENSIONS)}
    captions_by_file: dict[str, list[str]] = {}
    skipped = []
    for row in table:
        fields = {k: row[k] for k in ("audiocap_id", "youtube_id", "start_time")}
        stems = [pattern.format(**fields) for pattern in file_patterns]
        found = next((existing[stem] for stem in stems if stem in existing), None)
        if found is None:
            skipped.append({"audio": f"{audio_dir}/{stems[1]}.*", "reason": "missing file"})
            continue
        captions_by_file.setdefault(os.path.join(audio_dir, found), []).append(row["caption"])
    dataset, more = _rows_from_files("audiocaps", "audiocaps", list(captions_by_file.items()))
    _report_skipped("audiocaps", skipped)
    return dataset, skipped + more


def load_audiofolder(directory: str, caption_columns: Sequence[str] | None = None) -> tuple[Dataset, list[dict]]:
    """
    A folder of audio with a `metadata.csv` (the `audiofolder` convention): `file_name` (relative to the folder) and
    one or more caption columns (by default every column whose name starts with `caption`).
    """
    csv_path = os.path.join(directory, "metadata.csv")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"{directory}: no metadata.csv (columns file_name, caption...).")
    table = load_dataset("csv", data_files=csv_path, split="train")
    if caption_columns is None:
        caption_columns = [c for c in table.column_names if c.startswith("caption")]
    unknown = [c for c in caption_columns if c not in table.column_names]
    if "file_name" not in table.column_names or not caption_columns or unknown:
        raise ValueError(
            f"{csv_path}: needs file_name and caption columns {list(caption_columns) or '(caption...)'}; "
            f"found {table.column_names}."
        )
    pairs = [(os.path.join(directory, row["file_name"]), [row[c] for c in caption_columns]) for row in table]
    name = os.path.basename(os.path.normpath(directory))
    return _rows_from_files(name, name, pairs)


def load_hub_dataset(
    dataset_id: str,
    split: str,
    audio_column: str = "audio",
    caption_columns: Sequence[str] = ("caption",),
    id_column: str | None = None,
    **load_kwargs,
) -> tuple[Dataset, list[dict]]:
    """
    A captioned audio dataset from the Hub (e.g. `CLAPv2/Clotho`) or any `load_dataset` source. The audio column is
    read undecoded (`Audio(decode=False)`: a path and/or the encoded bytes) and decoded later by `load_audio`.
    Clips get their id from `id_column`, else from their path, else from a hash of their bytes.
    """
    from datasets import Audio

    table = load_dataset(dataset_id, split=split, **load_kwargs)
    missing = [c for c in (audio_column, *caption_columns) if c not in table.column_names]
    if missing:
        raise ValueError(f"{dataset_id}: no column(s) {missing}; the columns are {table.column_names}.")
    if isinstance(table.features[audio_column], Audio):
        table = table.cast_column(audio_column, Audio(decode=False))
    rows = {column: [] for column in COLUMNS}
    skipped, empty_captions = [], 0
    for index, row in enumerate(table):
        audio = row[audio_column]
        path, data = (audio.get("path") or "", audio.get("bytes")) if isinstance(audio, dict) else (str(audio), None)
        if data is None and not os.path.isfile(path):
            skipped.append({"audio": path or f"row {index}", "reason": "missing file"})
            continue
        if id_column is not None:
            key = str(row[id_column])
        elif data is not None:
            key = hashlib.sha1(data).hexdigest()[:16]
        else:
            key = path
        captions = row[caption_columns[0]] if len(caption_columns) == 1 else [row[c] for c in caption_columns]
        captions = captions if isinstance(captions, list) else [captions]
        usable = _usable_captions(captions)
        if not usable:
            skipped.append({"audio": path or f"row {index}", "reason": "no caption"})
            continue
        empty_captions += len(captions) - len(usable)
        for caption in usable:
            rows["audio_path"].append(path if data is None else "")
            rows["audio_bytes"].append(data)
            rows["audio_id"].append(f"{dataset_id}/{split}/{key}")
            rows["caption"].append(caption)
            rows["source"].append(dataset_id)
    _report_skipped(dataset_id, skipped, empty_captions)
    return Dataset.from_dict(rows, features=FEATURES), skipped


def split_by_clip(dataset: Dataset, num_validation: int = 1000, seed: int = 0) -> DatasetDict:
    """
    The report's split: draw validation examples at random (seeded) from the pooled training data, the rest train.

    Whole clips are drawn, so no clip has captions on both sides: clips are shuffled and taken until the
    validation holds at least `num_validation` captions (so it can exceed that by a clip's other captions).
    """
    ids = sorted(set(dataset["audio_id"]))
    order = np.random.default_rng(seed).permutation(len(ids))
    counts: dict[str, int] = {}
    for audio_id in dataset["audio_id"]:
        counts[audio_id] = counts.get(audio_id, 0) + 1
    chosen, total = set(), 0
    for index in order:
        if total >= num_validation:
            break
        chosen.add(ids[index])
        total += counts[ids[index]]
    if total < num_validation or len(chosen) == len(ids):
        raise ValueError(f"Cannot draw {num_validation} validation examples from {len(dataset)} and keep any to train.")
    is_validation = [audio_id in chosen for audio_id in dataset["audio_id"]]
    indices = np.arange(len(dataset))
    return DatasetDict(
        train=dataset.select(indices[~np.array(is_validation)]),
        validation=dataset.select(indices[np.array(is_validation)]),
    )


def with_cache_keys(dataset):
    """A loaded dataset with each clip's cache `key` (see `clip_key`) and its caption cleaned (`clean_caption`)."""
    return dataset.map(
        lambda row: {"key": clip_key(row["audio_path"] or None, row["audio_bytes"]), "caption": clean_caption(row["caption"])},
        desc="Keying clips",
    )


def combine(parts: Sequence[tuple[Dataset, list[dict]]]) -> tuple[Dataset, list[dict]]:
    """Concatenate loaded datasets and their skip lists."""
    datasets, skipped = zip(*parts)
    return concatenate_datasets(list(datasets)), [item for items in skipped for item in items]


__all__ = [
    "clean_caption",
    "combine",
    "load_audiocaps",
    "load_audiofolder",
    "load_clotho",
    "load_hub_dataset",
    "split_by_clip",
    "with_cache_keys",
]
