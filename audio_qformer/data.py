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

import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value, concatenate_datasets, load_dataset
from transformers.utils import logging

from audio_io import AUDIO_EXTENSIONS, audio_files
from audio_qformer.identity import clip_key
from audio_qformer.store import audio_file_for


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


# --- Clotho ---------------------------------------------------------------------------------------------------------

CLOTHO_SPLITS = ("development", "validation", "evaluation")
CLOTHO_SPLIT_ALIASES = {"dev": "development", "val": "validation", "eval": "evaluation"}  # aac-datasets' subset names


def clotho_layout(root: str, split: str) -> tuple[str, str]:
    """
    The captions CSV and the audio folder of a Clotho v2.1 split under `root`, in either layout people have: the
    Zenodo files unpacked (`clotho_captions_{split}.csv` beside the folder `{split}/`), or what aac-datasets downloads
    (`CLOTHO_v2.1/clotho_csv_files/clotho_captions_{split}.csv` and `CLOTHO_v2.1/clotho_audio_files/{split}/`), given
    its root or the `CLOTHO_v2.1` folder itself.
    """
    split = CLOTHO_SPLIT_ALIASES.get(split, split)
    if split not in CLOTHO_SPLITS:
        raise ValueError(
            f"Clotho has the captioned splits {', '.join(CLOTHO_SPLITS)} (aac-datasets: dev, val, eval); got {split!r} "
            "(its `test` set is DCASE's captioning test, without captions)."
        )
    csv_name = f"clotho_captions_{split}.csv"
    candidates = [(os.path.join(root, csv_name), os.path.join(root, split))]
    for base in (root, os.path.join(root, "CLOTHO_v2.1")):
        candidates.append((os.path.join(base, "clotho_csv_files", csv_name), os.path.join(base, "clotho_audio_files", split)))
    for csv_path, audio_dir in candidates:
        if os.path.isfile(csv_path):
            if not os.path.isdir(audio_dir):
                raise FileNotFoundError(f"Clotho: {csv_path} has no audio folder beside it ({audio_dir}); unpack "
                                        f"clotho_audio_{split}.7z there.")  # fmt: skip
            return csv_path, audio_dir
    raise FileNotFoundError(f"Clotho: no {csv_name} under {root}; looked for " + ", ".join(c for c, _ in candidates))


def _read_csv(path: str) -> list[dict]:
    """The rows of a CSV file (UTF-8, else Latin-1 as Clotho's metadata files are), as dicts."""
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            with open(path, newline="", encoding=encoding) as handle:
                return list(csv.DictReader(handle))
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


def load_clotho(root: str, split: str) -> tuple[Dataset, list[dict]]:
    """
    A Clotho v2.1 split (`development`, `validation`, `evaluation`; aac-datasets' `dev`, `val`, `eval`) in either
    layout `clotho_layout` finds: one row per caption of `file_name, caption_1..caption_5`.
    """
    csv_path, audio_dir = clotho_layout(root, split)
    split = CLOTHO_SPLIT_ALIASES.get(split, split)
    table = _read_csv(csv_path)
    caption_columns = sorted(c for c in (table[0] if table else {}) if c.startswith("caption_"))
    if not table or "file_name" not in table[0] or not caption_columns:
        raise ValueError(f"{csv_path}: expected columns file_name, caption_1..caption_5; found {list(table[0]) if table else 'no rows'}.")
    pairs = [(os.path.join(audio_dir, row["file_name"]), [row[c] for c in caption_columns]) for row in table]
    return _rows_from_files("clotho", f"clotho/{split}", pairs)


# --- AudioCaps ------------------------------------------------------------------------------------------------------

