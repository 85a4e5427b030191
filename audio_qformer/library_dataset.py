# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""
A sound library as data: its windows as a `datasets.Dataset` (`export`: one row per window, written as Parquet or
pushed to the Hub) and such a dataset opened as a library again without embedding anything (`open_export`); also
`open_dataset`, which finds a dataset (saved, Parquet, an audio folder, a Hub id) for `index` and `import`.
"""

import hashlib
import json
import os

import numpy as np

from audio_io import audio_files
from audio_qformer.indexing import LIBRARY_FILES, check_dataset, lock_for_indexing, stopping_when_disk_full
from audio_qformer.model_loading import load_model
from audio_qformer.identity import weights_fingerprint


# Columns of an exported library, one row per searched window. The model and window settings repeat on every row
from audio_qformer.store import write_json_atomically


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
            # are embedded alike. Optional: older exports lack them (float32, exact).
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


def open_export(library_class, dataset, directory: str, model_name_or_path: str | None = None, device="cpu",
                split: str = "train"):
    """
    Open a library exported by `export` (`AudioLibrary.to_dataset`) (a `datasets.Dataset`, or where `open_dataset` finds one: the folder
    `audio-qformer export` wrote, its Parquet files' folder, a Hub dataset id) as the library folder `directory`,
    without embedding anything: its windows are stored as they are. The model is the dataset's `model` (or the one
    given) and must have the dataset's `model_identity`. An existing library at `directory` must have the same
    model and windows: the dataset's files it does not list are added, and the files it lists keep their own
    entries (a file changed since the export keeps its new embeddings).
    """
    name = dataset if isinstance(dataset, str) else (dataset.info.dataset_name or "the dataset")
    if isinstance(dataset, str):
        dataset = open_dataset(dataset, split)
    check_dataset(dataset, name, EXPORT_COLUMNS)
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
    # Captions only when the export has them: one without is no reason to refuse a library that stores them.
    library = library_class(directory, model, processor, model_name, create=True, captions=captions or None, **windows,
                            **encoder)  # fmt: skip
    lock = lock_for_indexing(library)
    try:
        with stopping_when_disk_full(directory):
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
            write_json_atomically(os.path.join(directory, LIBRARY_FILES), library.files)
    finally:
        lock.close()
    library.files_changed()
    return library


def export(library, cache_dir: str | None = None):
    """
    The library as a `datasets.Dataset` (`library_features`): one row per window of the files it searches, in the
    order `search` reads them, with the model's id and identity. Write it with `to_parquet` or `push_to_hub`;
    `open_export` opens it as a library again. Rows are generated into `cache_dir` (default: the `datasets`
    cache) by `Dataset.from_generator`, so a library larger than RAM is never held in memory.

    BEATs tokens are not exported (at 768 wide, about 50 times the embeddings): re-ranking a library opened from
    the dataset decodes each candidate's audio again, which must then be at its `path`.
    """
    from datasets import Dataset

    library._live_windows()  # refuses an empty or unfinished library, as search does
    keys = library.live_keys()
    queries, dim = library.model.config.num_query_tokens, library.model.config.embed_dim
    settings = {name: library.config[name] for name in ("model", "model_identity", "window_seconds", "hop_seconds")}
    # Libraries made before these settings existed ran the exact float32 encoder.
    settings |= {"beats_dtype": library.config.get("beats_dtype", "float32"),
                 "fast_cpu_encoder": library.config.get("fast_cpu_encoder", False)}  # fmt: skip

    def rows():
        for key in keys:
            meta = library.embeddings.metadata(key)
            embeds = np.asarray(library.embeddings.get(key)).reshape(-1, queries, dim)
            for start, window in zip(meta["starts"], embeds):
                yield {"path": meta["path"], "start_seconds": start / library.sampling_rate,
                       "file_seconds": meta["seconds"], "file_key": key, "audio_embeds": window, **settings,
                       "caption": meta.get("caption")}  # fmt: skip

    # `from_generator` would hash the generator (and with it the model) to name its cache; the library's state
    # names it instead, so an export of a changed library is never read from the cache.
    state = json.dumps([os.path.abspath(library.directory), library.config, keys, library.embeddings.shard_array(0).shape[0]])
    return Dataset.from_generator(rows, features=library_features(queries, dim), cache_dir=cache_dir,
                                  fingerprint=hashlib.blake2b(state.encode(), digest_size=16).hexdigest())  # fmt: skip


__all__ = ["EXPORT_COLUMNS", "export", "library_features", "open_dataset", "open_export"]
