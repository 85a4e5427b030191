# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""The sound library: a folder of audio embedded once with the audio Q-Former, searchable by text or by example.

    library = AudioLibrary.load("my-library")               # or AudioLibrary(dir, *load_model(m), m, create=True)
    library.index("/path/to/sounds")                        # resumable; later runs embed new or changed files only
    library.search(["a dog barks"], k=10, rerank=16)        # ranked files, best window each
    library.similar("/path/to/sounds/example.wav", k=10)

The report's inference: every clip's audio embeddings (32 query tokens x 256) are computed once and stored; a text's
embedding is scored against them by the model's score (cosine of the best query token, `AudioQFormerModel.score`),
computed in chunks over the stored float16 embeddings by `vector_search.exact_search` (or its FAISS index for large
libraries); optionally the matching head re-ranks the top k. Files longer than `WINDOW_SECONDS` are cut into overlapping windows
(`HOP_SECONDS` apart, the last one ending with the file) and a file scores as its best window.

A library folder holds `library.json` (the model it was built with and its identity hash, the window settings),
`embeddings/` (one row of 32 x 256 float16 per window, memory-mapped) and, with `keep_tokens=True`, `tokens/`
(each window's BEATs tokens, so re-ranking needs no audio decoding), both in the crash-safe `FeatureCache` format,
and `files.json` (the files of each indexed folder, replaced atomically at the end of an index run). Sounds kept inside
the library folder travel with it: copied or cloned elsewhere (a Space), it needs no embedding again. The command
line over it is `audio_search.py` (`audio-qformer`).

A library also travels as data: `to_dataset` gives a `datasets.Dataset` of its windows (path, start, 32 x 256
embeddings, the model's id and identity) to write as Parquet or push to the Hub, `from_dataset` opens one as a library
again without embedding anything, and `index` also takes a `datasets.Dataset` of audio (a Hub dataset, a folder
`save_to_disk` wrote) instead of a folder.
"""

import contextlib
import errno
import hashlib
import heapq
import json
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from audio_io import AUDIO_EXTENSIONS, HOP_SECONDS, WINDOW_SECONDS, AudioLoadError, audio_files, load_audio, window_starts
from audio_qformer.store import FeatureCache, audio_file_for, clip_key, weights_fingerprint, write_atomically
from audio_qformer.retrieval import rerank_with_matching_head, tokenize_texts
from audio_qformer.vector_search import exact_search


logger = logging.get_logger(__name__)

LIBRARY_CONFIG = "library.json"
BEATS_DTYPES = ("float32", "bfloat16")
# What the app's libraries (so a Space's too) store beside the embeddings: each file's caption, shown with each hit,
# and the BEATs tokens, so that its re-rank switch answers in about a second instead of running BEATs again.
BROWSING_LIBRARY = {"captions": True, "keep_tokens": True}
LIBRARY_FILES = "files.json"
# Where `index` writes the audio of dataset rows that carry bytes rather than a local file (a Hub dataset's Parquet):
# inside the library, so that hits are playable files and the library travels whole, as with its own `sounds/`.
DATASET_SOUNDS = "sounds"


def load_model(name_or_path: str, device: str | torch.device = "cpu"):
    """The model (eval mode) and processor saved at a path or Hub id."""
    from transformers import BertTokenizer

    from modeling_audio_qformer import AudioQFormerModel
    from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor

    # This project's classes, not the copies saved with the model: no remote code runs. The Q-Former reads BERT's
    # vocabulary, so its tokenizer is a BERT tokenizer (AutoTokenizer would look for remote code in the config).
    model = AudioQFormerModel.from_pretrained(name_or_path).to(device).eval()
    feature_extractor = BeatsFeatureExtractor.from_pretrained(name_or_path)
    return model, AudioQFormerProcessor(feature_extractor, BertTokenizer.from_pretrained(name_or_path))


def _write_json_atomically(path: str, value):
    write_atomically(path, json.dumps(value, indent=1).encode())


# --- the library as a `datasets` dataset -----------------------------------------------------------------------------

# Columns of an exported library, one row per searched window. The model and window settings repeat on every row
# because a row is all that `load_dataset` returns: `to_parquet` keeps only the features in the Parquet schema, and the
# dataset card is not read back; Parquet's dictionary encoding stores a repeated value once per row group.
EXPORT_COLUMNS = ("path", "start_seconds", "file_seconds", "file_key", "audio_embeds", "model", "model_identity",
                  "window_seconds", "hop_seconds")  # fmt: skip


def library_features(num_query_tokens: int, embed_dim: int):
    """The `datasets.Features` of an exported library (see `AudioLibrary.to_dataset`)."""
    from datasets import Array2D, Features, Value

    return Features(
        {
            "path": Value("string"),  # as the library stores it: relative to the library folder for its own sounds
            "start_seconds": Value("float64"),  # where the window starts in the file
            "file_seconds": Value("float64"),
            "file_key": Value("string"),  # content hash, or path, size and time: an index run recognises the file
            # As stored (float16), so a library opened from its export searches exactly the same numbers.
            "audio_embeds": Array2D((num_query_tokens, embed_dim), "float16"),
            "model": Value("string"),
            "model_identity": Value("string"),  # `weights_fingerprint` of the model that embedded the windows
            "window_seconds": Value("float64"),
            "hop_seconds": Value("float64"),
            "caption": Value("string"),  # the file's caption in a library indexed with captions, else null (optional)
            # How BEATs ran (`index --beats_dtype`, `--fast_cpu`), so that files indexed into the imported library
            # are embedded alike. Optional: exports made before 2026-12-01 lack them (float32, exact).
            "beats_dtype": Value("string"),
            "fast_cpu_encoder": Value("bool"),
        }
    )


def open_dataset(source: str, split: str = "train"):
    """
    A split of a dataset: a folder `Dataset.save_to_disk` wrote; a Parquet file; a folder of audio files (the
    `audiofolder` layout, split `train` or its subfolder named `split`: an `audio` column of the files' paths, decoded
    later by `audio_io.load_audio`, so `datasets`' torchcodec decoder is not needed); else anything `load_dataset`
    reads (a Hub id, a folder of Parquet files such as `audio-qformer export` writes).
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    saved = ("state.json", "dataset_dict.json")  # what `save_to_disk` writes for a Dataset, a DatasetDict
    if os.path.isdir(source) and any(os.path.exists(os.path.join(source, name)) for name in saved):
        dataset = load_from_disk(source)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"{source} has no split {split!r} (--hub_split); its splits are {list(dataset)}.")
            return dataset[split]
        if split != str(dataset.split or "train"):
            raise ValueError(f"{source} holds one split, {str(dataset.split or 'train')!r}; not {split!r} (--hub_split).")
        return dataset
    local = os.path.exists(source)
    files = ([source] if os.path.isfile(source) else [os.path.join(folder, name) for folder, _, names in os.walk(source)
                                                      for name in names]) if local else []  # fmt: skip
    parquet = [path for path in files if path.endswith(".parquet")]
    if os.path.isfile(source) and source.endswith(".parquet"):
        return _loaded(source, split, parquet, "parquet", data_files=source)
    if os.path.isdir(source) and not any(path.endswith((".parquet", ".arrow")) for path in files):
        folder = os.path.join(source, split) if os.path.isdir(os.path.join(source, split)) else source
        paths = audio_files(folder)
        if paths:  # else e.g. a folder of CSV files: `load_dataset` reads it
            if folder == source and split != "train":
                raise ValueError(f"{source} has no subfolder {split!r} (--hub_split): its audio files are the split 'train'.")
            return Dataset.from_dict({"audio": paths}, split=split)
    if local:
        return _loaded(source, split, parquet, source)
    if os.path.isabs(source) or source.startswith(".") or source.count("/") > 1 or source.endswith(".parquet"):
        raise FileNotFoundError(f"{source}: no such file or folder (and not a Hub id, which is NAME or NAMESPACE/NAME).")
    try:
        return load_dataset(source, split=split)
    except (ConnectionError, OSError) as error:  # `datasets`' "couldn't reach" errors, a Hub id not found
        raise FileNotFoundError(f"{source}: no such folder here, and no Hub dataset by that id could be read ({error})") from error


def _loaded(source: str, split: str, parquet_files: list[str], *args, **kwargs):
    """
    `load_dataset(*args, split=split, **kwargs)` of a local `source` (whose Parquet files are `parquet_files`), an
    empty one refused in this module's words.
    """
    import pyarrow.parquet as pq
    from datasets import load_dataset

    empty = f"{source} has no rows (split {split!r})."
    # `datasets` fails on Parquet files without rows in several ways ("corresponds to no data", a generation error).
    if parquet_files and all(pq.ParquetFile(path).metadata.num_rows == 0 for path in parquet_files):
        raise ValueError(empty)
    try:
        return load_dataset(*args, split=split, **kwargs)
    except ValueError as error:
        if "corresponds to no data" in str(error):  # e.g. a split whose files are empty beside others that are not
            raise ValueError(empty) from error
        raise


def model_reference(name_or_path: str | None) -> str | None:
    """
    How a library records its model: a local folder as its absolute path (the library is then usable from any working
    directory), a Hub id as it is.
    """
    return os.path.abspath(name_or_path) if name_or_path and os.path.isdir(name_or_path) else name_or_path


def _check_dataset(dataset, name: str, columns) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{name}: no column(s) {missing}; its columns are {dataset.column_names}.")
    if len(dataset) == 0:
        raise ValueError(f"{name} has no rows.")


def _only_value(dataset, column: str, name: str):
    values = dataset.unique(column)
    if len(values) != 1:
        raise ValueError(f"{name}: the column {column!r} must hold one value for the whole library; it holds {values}.")
    return values[0]


def _stored_entries(dataset, name: str, sampling_rate: int, batch_size: int = 1024):
    """
    The library entries of an exported dataset's rows, `(file_key, embeddings (windows, Q*D) float16, metadata)` per
    file, in row order. A file's windows must be consecutive rows, as `to_dataset` writes them.
    """
    seen, current = set(), None
    has_captions = "caption" in dataset.column_names  # exports made before captions lack the column
    columns = dataset.select_columns(["path", "start_seconds", "file_seconds", "file_key", "audio_embeds"]
                                     + ["caption"] * has_captions)  # fmt: skip
    # Arrays for the embeddings only: `datasets`' numpy format reads float64 columns as float32.
    for batch in columns.with_format("numpy", columns=["audio_embeds"], output_all_columns=True).iter(batch_size=batch_size):
        embeds = np.asarray(batch["audio_embeds"], dtype=np.float16).reshape(len(batch["file_key"]), -1)
        for i, key in enumerate(batch["file_key"]):
            if current is None or key != current[0]:
                if current is not None:
                    yield current[0], np.stack(current[1]), current[2]
                if key in seen:
                    raise ValueError(f"{name}: the windows of {batch['path'][i]} (file_key {key}) are not consecutive rows.")
                seen.add(key)
                current = (key, [], {"path": str(batch["path"][i]), "seconds": float(batch["file_seconds"][i]), "starts": []})
                if has_captions and batch["caption"][i] is not None:
                    current[2]["caption"] = batch["caption"][i]
            current[1].append(embeds[i])
            current[2]["starts"].append(int(round(float(batch["start_seconds"][i]) * sampling_rate)))
    if current is not None:
        yield current[0], np.stack(current[1]), current[2]


def _folders_of(paths: list[str]) -> dict[str, list[str]]:
    """
    Stored paths grouped by the deepest folder that holds them (relative and absolute paths apart), as `files.json`
    records an indexed folder.
    """
    groups: dict[bool, list[str]] = {}
    for path in paths:
        groups.setdefault(os.path.isabs(path), []).append(path)
    return {(os.path.commonpath([os.path.dirname(p) or "." for p in group]) or "."): group for group in groups.values()}


def _dataset_audio(dataset, audio_column: str, name: str):
    """
    `(path, bytes or None)` of every row's audio, undecoded (`Audio(decode=False)`, as `audio_text_data.load_hub_dataset`
    reads it: decoding is `audio_io.load_audio`'s, so `datasets`' torchcodec decoder is not needed).
    """
    from datasets import Audio, Value

    _check_dataset(dataset, f"{name} (--hub_audio_column {audio_column})", [audio_column])
    feature = dataset.features[audio_column]
    if isinstance(feature, Audio):
        dataset = dataset.cast_column(audio_column, Audio(decode=False))
    elif not (feature == Value("string") or (isinstance(feature, dict) and {"path", "bytes"} <= set(feature))):
        raise ValueError(f"{name}: the column {audio_column!r} holds {feature}, not audio (Audio, or file paths).")
    for batch in dataset.select_columns([audio_column]).iter(batch_size=64):
        for audio in batch[audio_column]:
            yield (audio.get("path"), audio.get("bytes")) if isinstance(audio, dict) else (audio, None)


def balanced_shares(sizes: list[int], num_shares: int) -> list[list[int]]:
    """
    The indices of `sizes` dealt into `num_shares` shares of about equal total size, each share in ascending order:
    largest first, each to the share with the least so far (ties: the lower share). The same sizes give the same
    shares, so every process of a launch computes them alike. Shares by size rather than by count (as Accelerate's
    `split_between_processes`): a library's file sizes, and so its durations, span orders of magnitude, and a launch
    lasts as long as its slowest process.
    """
    totals = [(0, share) for share in range(num_shares)]  # a heap of (total size, share)
    shares = [[] for _ in range(num_shares)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        total, share = heapq.heappop(totals)
        shares[share].append(index)
        heapq.heappush(totals, (total + sizes[index], share))
    return [sorted(share) for share in shares]


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # gone since it was listed: its process reports it unreadable
        return 0


class LibraryBusyError(RuntimeError):
    """Another run is indexing the library."""


class LibraryDiskFullError(OSError):
    """The disk holding the library filled up (or its quota) while writing; what was stored before stays searchable."""


@contextlib.contextmanager
def _stopping_when_disk_full(directory: str):
    """Turn a full disk (ENOSPC, EDQUOT) while writing the library into `LibraryDiskFullError`, which names it."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(error, LibraryDiskFullError):
            raise
        full = LibraryDiskFullError(
            f"The disk holding the library {directory} is full ({error.strerror}): free some space there, then run "
            "`audio-qformer index` again; the files stored so far stay searchable and are not embedded again."
        )
        full.errno = error.errno
        raise full from error


@dataclass
class SearchHit:
    """
    One ranked file. `score` is the cosine, or for a re-ranked hit match logit + cosine. Re-ranked hits (the first
    `rerank` of a search) come first, in `score` order; the hits after them follow in cosine order.
    """

    path: str
    score: float
    cosine: float
    start_seconds: float  # where the best-matching window starts (0 for files within one window)
    match_logit: float | None = None
    caption: str | None = None  # the model's caption of the file, in a library indexed with captions


class AudioLibrary:
    """
    Stored audio embeddings of a sound library, searchable by text (`search`) or by an example file (`similar`).

    Args:
        directory (`str`): the library folder (created by `index` when `create=True`).
        model ([`AudioQFormerModel`]) and processor ([`AudioQFormerProcessor`]): the model that embeds; an existing
            library refuses a model with other weights.
        model_name (`str`, *optional*): where the model comes from, recorded so that `AudioLibrary.load` finds it: a
            Hub id, or a folder (recorded by its absolute path, `model_reference`: the library opens from anywhere).
        keep_tokens (`bool`, defaults to `False`): also store each window's BEATs tokens, for re-ranking without
            decoding audio again. Measured at the report's sizes (`benchmarks/library_storage.py`, Intel Xeon, 2
            cores): tokens take 762 kB per window against 16.5 kB for the embeddings (46 times; 511 MiB per hour of
            long audio), and make a re-rank of the top 16 take 1.15 s per query instead of 5.0 s (BEATs run again on
            the 16 candidates). Searching without re-ranking, the default, needs no tokens, so they are kept only when
            asked for (the app asks: its re-rank switch is interactive).
        fast_cpu_encoder (`bool`, defaults to `False`): on the CPU, embed audio with BEATs' fast copy
            (`beats_cpu.cpu_copy(..., "fast")`): bfloat16 on a CPU with bfloat16 units (1.8-3x the exact encoder's
            speed), int8 projections on other CPUs with AVX2 and where they measure faster than bfloat16 (1.44-2.2x
            on an AMD Zen 4, capped at AVX2 or not), each kept only where its products measured faster than float32's
            on this CPU, else the exact path with a warning; embeddings within a cosine of
            0.99999 of the exact ones. A property of the library, recorded when it is created, so that all its clips
            are embedded with the same kind of copy; an existing library keeps its own setting (which precision
            "fast" takes depends on the CPU that embeds). Otherwise the CPU runs BEATs' exact float32 copy
            (`cpu_copy(..., "float32")`: oneDNN products, the model's numbers to float32 rounding).
        captions (`bool`, defaults to `False`): also store a caption of each file, written by the model's caption
            head (`generate`, its default beam search) from the file's first window (the whole file when it fits one
            window) as it is embedded; search hits carry it. Like `fast_cpu_encoder`, fixed when the library is created.
        beats_dtype (`str`, defaults to `"float32"`): `"bfloat16"` runs BEATs in bfloat16 on any device (a bfloat16
            copy; on the CPU `beats_cpu.cpu_copy(..., "bfloat16")`) and, on a GPU, the Q-Former under bfloat16
            autocast. Fixed when the library is created.
    """

    def __init__(self, directory: str, model, processor, model_name: str | None = None, create: bool = False,
                 keep_tokens: bool = False, window_seconds: float = WINDOW_SECONDS, hop_seconds: float = HOP_SECONDS,
                 fast_cpu_encoder: bool = False, captions: bool = False, beats_dtype: str = "float32"):  # fmt: skip
        self.directory, self.model, self.processor = directory, model, processor
        self.sampling_rate = processor.feature_extractor.sampling_rate
        config_path = os.path.join(directory, LIBRARY_CONFIG)
        identity = weights_fingerprint(model)
        if os.path.exists(config_path):
            with open(config_path) as handle:
                self.config = json.load(handle)
            if self.config["model_identity"] != identity:
                raise ValueError(
                    f"The library {directory} was built with another model ({self.config.get('model')}, identity "
                    f"{self.config['model_identity']}); this model's identity is {identity}. Use that model, or "
                    "index into a new --library (libraries made before 2026-12-01 computed identities from the "
                    "model's path too: index those again)."
                )
        elif create:
            if beats_dtype not in BEATS_DTYPES:
                raise ValueError(f"beats_dtype must be one of {', '.join(BEATS_DTYPES)}; got {beats_dtype!r}.")
            if hop_seconds <= 0 or hop_seconds > window_seconds:
                raise ValueError(f"Need 0 < hop_seconds <= window_seconds; got {hop_seconds} and {window_seconds}.")
            os.makedirs(directory, exist_ok=True)
            self.config = {"format": 1, "model": model_reference(model_name), "model_identity": identity,
                           "keep_tokens": keep_tokens, "window_seconds": window_seconds, "hop_seconds": hop_seconds,
                           "fast_cpu_encoder": fast_cpu_encoder, "captions": captions, "beats_dtype": beats_dtype}  # fmt: skip
            with _stopping_when_disk_full(directory):
                _write_json_atomically(config_path, self.config)
        else:
            raise FileNotFoundError(
                f"No audio library at {directory}: build one with `audio-qformer --library {directory} index DIR --model MODEL`."
            )
        # The file list before the stored entries: an `index` run writes it after every entry it names is stored (in
        # shard 0), so while another run is appending, each listed file is found complete here.
        files_path = os.path.join(directory, LIBRARY_FILES)
        self.files: dict[str, dict[str, str]] = json.load(open(files_path)) if os.path.exists(files_path) else {}
        embed_width = model.config.num_query_tokens * model.config.embed_dim
        self.embeddings = FeatureCache(directory, "embeddings", embed_width)
        self.tokens = FeatureCache(directory, "tokens", model.config.audio_config.hidden_size)
        self._forget_listing()
        self._audio_encoder = None  # BEATs' CPU copy, built on first use (`beats_cpu.cpu_copy`)

    @classmethod
    def load(cls, directory: str, model_name_or_path: str | None = None, device="cpu") -> "AudioLibrary":
        """Open a library with the model it was built with (or the one given)."""
        config_path = os.path.join(directory, LIBRARY_CONFIG)
        if not os.path.exists(config_path):
            raise FileNotFoundError(
                f"No audio library at {directory}: build one with `audio-qformer --library {directory} index DIR --model MODEL`."
            )
        with open(config_path) as handle:
            name = model_name_or_path or json.load(handle)["model"]
        try:
            model, processor = load_model(name, device)
        except (OSError, ValueError) as error:  # a folder moved (not a valid Hub id either), or no network
            raise ValueError(f"The library {directory}'s model {name} cannot be loaded here ({error}); give the model "
                             "with --model (a saved model folder or Hub id).") from error  # fmt: skip
        return cls(directory, model, processor, name)

    def record_model(self, name_or_path: str) -> None:
        """
        Record where the library's model is found from now on (`load` opens it with that), e.g. after its folder moved:
        this library's model must have been loaded from there. A local folder is recorded by its absolute path.
        """
        self.config["model"] = model_reference(name_or_path)
        with _stopping_when_disk_full(self.directory):
            _write_json_atomically(os.path.join(self.directory, LIBRARY_CONFIG), self.config)

    @classmethod
    def from_dataset(cls, dataset, directory: str, model_name_or_path: str | None = None, device="cpu",
                     split: str = "train") -> "AudioLibrary":  # fmt: skip
        """
        Open a library exported by `to_dataset` (a `datasets.Dataset`, or where `open_dataset` finds one: the folder
        `audio-qformer export` wrote, its Parquet files' folder, a Hub dataset id) as the library folder `directory`,
        without embedding anything: its windows are stored as they are. The model is the dataset's `model` (or the one
        given) and must have the dataset's `model_identity`. An existing library at `directory` must have the same
        model and windows: the dataset's files it does not list are added, and the files it lists keep their own
        entries (a file changed since the export keeps its new embeddings).
        """
        name = dataset if isinstance(dataset, str) else (dataset.info.dataset_name or "the dataset")
        if isinstance(dataset, str):
            dataset = open_dataset(dataset, split)
        _check_dataset(dataset, name, EXPORT_COLUMNS)
        identity = _only_value(dataset, "model_identity", name)
        model_name = model_name_or_path or _only_value(dataset, "model", name)
        try:
            model, processor = load_model(model_name, device)
        except OSError as error:  # e.g. a folder on the machine that exported the library
            message = f"{name}: its model {model_name} cannot be loaded here ({error}); give it with --model."
            raise ValueError(message) from error
        if weights_fingerprint(model) != identity:
            raise ValueError(
                f"{name} was embedded by {dataset[0]['model']} (model_identity {identity}); the model {model_name} has "
                f"identity {weights_fingerprint(model)}. Open it with the model that embedded it (--model)."
            )
        shape = (model.config.num_query_tokens, model.config.embed_dim)
        if tuple(dataset.features["audio_embeds"].shape) != shape:
            raise ValueError(f"{name}: audio_embeds are {dataset.features['audio_embeds'].shape}; the model makes {shape}.")
        windows = {setting: _only_value(dataset, setting, name) for setting in ("window_seconds", "hop_seconds")}
        captions = "caption" in dataset.column_names and any(c is not None for c in dataset.unique("caption"))
        encoder = {setting: _only_value(dataset, setting, name) for setting in ("beats_dtype", "fast_cpu_encoder")
                   if setting in dataset.column_names}  # fmt: skip
        library = cls(directory, model, processor, model_name, create=True, keep_tokens=False, captions=captions,
                      **windows, **encoder)  # fmt: skip
        if any(library.config[setting] != value for setting, value in windows.items()):
            raise ValueError(f"{directory} cuts files into other windows than {name} ({windows}): open it in a new folder.")
        lock = library._lock_for_indexing()
        try:
            with _stopping_when_disk_full(directory):
                paths, batch = {}, []
                for entry in _stored_entries(dataset, name, library.sampling_rate):
                    batch.append(entry)
                    paths[entry[2]["path"]] = entry[0]
                    if len(batch) == 256:
                        library.embeddings.append(batch)
                        batch = []
                library.embeddings.append(batch)
                for folder, group in _folders_of(list(paths)).items():  # files the library already lists keep theirs
                    listed = library.files.setdefault(folder, {})
                    for path in group:
                        listed.setdefault(path, paths[path])
                _write_json_atomically(os.path.join(directory, LIBRARY_FILES), library.files)
        finally:
            lock.close()
        library._forget_listing()
        return library

    def to_dataset(self, cache_dir: str | None = None):
        """
        The library as a `datasets.Dataset` (`library_features`): one row per window of the files it searches, in the
        order `search` reads them, with the model's id and identity. Write it with `to_parquet` or `push_to_hub`;
        `from_dataset` opens it as a library again. Rows are generated into `cache_dir` (default: the `datasets`
        cache) by `Dataset.from_generator`, so a library larger than RAM is never held in memory.

        BEATs tokens are not exported (at 768 wide, about 50 times the embeddings): re-ranking a library opened from
        the dataset decodes each candidate's audio again, which must then be at its `path`.
        """
        from datasets import Dataset

        self._live_windows()  # refuses an empty or unfinished library, as search does
        keys = self.live_keys()
        queries, dim = self.model.config.num_query_tokens, self.model.config.embed_dim
        settings = {name: self.config[name] for name in ("model", "model_identity", "window_seconds", "hop_seconds")}
        # Libraries made before these settings existed ran the exact float32 encoder.
        settings |= {"beats_dtype": self.config.get("beats_dtype", "float32"),
                     "fast_cpu_encoder": self.config.get("fast_cpu_encoder", False)}  # fmt: skip

        def rows():
            for key in keys:
                meta = self.embeddings.metadata(key)
                embeds = np.asarray(self.embeddings.get(key)).reshape(-1, queries, dim)
                for start, window in zip(meta["starts"], embeds):
                    yield {"path": meta["path"], "start_seconds": start / self.sampling_rate,
                           "file_seconds": meta["seconds"], "file_key": key, "audio_embeds": window, **settings,
                           "caption": meta.get("caption")}  # fmt: skip

        # `from_generator` would hash the generator (and with it the model) to name its cache; the library's state
        # names it instead, so an export of a changed library is never read from the cache.
        state = json.dumps([os.path.abspath(self.directory), self.config, keys, self.embeddings.shard_array(0).shape[0]])
        return Dataset.from_generator(rows, features=library_features(queries, dim), cache_dir=cache_dir,
                                      fingerprint=hashlib.blake2b(state.encode(), digest_size=16).hexdigest())  # fmt: skip

    # --- where files are --------------------------------------------------------------------------------------------

    # Files under the library's own folder (e.g. `LIB/sounds/`) make a library that can be copied or cloned whole, as a
    # Space does: they are recorded relative to it and keyed by their content, since a copy changes every path and
    # modification time. Other files are keyed by absolute path, size and modification time (no reading).

    def _inside(self, path: str) -> bool:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(self.directory)]) == os.path.abspath(self.directory)

    def _file_key(self, path: str) -> str:
        if not self._inside(path):
            return clip_key(path)
        with open(path, "rb") as handle:
            return clip_key(None, handle.read())

    def _stored_path(self, path: str) -> str:
        return os.path.relpath(path, self.directory) if self._inside(path) else os.path.abspath(path)

    def path_of(self, key: str) -> str:
        """The file of a stored key, absolute."""
        return os.path.abspath(os.path.join(self.directory, self.embeddings.metadata(key)["path"]))

    def _forget_listing(self):
        """Drop what is derived from the file list (`files`), after it changed."""
        self._live, self._listed = None, None

    def shareable_file(self, key: str) -> str | None:
        """
        The real path of the audio file listed under `key`, if it may be handed to others (the app serves nothing
        else), else None. It must be a file the library lists, with an audio file extension, inside the folder it is
        listed under after symlinks are followed (a link leading out is refused), and still the very file that was
        embedded: its key now must be `key` (the same content for files inside the library folder; elsewhere the same
        path, size and modification time to the nanosecond). So a changed file is refused until it is indexed again,
        and a path that only an imported export names is refused: its key was made where the export was made.
        """
        if self._listed is None:
            self._listed = {}
            for root, listed in self.files.items():
                for path, listed_key in listed.items():
                    self._listed.setdefault(listed_key, (root, path))
        if key not in self._listed:
            return None
        root, path = (os.path.abspath(os.path.join(self.directory, name)) for name in self._listed[key])
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if not (path.lower().endswith(AUDIO_EXTENSIONS) and real.lower().endswith(AUDIO_EXTENSIONS)):
            return None
        if os.path.commonpath([real, real_root]) != real_root or not os.path.isfile(real):
            return None
        return real if self._file_key(path) == key else None

    # --- embedding ---------------------------------------------------------------------------------------------------

    def windows(self, waveform: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
        window = int(round(self.config["window_seconds"] * self.sampling_rate))
        hop = int(round(self.config["hop_seconds"] * self.sampling_rate))
        starts = window_starts(waveform.shape[0], window, hop)
        return starts, [waveform[start : start + window] for start in starts]

    @torch.no_grad()
    def embed_waveforms(self, waveforms: list[np.ndarray], batch_size: int = 8):
        """Audio embeddings `(n, queries, embed_dim)` of 16 kHz mono waveforms, and their BEATs tokens (float16)."""
        device = next(self.model.parameters()).device
        embeds, tokens = [], []
        for start in range(0, len(waveforms), batch_size):
            inputs = self.processor.feature_extractor(
                waveforms[start : start + batch_size], sampling_rate=self.sampling_rate, return_tensors="pt"
            ).to(device)
            states, mask = self._audio_hidden_states(inputs)
            # The Q-Former under autocast on a GPU when the library asked for bfloat16 (the CPU keeps it exact).
            lower = device.type == "cuda" and self.config.get("beats_dtype") == "bfloat16"
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=lower):
                audio = self.model.get_audio_features(audio_hidden_states=states, audio_attention_mask=mask)
            embeds.append(audio.audio_embeds.float().cpu())
            lengths = mask.sum(-1).tolist()
            tokens += [s[:n].to(torch.float16).cpu().numpy() for s, n in zip(states, lengths)]
        return torch.cat(embeds), tokens

    def _audio_hidden_states(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        features, bfloat16 = inputs["input_features"], self.config.get("beats_dtype") == "bfloat16"
        if features.device.type != "cpu" and not bfloat16:
            return self.model.get_audio_hidden_states(**inputs)
        if self._audio_encoder is None:
            if features.device.type != "cpu":  # a bfloat16 copy on the GPU; the model keeps its float32 BEATs
                import copy

                self._audio_encoder = copy.deepcopy(self.model.audio_model).to(torch.bfloat16)
            else:
                from audio_qformer.beats_cpu import cpu_copy

                # Libraries made before the settings existed are exact.
                precision = "bfloat16" if bfloat16 else "fast" if self.config.get("fast_cpu_encoder") else "float32"
                self._audio_encoder, _ = cpu_copy(self.model.audio_model, precision)
        dtype = self._audio_encoder.patch_embedding.weight.dtype  # what the first layer reads, as `_run_beats` does
        with torch.no_grad():
            outputs = self._audio_encoder(features.to(dtype), inputs.get("feature_attention_mask"))
        return outputs.last_hidden_state.float(), outputs.audio_attention_mask

    def index(self, source, batch_size: int = 8, show_progress: bool = True, state=None, audio_column: str = "audio",
              dataset_name: str | None = None) -> dict:  # fmt: skip
        """
        Embed every audio file under the folder `source` not yet in the library (new or changed files), with a progress
        bar. Resumable: what a killed run stored is kept and not embedded again. Unreadable files are reported, not
        fatal, and tried again next time. Returns `{"files", "embedded", "reused", "failed": [{"audio", "reason"}]}`.

        `source` may also be a `datasets.Dataset` whose `audio_column` holds audio (an `Audio` column or file paths).
        A row whose audio is a local file is indexed as that file is from a folder. A row that carries only the encoded
        bytes (a Hub dataset's Parquet) is first written to `sounds/<dataset_name>/` inside the library, named by the
        hash of its bytes, and indexed from there, keyed by content: a second run over the dataset writes and embeds
        nothing again. A row with neither is reported in `failed`.

        With an Accelerate `PartialState` of several processes (`accelerate launch`; every process calls this), each
        process embeds its share of the new files (`balanced_shares`: equal in bytes) into its own shard and reports
        its own `embedded` and `failed`; then the main process moves the shards' embeddings into one
        (`FeatureCache.consolidate`, so the library is the one a single process would build) and writes the file list.
        """
        if isinstance(source, os.PathLike):
            source = os.fspath(source)
        if isinstance(source, str) and not os.path.isdir(source):
            raise NotADirectoryError(f"{os.path.abspath(source)}: not a folder")
        several = state is not None and state.num_processes > 1
        lock = self._lock_for_indexing(state if several else None)
        try:
            # A full disk stops the run where it is: every write is durable entry by entry, so what is stored stays.
            with _stopping_when_disk_full(self.directory):
                if isinstance(source, str):
                    folders, missing = {os.path.abspath(source): audio_files(os.path.abspath(source))}, []
                else:  # one process writes the rows' audio; the others wait for it at the start of `_index`
                    write = not several or state.is_main_process
                    folders, missing = self._dataset_files(source, audio_column, dataset_name, write)
                return self._index(folders, missing, batch_size, show_progress, state, several)
        finally:
            if lock is not None:
                lock.close()  # releases the lock

    def _lock_for_indexing(self, state=None):
        """
        The library's `index.lock`, held by one run at a time (the main process of a launch holds it for all); a
        second run stops with `LibraryBusyError` instead of interleaving its writes. Searching needs no lock: it
        reads complete entries and the file list, which is replaced atomically.
        """
        import fcntl

        handle, error = None, None
        if state is None or state.is_main_process:
            handle = open(os.path.join(self.directory, "index.lock"), "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                handle = None
                error = (f"{self.directory} is being indexed by another run (it holds {self.directory}/index.lock): "
                         "wait for that run to end, then index again (already stored files are kept).")  # fmt: skip
        if state is not None:  # every process of the launch learns the outcome, so none waits for the others forever
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error:
            raise LibraryBusyError(error)
        return handle

    def _dataset_files(self, dataset, audio_column: str, dataset_name: str | None, write: bool):
        """The files of a dataset's rows (`index`), `{folder: paths}`, and the rows that have no audio."""
        name = dataset_name or dataset.info.dataset_name or "dataset"
        short = os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name  # a local folder: its name
        folder = os.path.join(os.path.abspath(self.directory), DATASET_SOUNDS, re.sub(r"[^\w.-]+", "-", short).strip("-."))
        local, copied, missing = [], [], []
        for row, (path, data) in enumerate(_dataset_audio(dataset, audio_column, name)):
            # The row's bytes when it has them: its path is then only a name (a Hub row's `clip1.wav` is no local file).
            if data:
                copied.append(audio_file_for(data, folder, path, write))
            elif path and os.path.isfile(path):
                local.append(os.path.abspath(path))
            else:
                missing.append({"audio": path or f"{name} row {row}",
                                "reason": "no such file, and the row holds no audio bytes"})  # fmt: skip
        folders = {folder: list(dict.fromkeys(copied))} if copied else {}
        if local:
            folders[os.path.commonpath([os.path.dirname(path) for path in local])] = list(dict.fromkeys(local))
        return folders, missing

    def _index(self, folders, missing, batch_size, show_progress, state, several) -> dict:
        if several:  # every process sees the same stored files before the new ones are shared out
            state.wait_for_everyone()
            self.embeddings.reload()
            self.tokens.reload()
        paths = list(dict.fromkeys(path for group in folders.values() for path in group))
        keys = {path: self._file_key(path) for path in paths}
        todo = [path for path in paths if keys[path] not in self.embeddings]
        new_files, shard = len(todo), 0
        if several:
            share = balanced_shares([_file_size(path) for path in todo], state.num_processes)[state.process_index]
            todo, shard = [todo[i] for i in share], state.process_index
        failed, pending, pending_windows = [], [], 0

        def flush():
            flat = [window for _, _, _, windows in pending for window in windows]
            if not flat:
                return
            embeds, tokens = self.embed_waveforms(flat, batch_size)
            embeds = embeds.flatten(1).numpy()
            firsts = np.cumsum([0] + [len(windows) for _, _, _, windows in pending])[:-1]
            captions = self._captions([tokens[first] for first in firsts]) if self.config.get("captions") else None
            rows, token_items = [], []
            for index, ((path, duration, starts, windows), first) in enumerate(zip(pending, firsts)):
                count = len(windows)
                token_items += [(f"{keys[path]}#{i}", tokens[first + i], {}) for i in range(count)]
                metadata = {"path": self._stored_path(path), "seconds": duration, "starts": starts}
                if captions is not None:
                    metadata["caption"] = captions[index]
                rows.append((keys[path], embeds[first : first + count], metadata))
            if self.config["keep_tokens"]:
                self.tokens.append(token_items, shard)  # before the embeddings: a stored embedding has its tokens
            self.embeddings.append(rows, shard)
            pending.clear()

        # Closed on an error too (a full disk), so that the error message starts a line of its own.
        with tqdm(total=len(todo), desc="Indexing", unit="file", disable=not show_progress) as progress:
            for path, waveform in self._decoded(todo, ahead=batch_size):  # the next batch decodes while this one embeds
                progress.update(1)
                if isinstance(waveform, AudioLoadError):
                    failed.append({"audio": path, "reason": str(waveform)})
                    continue
                starts, windows = self.windows(waveform)
                pending.append((path, waveform.shape[0] / self.sampling_rate, starts, windows))
                pending_windows += len(windows)
                if pending_windows >= batch_size:
                    flush()
                    pending_windows = 0
            flush()
        if several:
            state.wait_for_everyone()
        if not several or state.is_main_process:
            # After several processes, or a rerun of a launch that was killed before it consolidated: one shard again.
            if several or any(shard for shard, _, _ in map(self.embeddings.location, self.embeddings.keys())):
                self.embeddings.consolidate()
            for root, group in folders.items():
                self.files[self._stored_path(root)] = {
                    self._stored_path(path): keys[path] for path in group if keys[path] in self.embeddings
                }
            _write_json_atomically(os.path.join(self.directory, LIBRARY_FILES), self.files)
        if several:
            state.wait_for_everyone()
            self.embeddings.reload()
            self.tokens.reload()
            with open(os.path.join(self.directory, LIBRARY_FILES)) as handle:
                self.files = json.load(handle)
        self._forget_listing()
        unreadable = len(failed)
        if not several or state.is_main_process:  # each process would report the same rows
            failed += missing
        if failed:
            with open(os.path.join(self.directory, "failures.jsonl"), "a") as handle:
                handle.writelines(json.dumps(f) + "\n" for f in failed)
            shown = "; ".join(f"{f['audio']} ({f['reason']})" for f in failed[:20])
            more = f" and {len(failed) - 20} more (see failures.jsonl)" if len(failed) > 20 else ""
            logger.warning(f"{len(failed)} file(s) could not be read and were skipped: {shown}{more}")
        return {"files": len(paths) + len(missing), "embedded": len(todo) - unreadable, "reused": len(paths) - new_files,
                "failed": failed}  # fmt: skip

    def _captions(self, window_tokens: list) -> list[str]:
        """Captions of windows given as BEATs tokens (the model's default generation)."""
        from audio_qformer.captioning import caption_token_arrays

        return caption_token_arrays(self.model, self.processor, window_tokens)

    def _decoded(self, paths: list[str], ahead: int = 8):
        """
        `(path, waveform or AudioLoadError)` in order, decoded by a thread up to `ahead` files before the model needs
        them: decoding (soundfile, soxr: C code that releases the GIL) overlaps embedding instead of pausing it.
        """

        def decode(path):
            try:
                return load_audio(path, sampling_rate=self.sampling_rate)
            except AudioLoadError as error:
                return error

        with ThreadPoolExecutor(max_workers=1) as pool:
            queued = deque()
            for path in paths:
                queued.append((path, pool.submit(decode, path)))
                if len(queued) > ahead:
                    path, future = queued.popleft()
                    yield path, future.result()
            while queued:
                path, future = queued.popleft()
                yield path, future.result()

    def live_keys(self) -> list[str]:
        """The stored keys of the files currently indexed (deleted files' embeddings stay stored, unsearched), sorted."""
        return sorted({key for files in self.files.values() for key in files.values()} & set(self.embeddings.keys()))

    def stored_files(self) -> list[dict]:
        """The files the library searches: `{"path", "seconds", "windows"}` each, by path."""
        files = [{"path": self.path_of(key), "seconds": self.embeddings.metadata(key)["seconds"],
                  "windows": len(self.embeddings.metadata(key)["starts"]),
                  "caption": self.embeddings.metadata(key).get("caption")} for key in self.live_keys()]  # fmt: skip
        return sorted(files, key=lambda f: f["path"])

    def failures(self) -> list[dict]:
        """Files that could not be read (`{"audio", "reason"}`, the latest reason) and are not stored since."""
        path = os.path.join(self.directory, "failures.jsonl")
        if not os.path.exists(path):
            return []
        latest = {}
        with open(path) as handle:
            for line in handle:
                try:
                    failure = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a full disk or a kill
                    continue
                latest[failure["audio"]] = failure["reason"]
        stored = {f["path"] for f in self.stored_files()}
        return [{"audio": audio, "reason": reason} for audio, reason in latest.items() if audio not in stored]

    # --- searching ---------------------------------------------------------------------------------------------------

    def _live_windows(self):
        """
        Rows of the windows of the files currently indexed, each row's file key, the rows as (n, Q, D) and the most
        windows of a file; computed once per library state (`index` resets it).
        """
        if self._live is None:
            self._live = self._find_live_windows()
        return self._live

    def _find_live_windows(self):
        keys = self.live_keys()
        if not keys and len(self.embeddings) and not self.files:  # stored by a first run that has not ended
            raise ValueError(
                f"The library {self.directory} lists no files yet: an index run is storing its first files (they are "
                "listed when it ends), or one was stopped (run `audio-qformer index` again: what it stored is kept)."
            )
        if not keys:
            raise ValueError(f"The library {self.directory} holds no files yet: run `audio-qformer index DIR` first.")
        rows, owners = [], []
        for key in keys:
            shard, offset, length = self.embeddings.location(key)
            if shard:  # searching scans shard 0; only `index` moves the other shards into it
                raise ValueError(
                    f"The library {self.directory} holds parts of a multi-process index run that did not finish: run "
                    "`audio-qformer index` on it again to complete it (nothing stored is embedded again)."
                )
            rows.extend(range(offset, offset + length))
            owners += [key] * length
        array = self.embeddings.shard_array(0)
        queries, dim = self.model.config.num_query_tokens, self.model.config.embed_dim
        rows = np.asarray(rows)
        if len(rows) != array.shape[0] or not (rows == np.arange(len(rows))).all():
            array = array[rows]  # stale windows present: gather the live ones
        max_windows = max(len(self.embeddings.metadata(key)["starts"]) for key in keys)
        return rows, owners, array.reshape(-1, queries, dim), max_windows

    def vector_index(self, build: bool = False):
        """
        The library's approximate index (`vector_search.ApproximateAudioIndex`, FAISS) over every stored window, in
        `vector_index/`: loaded, brought up to date with windows stored since, or built when `build` is set.
        """
        from audio_qformer.vector_search import ApproximateAudioIndex

        path = os.path.join(self.directory, "vector_index")
        rows = self.embeddings.shard_array(0)
        rows = rows.reshape(-1, self.model.config.num_query_tokens, self.model.config.embed_dim)
        if os.path.exists(os.path.join(path, "config.json")):
            index = ApproximateAudioIndex.load(path)
            if len(index) < rows.shape[0]:
                index.add(np.asarray(rows[len(index) :]))
                index.save(path)
            return index
        if not build:
            raise FileNotFoundError(
                f"The library {self.directory} has no vector index: build it with `audio-qformer index DIR --vector_index`."
            )
        # Product quantisation needs 256 training vectors per codebook; small libraries keep exact vectors instead.
        small = rows.shape[0] * rows.shape[1] < 256 * 39
        factory = {"index_factory": "IVF{nlist},Flat"} if small else {}  # else the measured default (IVF-PQ fast scan)
        index = ApproximateAudioIndex.build(np.asarray(rows), **factory)
        index.save(path)
        return index

    def _top_files(self, query_embeds: torch.Tensor, k: int, exclude: set[str] = frozenset(), approximate=False):
        """Per query, the best `k` files as (key, window row, cosine), each file counted once (its best window)."""
        rows, owners, array, max_windows = self._live_windows()
        if approximate:  # the index covers every stored row, stale ones included: those are skipped below
            index = self.vector_index()
            limit = min(len(index), (k + len(exclude)) * max_windows + len(index) - len(rows))
            scores, stored_rows = index.search(query_embeds, limit)
            position = {int(row): i for i, row in enumerate(rows)}
            indices = [[position.get(row, -1) for row in query_rows] for query_rows in stored_rows.tolist()]
        else:
            limit = min(len(rows), (k + len(exclude)) * max_windows)  # enough windows to hold k distinct files
            scores, indices = exact_search(query_embeds, array, limit)
            indices = indices.tolist()
        results = []
        for query_scores, query_indices in zip(scores.tolist(), indices):
            seen, hits = set(), []
            for score, index in zip(query_scores, query_indices):
                if index < 0:
                    continue
                key = owners[index]
                if key in seen or self.path_of(key) in exclude:
                    continue
                seen.add(key)
                hits.append((key, int(rows[index]), score))
                if len(hits) == k:
                    break
            results.append(hits)
        return results

    def _hit(self, key: str, row: int, cosine: float, score: float | None = None, match_logit=None) -> SearchHit:
        meta = self.embeddings.metadata(key)
        window = row - self.embeddings.location(key)[1]
        start = meta["starts"][window] / self.sampling_rate
        return SearchHit(self.path_of(key), cosine if score is None else score, cosine, start, match_logit,
                         meta.get("caption"))  # fmt: skip

    def _window_tokens(self, key_rows: list[tuple[str, int]]) -> list[np.ndarray]:
        """
        BEATs tokens of windows: stored ones, else computed again from the audio (each file decoded once, the missing
        windows through BEATs in one batch).
        """
        tokens, missing = {}, {}  # missing: file key -> its windows to compute
        for key, row in key_rows:
            window = row - self.embeddings.location(key)[1]
            if f"{key}#{window}" in self.tokens:
                tokens[key, window] = self.tokens.get(f"{key}#{window}")
            else:
                missing.setdefault(key, set()).add(window)
        if missing:
            wanted, waveforms = [], []
            for key, windows in missing.items():
                try:
                    waveform = load_audio(self.path_of(key), sampling_rate=self.sampling_rate)
                except AudioLoadError as error:
                    raise ValueError(
                        f"Re-ranking needs the BEATs tokens of {self.path_of(key)}: this library does not store them "
                        "(opened from a dataset, or indexed without --keep_tokens), and its audio cannot be read "
                        f"({error.reason}). Put the sounds at their paths, or search without --rerank."
                    ) from error
                cut = self.windows(waveform)[1]
                wanted += [(key, window) for window in sorted(windows)]
                waveforms += [cut[window] for window in sorted(windows)]
            device, batch = next(self.model.parameters()).device, 8
            for first in range(0, len(waveforms), batch):
                inputs = self.processor.feature_extractor(
                    waveforms[first : first + batch], sampling_rate=self.sampling_rate, return_tensors="pt"
                )
                states, mask = self._audio_hidden_states(inputs.to(device))
                for item, state, length in zip(wanted[first : first + batch], states, mask.sum(-1).tolist()):
                    tokens[item] = state[:length].to(torch.float16).cpu().numpy()  # as stored ones are
        return [tokens[key, row - self.embeddings.location(key)[1]] for key, row in key_rows]

    @torch.no_grad()
    def search(
        self, texts: list[str], k: int = 10, rerank: int = 0, batch_size: int = 64, approximate: bool = False
    ) -> list[list[SearchHit]]:
        """
        The `k` best files for each text. With `rerank > 0` the first `rerank` of them are re-ordered by the matching
        head (score = match logit + cosine), in one batched pass over all (text, candidate) pairs. `approximate`
        searches with the vector index (see `vector_index`) instead of scoring every window.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not text or not text.strip() for text in texts):
            raise ValueError("Search needs non-empty text queries.")
        device = next(self.model.parameters()).device
        tokens = tokenize_texts(self.processor, self.model, texts)
        text_embeds = self.model.get_text_features(**tokens.to(device)).text_embeds.float().cpu()
        found = self._top_files(text_embeds, max(k, rerank), approximate=approximate)
        if rerank <= 0:
            return [[self._hit(*hit) for hit in hits[:k]] for hits in found]
        depth = min(rerank, min(len(hits) for hits in found))
        pairs = [hits[:depth] for hits in found]
        flat = [hit for hits in pairs for hit in hits]
        candidates = torch.arange(len(flat)).view(len(texts), depth)
        cosines = torch.tensor([[cos for _, _, cos in hits] for hits in pairs])
        order, scores = rerank_with_matching_head(
            self.model, candidates, cosines, tokens["input_ids"].cpu(), tokens["attention_mask"].cpu(),
            lambda ids: self._window_tokens([flat[i][:2] for i in ids]), batch_size=batch_size,
        )  # fmt: skip
        results = []
        for q, hits in enumerate(found):
            reranked = []
            for index, score in zip(order[q].tolist(), scores[q].tolist()):
                key, row, cosine = flat[index]
                reranked.append(self._hit(key, row, cosine, score, score - cosine))
            results.append((reranked + [self._hit(*hit) for hit in hits[depth:]])[:k])
        return results

    @torch.no_grad()
    def similar(self, path: str, k: int = 10) -> list[SearchHit]:
        """The `k` files that sound most like `path` (best pair of query tokens over all windows), itself excluded."""
        if os.path.isdir(path):
            raise ValueError(f"{path} is a folder: `similar` takes one audio file.")
        waveform = load_audio(path, sampling_rate=self.sampling_rate)
        embeds, _ = self.embed_waveforms(self.windows(waveform)[1])
        query = embeds.reshape(1, -1, embeds.shape[-1])  # every query token of every window
        return [self._hit(*hit) for hit in self._top_files(query, k, exclude={os.path.abspath(path)})[0]]


__all__ = ["AudioLibrary", "LibraryBusyError", "LibraryDiskFullError", "SearchHit", "balanced_shares",
           "library_features", "load_model", "model_reference", "open_dataset"]