# How download tools name a clip's file (without its extension); `load_audiocaps` tries them in this order.
AUDIOCAPS_FILE_PATTERNS = (
    "{youtube_id}_{start_time}",  # aac-datasets: audio_32000Hz/{split}/r1nicOVtvkQ_130.flac
    "{youtube_id}_{start_ms}_{end_ms}",  # audiocaps-dl: {split}/7fmOlUlwoNg_20000_30000.wav
    "Y{youtube_id}_{start_time}_{end_time}",  # AudioSet style: Y0a8RB5eOGJ4_30.000_40.000.wav
    "{audiocap_id}",  # audiocaps-download (PyPI): {split}/103549.ogg, one file per caption row
    "{youtube_id}",  # exports with one file per video
    "Y{youtube_id}",
)
_PATTERN_FIELDS = {
    "youtube_id": r"(?P<youtube_id>[A-Za-z0-9_-]{11})",  # YouTube ids are 11 characters, "_" and "-" included
    "start_time": r"(?P<start_time>\d+(?:\.\d+)?)",  # seconds: 30, 30.0, 30.000
    "end_time": r"(?:\d+(?:\.\d+)?)",
    "start_ms": r"(?P<start_ms>\d+)",
    "end_ms": r"(?:\d+)",
    "audiocap_id": r"(?P<audiocap_id>\d+)",
}
# soundfile reads these; .m4a / .aac are listed too so that they are reported (libsndfile cannot decode them).
AUDIOCAPS_EXTENSIONS = AUDIO_EXTENSIONS + (".m4a", ".aac")


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", pattern)
    regex = ""
    for part in parts:
        if part.startswith("{") and part.endswith("}"):
            if part[1:-1] not in _PATTERN_FIELDS:
                raise ValueError(f"Unknown field {part} in the AudioCaps file pattern {pattern!r}; the fields are "
                                 + ", ".join("{" + f + "}" for f in _PATTERN_FIELDS))  # fmt: skip
            regex += _PATTERN_FIELDS[part[1:-1]]
        else:
            regex += re.escape(part)
    return re.compile(regex)


