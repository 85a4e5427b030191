# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""
Indexing a sound library: listing the files of a folder (or a dataset's rows), keying them, sharing the new ones
between the processes of a launch (equal in bytes), decoding ahead of the model, embedding, storing entry by entry,
consolidating the shards and writing the file list, under the library's lock. `AudioLibrary.index` calls `index`.
"""

import contextlib
import errno
import heapq
import json
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm
from transformers.utils import logging

from audio_io import AudioLoadError, audio_files, load_audio
from audio_qformer.store import audio_file_for, write_json_atomically


logger = logging.get_logger(__name__)
LIBRARY_FILES = "files.json"  # the files of each indexed folder, replaced atomically at the end of an index run
# Where `index` writes the audio of dataset rows that carry bytes rather than a local file (a Hub dataset's Parquet):
# inside the library, so that hits are playable files and the library travels whole, as with its own `sounds/`.
DATASET_SOUNDS = "sounds"


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
def stopping_when_disk_full(directory: str):
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


def index(library, source, batch_size: int = 8, show_progress: bool = True, state=None, audio_column: str = "audio",
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
    (`ArrayStore.consolidate`, so the library is the one a single process would build) and writes the file list.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str) and not os.path.isdir(source):
        raise NotADirectoryError(f"{os.path.abspath(source)}: not a folder")
    several = state is not None and state.num_processes > 1
    lock = lock_for_indexing(library, state if several else None)
    try:
        # A full disk stops the run where it is: every write is durable entry by entry, so what is stored stays.
        with stopping_when_disk_full(library.directory):
            if isinstance(source, str):
                folders, missing = {os.path.abspath(source): audio_files(os.path.abspath(source))}, []
            else:  # one process writes the rows' audio; the others wait for it at the start of `_index`
                write = not several or state.is_main_process
                folders, missing = _dataset_files(library, source, audio_column, dataset_name, write)
            return _index(library, folders, missing, batch_size, show_progress, state, several)
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def lock_for_indexing(library, state=None):
    """
    The library's `index.lock`, held by one run at a time (the main process of a launch holds it for all); a
    second run stops with `LibraryBusyError` instead of interleaving its writes. Searching needs no lock: it
    reads complete entries and the file list, which is replaced atomically.
    """
    import fcntl

    handle, error = None, None
    if state is None or state.is_main_process:
        handle = open(os.path.join(library.directory, "index.lock"), "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            handle = None
            error = (f"{library.directory} is being indexed by another run (it holds {library.directory}/index.lock): "
                     "wait for that run to end, then index again (already stored files are kept).")  # fmt: skip
    if state is not None:  # every process of the launch learns the outcome, so none waits for the others forever
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error:
        raise LibraryBusyError(error)
    return handle


def _dataset_files(library, dataset, audio_column: str, dataset_name: str | None, write: bool):
    """The files of a dataset's rows (`index`), `{folder: paths}`, and the rows that have no audio."""
    name = dataset_name or dataset.info.dataset_name or "dataset"
    short = os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name  # a local folder: its name
    folder = os.path.join(os.path.abspath(library.directory), DATASET_SOUNDS, re.sub(r"[^\w.-]+", "-", short).strip("-."))
    local, copied, missing = [], [], []
    for row, (path, data) in enumerate(dataset_audio(dataset, audio_column, name)):
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


def _index(library, folders, missing, batch_size, show_progress, state, several) -> dict:
    if several:  # every process sees the same stored files before the new ones are shared out
        state.wait_for_everyone()
        library.embeddings.reload()
        library.tokens.reload()
    paths = list(dict.fromkeys(path for group in folders.values() for path in group))
    keys = {path: library.paths.key(path) for path in paths}
    todo = [path for path in paths if keys[path] not in library.embeddings]
    new_files, shard = len(todo), 0
    if several:
        share = balanced_shares([_file_size(path) for path in todo], state.num_processes)[state.process_index]
        todo, shard = [todo[i] for i in share], state.process_index
    failed, pending, pending_windows = [], [], 0

    def flush():
        flat = [window for _, _, _, windows in pending for window in windows]
        if not flat:
            return
        embeds, tokens = library.encoder.embed_waveforms(flat, batch_size)
        embeds = embeds.flatten(1).numpy()
        firsts = np.cumsum([0] + [len(windows) for _, _, _, windows in pending])[:-1]
        captions = library.encoder.captions([tokens[first] for first in firsts]) if library.config.get("captions") else None
        rows, token_items = [], []
        for index, ((path, duration, starts, windows), first) in enumerate(zip(pending, firsts)):
            count = len(windows)
            token_items += [(f"{keys[path]}#{i}", tokens[first + i], {}) for i in range(count)]
            metadata = {"path": library.paths.stored(path), "seconds": duration, "starts": starts}
            if captions is not None:
                metadata["caption"] = captions[index]
            rows.append((keys[path], embeds[first : first + count], metadata))
        if library.config["keep_tokens"]:
            library.tokens.append(token_items, shard)  # before the embeddings: a stored embedding has its tokens
        library.embeddings.append(rows, shard)
        pending.clear()

    # Closed on an error too (a full disk), so that the error message starts a line of its own.
    with tqdm(total=len(todo), desc="Indexing", unit="file", disable=not show_progress) as progress:
        for path, waveform in decoded(todo, library.sampling_rate, ahead=batch_size):  # the next batch decodes while this one embeds
            progress.update(1)
            if isinstance(waveform, AudioLoadError):
                failed.append({"audio": path, "reason": str(waveform)})
                continue
            starts, windows = library.encoder.windows(waveform)
            pending.append((path, waveform.shape[0] / library.sampling_rate, starts, windows))
            pending_windows += len(windows)
            if pending_windows >= batch_size:
                flush()
                pending_windows = 0
        flush()
    if several:
        state.wait_for_everyone()
    if not several or state.is_main_process:
        # After several processes, or a rerun of a launch that was killed before it consolidated: one shard again.
        if several or any(shard for shard, _, _ in map(library.embeddings.location, library.embeddings.keys())):
            library.embeddings.consolidate()
        for root, group in folders.items():
            library.files[library.paths.stored(root)] = {
                library.paths.stored(path): keys[path] for path in group if keys[path] in library.embeddings
            }
        write_json_atomically(os.path.join(library.directory, LIBRARY_FILES), library.files)
    if several:
        state.wait_for_everyone()
        library.embeddings.reload()
        library.tokens.reload()
        with open(os.path.join(library.directory, LIBRARY_FILES)) as handle:
            library.files = json.load(handle)
    library.files_changed()
    unreadable = len(failed)
    if not several or state.is_main_process:  # each process would report the same rows
        failed += missing
    if failed:
        with open(os.path.join(library.directory, "failures.jsonl"), "a") as handle:
            handle.writelines(json.dumps(f) + "\n" for f in failed)
        shown = "; ".join(f"{f['audio']} ({f['reason']})" for f in failed[:20])
        more = f" and {len(failed) - 20} more (see failures.jsonl)" if len(failed) > 20 else ""
        logger.warning(f"{len(failed)} file(s) could not be read and were skipped: {shown}{more}")
    return {"files": len(paths) + len(missing), "embedded": len(todo) - unreadable, "reused": len(paths) - new_files,
            "failed": failed}  # fmt: skip


def decoded(paths: list[str], sampling_rate: int, ahead: int = 8):
    """
    `(path, waveform or AudioLoadError)` in order, decoded by a thread up to `ahead` files before the model needs
    them: decoding (soundfile, soxr: C code that releases the GIL) overlaps embedding instead of pausing it.
    """

    def decode(path):
        try:
            return load_audio(path, sampling_rate=sampling_rate)
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


def check_dataset(dataset, name: str, columns) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{name}: no column(s) {missing}; its columns are {dataset.column_names}.")
    if len(dataset) == 0:
        raise ValueError(f"{name} has no rows.")


def dataset_audio(dataset, audio_column: str, name: str):
    """
    `(path, bytes or None)` of every row's audio, undecoded (`Audio(decode=False)`, as `audio_text_data.load_hub_dataset`
    reads it: decoding is `audio_io.load_audio`'s, so `datasets`' torchcodec decoder is not needed).
    """
    from datasets import Audio, Value

    check_dataset(dataset, f"{name} (--hub_audio_column {audio_column})", [audio_column])
    feature = dataset.features[audio_column]
    if isinstance(feature, Audio):
        dataset = dataset.cast_column(audio_column, Audio(decode=False))
    elif not (feature == Value("string") or (isinstance(feature, dict) and {"path", "bytes"} <= set(feature))):
        raise ValueError(f"{name}: the column {audio_column!r} holds {feature}, not audio (Audio, or file paths).")
    for batch in dataset.select_columns([audio_column]).iter(batch_size=64):
        for audio in batch[audio_column]:
            yield (audio.get("path"), audio.get("bytes")) if isinstance(audio, dict) else (audio, None)


__all__ = ["LibraryBusyError", "LibraryDiskFullError", "balanced_shares", "check_dataset", "dataset_audio", "decoded", "index",
           "lock_for_indexing", "stopping_when_disk_full"]