def load_audiocaps(
    csv_path: str, audio_dirs: str | Sequence[str], file_patterns: Sequence[str] = ()
) -> tuple[Dataset, list[dict]]:
    """
    AudioCaps from its CSV (`audiocap_id, youtube_id, start_time, caption`, a row per caption) and the folders the
    clips were downloaded to, searched at any depth (one folder per CSV, or their parent). A clip is a YouTube video
    from `start_time`: the captions of one clip are one clip however many files hold it. Its file is recognised by
    `file_patterns` (tried first) and `AUDIOCAPS_FILE_PATTERNS` (fields `{youtube_id}`, `{start_time}`, `{end_time}`,
    `{start_ms}`, `{end_ms}`, `{audiocap_id}`), with any audio extension. Clips without a file (about a tenth of
    AudioCaps is gone from YouTube) are reported; when none has one, the error says what was looked for and where.
    """
    folders = [audio_dirs] if isinstance(audio_dirs, str) else list(audio_dirs)
    table = _read_csv(csv_path)
    missing_columns = {"audiocap_id", "youtube_id", "start_time", "caption"} - set(table[0] if table else ())
    if missing_columns:
        raise ValueError(f"{csv_path}: missing AudioCaps columns {sorted(missing_columns)}; found {list(table[0]) if table else 'no rows'}.")
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"AudioCaps: no audio folder {folder} (for {csv_path}).")
    clip_of_row = {row["audiocap_id"]: (row["youtube_id"], float(row["start_time"])) for row in table}
    clips_of_video: dict[str, set] = {}
    for clip in clip_of_row.values():
        clips_of_video.setdefault(clip[0], set()).add(clip)
    patterns = list(dict.fromkeys([*file_patterns, *AUDIOCAPS_FILE_PATTERNS]))
    regexes = [_pattern_regex(p) for p in patterns]
    files = sorted(path for folder in folders for path in audio_files(folder, AUDIOCAPS_EXTENSIONS))
    file_of_clip: dict[tuple, str] = {}
    extra_files, unmatched = 0, []
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        match = next((m for m in (r.fullmatch(stem) for r in regexes) if m), None)
        fields = match.groupdict() if match else {}
        clip = None
        if fields.get("audiocap_id") is not None:
            clip = clip_of_row.get(fields["audiocap_id"])
        elif fields.get("youtube_id") is not None and (fields.get("start_time") or fields.get("start_ms")) is not None:
            start = float(fields["start_time"]) if fields.get("start_time") else int(fields["start_ms"]) / 1000
            clip = (fields["youtube_id"], start)
        elif fields.get("youtube_id") is not None and len(clips_of_video.get(fields["youtube_id"], ())) == 1:
            clip = next(iter(clips_of_video[fields["youtube_id"]]))
        if clip is None or clip not in clips_of_video.get(clip[0], ()):
            unmatched.append(path)
        elif clip in file_of_clip:
            extra_files += 1  # another file of the same clip (audiocaps-download writes one per caption row)
        else:
            file_of_clip[clip] = path
    captions: dict[tuple, list[str]] = {}
    for row in table:
        captions.setdefault((row["youtube_id"], float(row["start_time"])), []).append(row["caption"])
    found = [(clip, file_of_clip[clip]) for clip in captions if clip in file_of_clip]
    skipped = [{"audio": f"youtube {clip[0]} from {clip[1]:g} s", "reason": "no file"} for clip in captions
               if clip not in file_of_clip]  # fmt: skip
    if not found:
        examples = ", ".join(os.path.basename(p) for p in files[:5]) or "none"
        raise ValueError(
            f"AudioCaps {csv_path}: no file for any of its {len(captions)} clips ({len(table)} rows) under "
            f"{', '.join(folders)} (searched at any depth: {len(files)} audio files, e.g. {examples}). File names "
            f"tried, without extension: {', '.join(patterns)}; give the tool's own with --audiocaps_file_pattern."
        )
    if extra_files:
        logger.info(f"audiocaps {os.path.basename(csv_path)}: {extra_files} more file(s) of clips already found (one per "
                    "caption row, as audiocaps-download writes them) are not used: one file per clip.")  # fmt: skip
    if unmatched:
        logger.info(f"audiocaps {os.path.basename(csv_path)}: {len(unmatched)} audio file(s) under the folder are not "
                    f"clips of this CSV (e.g. {os.path.basename(unmatched[0])}).")  # fmt: skip
    rows = {column: [] for column in COLUMNS}
    empty_captions = 0
    for (youtube_id, start), path in found:
        usable = _usable_captions(captions[youtube_id, start])
        if not usable:
            skipped.append({"audio": path, "reason": "no caption"})
            continue
        empty_captions += len(captions[youtube_id, start]) - len(usable)
        for caption in usable:
            rows["audio_path"].append(path)
            rows["audio_bytes"].append(None)
            rows["audio_id"].append(f"audiocaps/{youtube_id}_{start:g}")
            rows["caption"].append(caption)
            rows["source"].append("audiocaps")
    _report_skipped(f"audiocaps {os.path.basename(csv_path)}", skipped, empty_captions)
    return Dataset.from_dict(rows, features=FEATURES), skipped


# --- WavCaps --------------------------------------------------------------------------------------------------------


def _clip_ids_in(path: str) -> set[str]:
    """Clip ids of an exclusion list: a CSV with an `id` column (aac-datasets'), or WavCaps' JSON (lists of ids)."""
    if path.lower().endswith(".json"):
        with open(path) as handle:
            value = json.load(handle)
        values = [v for group in value.values() for v in group] if isinstance(value, dict) else value
    else:
        table = _read_csv(path)
        if table and "id" not in table[0]:
            raise ValueError(f"{path}: an exclusion list needs an `id` column; found {list(table[0])}.")
        values = [row["id"] for row in table]
    return {_wavcaps_stem(str(v)) for v in values}


def _wavcaps_stem(clip_id: str) -> str:
    return os.path.splitext(clip_id)[0] if clip_id.lower().endswith((".wav", ".flac")) else clip_id


def load_wavcaps(json_path: str, audio_dirs: str | Sequence[str], exclude: Sequence[str] = ()) -> tuple[Dataset, list[dict]]:
    """
    One WavCaps source (`cvssp/WavCaps`): its `json_files/<source>/*_final.json` (`{"num_captions_per_audio": 1,
    "data": [{"id", "caption", "duration", ...}]}`) and the folder(s) its zip parts were unpacked to, where each clip
    is `{id}.flac` (AudioSet_SL's ids end in `.wav`, their files in `.flac`) at any depth. `exclude` names lists of
    clips to leave out (e.g. those overlapping Clotho or AudioCaps evaluation: aac-datasets' CSVs with an `id`
    column, or WavCaps' blacklist JSON); they are reported as skipped. Long clips are cut when their tokens are cached
    (`FeatureCache.extract`'s `max_seconds`), never decoded whole.
    """
    folders = [audio_dirs] if isinstance(audio_dirs, str) else list(audio_dirs)
    with open(json_path) as handle:
        content = json.load(handle)
    entries = content.get("data") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e and "caption" in e for e in entries):
        raise ValueError(f"{json_path}: expected WavCaps' {{\"data\": [{{\"id\", \"caption\", ...}}]}}.")
    source = os.path.basename(os.path.dirname(os.path.abspath(json_path))) or "wavcaps"
    excluded = set().union(*(_clip_ids_in(path) for path in exclude)) if exclude else set()
    files = {os.path.splitext(os.path.basename(p))[0]: p for folder in folders for p in audio_files(folder, AUDIOCAPS_EXTENSIONS)}
    pairs, skipped = [], []
    for entry in entries:
        stem = _wavcaps_stem(str(entry["id"]))
        if stem in excluded:
            skipped.append({"audio": f"{source}/{entry['id']}", "reason": "in an exclusion list"})
        elif stem not in files:
            skipped.append({"audio": f"{source}/{entry['id']}", "reason": "missing file"})
        else:
            pairs.append((files[stem], [entry["caption"]]))
    if not pairs:
        raise ValueError(f"WavCaps {json_path}: no clip found under {', '.join(folders)} ({len(entries)} listed, "
                         f"{len(files)} audio files there, {sum(s['reason'] != 'missing file' for s in skipped)} excluded).")  # fmt: skip
    dataset, more = _rows_from_files(f"wavcaps/{source}", f"wavcaps/{source}", pairs)
    _report_skipped(f"wavcaps/{source}", skipped)
    return dataset, skipped + more


# --- audiofolders and the Hub ---------------------------------------------------------------------------------------


def load_audiofolder(directory: str, caption_columns: Sequence[str] | None = None) -> tuple[Dataset, list[dict]]:
    """
    A folder of audio with a `metadata.csv` (the `audiofolder` convention): `file_name` (relative to the folder) and
    one or more caption columns (by default every column whose name starts with `caption`).
    """
    csv_path = os.path.join(directory, "metadata.csv")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"{directory}: no metadata.csv (columns file_name, caption...).")
    table = _read_csv(csv_path)
    columns = list(table[0]) if table else []
    if caption_columns is None:
        caption_columns = [c for c in columns if c.startswith("caption")]
    unknown = [c for c in caption_columns if c not in columns]
    if "file_name" not in columns or not caption_columns or unknown:
        raise ValueError(
            f"{csv_path}: needs file_name and caption columns {list(caption_columns) or '(caption...)'}; "
            f"found {columns}."
        )
    pairs = [(os.path.join(directory, row["file_name"]), [row[c] for c in caption_columns]) for row in table]
    name = os.path.basename(os.path.normpath(directory))
    return _rows_from_files(name, name, pairs)


@dataclass(frozen=True)
class HubLayout:
    """How a Hub copy of a dataset holds its clips and captions (`load_hub_dataset`'s defaults for it)."""

    audio_column: str = "audio"
    caption_columns: tuple[str, ...] = ("caption",)
    caption_separator: str | None = None  # captions joined into one string by this; split back on it
    id_columns: tuple[str, ...] = ()  # the columns that name a clip (default: its audio bytes, or path)
    splits: dict = field(default_factory=dict)  # the names the project uses -> the copy's own


# The copies people use, as their cards and mteb's loaders read them. CLAPv2/Clotho and mteb/Clotho join a clip's
# five captions with "." into `text` (mteb splits them back on "."); their `test` is Clotho's evaluation split.
_CLOTHO_COPY = HubLayout(caption_columns=("text",), caption_separator=".", id_columns=("index",),
                         splits={"development": "train", "evaluation": "test"})  # fmt: skip
HUB_LAYOUTS = {
    "CLAPv2/Clotho": _CLOTHO_COPY,
    "mteb/Clotho": _CLOTHO_COPY,
    "OpenSound/AudioCaps": HubLayout(id_columns=("youtube_id", "start_time"), splits={"val": "validation"}),
    "AudioLLMs/audiocaps_test": HubLayout(audio_column="context", caption_columns=("answer",)),
}


def _layout_of(dataset_id: str) -> HubLayout:
    """The `HUB_LAYOUTS` entry of a Hub id, or of a local copy of it (`.../CLAPv2/Clotho`, a Hub cache snapshot)."""
    if dataset_id in HUB_LAYOUTS:
        return HUB_LAYOUTS[dataset_id]
    if os.path.isdir(dataset_id):
        parts = os.path.abspath(dataset_id).split(os.sep)
        names = ["/".join(parts[-2:])] + [p[len("datasets--"):].replace("--", "/") for p in parts if p.startswith("datasets--")]
        for name in names:
            if name in HUB_LAYOUTS:
                return HUB_LAYOUTS[name]
    return HubLayout()


def load_hub_dataset(
    dataset_id: str,
    split: str,
    audio_column: str | None = None,
    caption_columns: Sequence[str] | None = None,
    id_columns: Sequence[str] | None = None,
    caption_separator: str | None = None,
    audio_dir: str | None = None,
    write: bool = True,
    **load_kwargs,
) -> tuple[Dataset, list[dict]]:
    """
    A captioned audio dataset from the Hub (`CLAPv2/Clotho`, `OpenSound/AudioCaps`, ...) or any `load_dataset`
    source (a local Parquet folder, `"parquet"` with `data_files`, an audiofolder), read as a stream: one row at a
    time, in bounded memory. The copies in `HUB_LAYOUTS` get their own columns, caption rule and split names unless
    the arguments say otherwise (`split="evaluation"` reads CLAPv2/Clotho's `test`, said in the log).

    Each clip's encoded audio is written once into `audio_dir` (named by its bytes: one file for every caption row
    that repeats them) and the rows hold its path, so no table holds audio. With `write` unset (the other processes
    of a launch), the rows the writing process listed there are read back instead of the dataset. Without
    `audio_dir`, rows keep the bytes (small datasets only). A clip is named by `id_columns`, else by its bytes, else
    by its path; a caption column holding lists, or one string with `caption_separator` between captions, gives a
    clip several captions.
    """
    from datasets import Audio

    layout = _layout_of(dataset_id)
    audio_column = audio_column or layout.audio_column
    caption_columns = tuple(caption_columns or layout.caption_columns)
    id_columns = tuple(id_columns or layout.id_columns)
    caption_separator = caption_separator if caption_separator is not None else layout.caption_separator
    copy_split = layout.splits.get(split, split)
    if copy_split != split:
        logger.warning(f"{dataset_id}: the split {split!r} is the copy's {copy_split!r}.")
    folder = None
    if audio_dir is not None:
        folder = os.path.join(audio_dir, re.sub(r"[^\w.-]+", "-", f"{dataset_id}-{copy_split}").strip("-."))
        listing = os.path.join(folder, "rows.jsonl")
        if not write:
            if not os.path.isfile(listing):
                raise FileNotFoundError(f"{listing}: the process that writes {dataset_id}'s audio has not listed it.")
            return _listed_rows(listing)
    table = _stream(dataset_id, copy_split, load_kwargs)
    columns = table.column_names or list(table.features or {})
    missing = [c for c in (audio_column, *caption_columns, *id_columns) if columns and c not in columns]
    if missing:
        raise ValueError(f"{dataset_id}: no column(s) {missing}; the columns are {columns}.")
    if table.features is not None and isinstance(table.features.get(audio_column), Audio):
        table = table.cast_column(audio_column, Audio(decode=False))
    table = table.select_columns([audio_column, *dict.fromkeys((*caption_columns, *id_columns))])
    rows = {column: [] for column in COLUMNS}
    skipped, empty_captions, counts = [], 0, {}
    for index, row in enumerate(table):
        audio = row[audio_column]
        path, data = (audio.get("path") or "", audio.get("bytes")) if isinstance(audio, dict) else (str(audio or ""), None)
        if data is None and "://" in path and folder is not None:  # a file of a Hub repository (an audiofolder's)
            data = _remote_bytes(path)
        if data is None and not os.path.isfile(path):
            skipped.append({"audio": path or f"row {index}", "reason": "missing file"})
            continue
        if id_columns:
            key = "_".join(str(row[c]) for c in id_columns)
        elif data is not None:
            key = hashlib.sha1(data).hexdigest()[:16]
        else:
            key = path
        captions = []
        for column in caption_columns:
            value = row[column]
            value = value if isinstance(value, list) else [value]
            if caption_separator is not None:
                value = [part.strip() for v in value if isinstance(v, str) for part in v.split(caption_separator)]
            captions += value
        usable = _usable_captions(captions)
        if not usable:
            skipped.append({"audio": path or f"row {index}", "reason": "no caption"})
            continue
        empty_captions += len(captions) - len(usable) if caption_separator is None else 0
        counts[len(usable)] = counts.get(len(usable), 0) + 1
        if data is not None and folder is not None:
            path, data = audio_file_for(data, folder, path or f"{key}.audio"), None
        for caption in usable:
            rows["audio_path"].append(path if data is None else "")
            rows["audio_bytes"].append(data)
            rows["audio_id"].append(f"{dataset_id}/{copy_split}/{key}")
            rows["caption"].append(caption)
            rows["source"].append(dataset_id)
    _report_skipped(dataset_id, skipped, empty_captions)
    if caption_separator is not None:
        logger.warning(f"{dataset_id}: captions split on {caption_separator!r}; clips by number of captions: "
                       + ", ".join(f"{n}: {c}" for n, c in sorted(counts.items())))  # fmt: skip
    dataset = Dataset.from_dict(rows, features=FEATURES)
    if folder is not None:  # the listing the other processes read
        os.makedirs(folder, exist_ok=True)
        dataset.to_json(listing + ".partial", lines=True)
        os.replace(listing + ".partial", listing)
        with open(os.path.join(folder, "skipped.json"), "w") as handle:
            json.dump(skipped, handle)
    return dataset, skipped


def _remote_bytes(url: str) -> bytes | None:
    """The bytes of a file a streamed dataset names by URL (`hf://...`), read with `datasets`' own opener."""
    from datasets.utils.file_utils import xopen

    try:
        with xopen(url, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _stream(dataset_id: str, split: str, load_kwargs: dict):
    """
    `load_dataset(..., streaming=True)`. Parquet sources (the Hub's) are read 16 rows at a time without pre-buffering
    (the Parquet builder's `batch_size` and `fragment_scan_options`): with its defaults, a row group of audio at a time
    and the buffers it keeps grow the process by most of the file (measured in benchmarks/hub_data_memory.py).
    """
    import pyarrow.dataset

    parquet = {"batch_size": 16, "fragment_scan_options": pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)}
    try:
        try:
            return load_dataset(dataset_id, split=split, streaming=True, **parquet, **load_kwargs)
        except TypeError as error:  # another builder (audiofolder, csv, json): no such options
            if "unexpected keyword argument" not in str(error):
                raise
            return load_dataset(dataset_id, split=split, streaming=True, **load_kwargs)
    except RuntimeError as error:
        if "scripts are no longer supported" in str(error):
            raise ValueError(f"{dataset_id} is a dataset loading script, which datasets 4 and newer do not run: use a "
                             "copy in Parquet (e.g. its refs/convert/parquet branch) or an audiofolder.") from None  # fmt: skip
        raise


def _listed_rows(listing: str) -> tuple[Dataset, list[dict]]:
    rows = {column: [] for column in COLUMNS}
    with open(listing) as handle:
        for line in handle:
            row = json.loads(line)
            for column in COLUMNS:
                rows[column].append(row[column])
    with open(os.path.join(os.path.dirname(listing), "skipped.json")) as handle:
        skipped = json.load(handle)
    return Dataset.from_dict(rows, features=FEATURES), skipped


def add_hub_arguments(group, split: str):
    """The options of `--hub_dataset` (train.py, evaluate_retrieval.py): None defers to the copy's `HUB_LAYOUTS`."""
    group.add_argument("--hub_dataset", nargs="+", default=[],
                       help="Hub dataset ids or load_dataset sources (local Parquet folders, 'parquet' with "
                            f"--hub_data_files) of captioned audio; known copies: {', '.join(HUB_LAYOUTS)}.")  # fmt: skip
    group.add_argument("--hub_split", nargs="+", default=[split],
                       help=f"Split of each --hub_dataset (one for all, or one each; default {split}; Clotho's names "
                            "map to a copy's own, e.g. evaluation -> test).")  # fmt: skip
    group.add_argument("--hub_audio_column", help="Audio column (default: the copy's, else 'audio').")
    group.add_argument("--hub_caption_columns", nargs="+", help="Caption column(s) (default: the copy's, else 'caption').")
    group.add_argument("--hub_id_columns", nargs="+",
                       help="Column(s) that name a clip, e.g. youtube_id start_time (default: the copy's, else the audio's bytes).")
    group.add_argument("--hub_caption_separator",
                       help="Captions joined in one string with this between them, split back (CLAPv2/Clotho: '.').")
    group.add_argument("--hub_config", help="load_dataset's configuration name.")
    group.add_argument("--hub_data_files", nargs="+", help="load_dataset's data_files.")
    group.add_argument("--hub_field", help="load_dataset's field (JSON files whose rows are under one key).")


def load_hub_datasets(args, audio_dir: str, write: bool = True) -> list[tuple[Dataset, list[dict]]]:
    """Every `--hub_dataset` of `args` (`add_hub_arguments`), its audio written once into `audio_dir`."""
    if len(args.hub_split) not in (1, len(args.hub_dataset)):
        raise ValueError(f"--hub_split: give one split, or one for each of the {len(args.hub_dataset)} --hub_dataset.")
    splits = args.hub_split * len(args.hub_dataset) if len(args.hub_split) == 1 else args.hub_split
    options = {name: value for name, value in (("name", args.hub_config), ("data_files", args.hub_data_files),
                                               ("field", args.hub_field)) if value is not None}  # fmt: skip
    return [
        load_hub_dataset(dataset_id, split, args.hub_audio_column, args.hub_caption_columns, args.hub_id_columns,
                         args.hub_caption_separator, audio_dir, write, **options)  # fmt: skip
        for dataset_id, split in zip(args.hub_dataset, splits)
    ]


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


def split_holding_out(dataset: Dataset, clip_ids: set[str], source: str) -> DatasetDict:
    """
    `split_by_clip` with the validation clips given: the rows of `clip_ids` (the clips an earlier stage held out,
    `source` names where they were read) are the validation set, the rest train.
    """
    is_validation = np.array([audio_id in clip_ids for audio_id in dataset["audio_id"]])
    if not is_validation.any():
        raise ValueError(f"None of the {len(clip_ids)} clips held out in {source} is in this training data: it cannot "
                         "hold them out again (give --validation_dir, or draw new ones with --num_validation).")  # fmt: skip
    indices = np.arange(len(dataset))
    return DatasetDict(train=dataset.select(indices[~is_validation]), validation=dataset.select(indices[is_validation]))


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
    "AUDIOCAPS_FILE_PATTERNS",
    "HUB_LAYOUTS",
    "HubLayout",
    "add_hub_arguments",
    "clean_caption",
    "clotho_layout",
    "combine",
    "load_audiocaps",
    "load_audiofolder",
    "load_clotho",
    "load_hub_dataset",
    "load_hub_datasets",
    "load_wavcaps",
    "split_by_clip",
    "split_holding_out",
    "with_cache_keys",
]
