# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Keyed blocks of float16 vectors on disk, crash-safe and read memory-mapped (`ArrayStore`), and the atomic writes
everything the project stores goes through.

Layout of a store's folder: per writing process `r`, `shard-r.bin` (one `(rows, hidden)` block after another) and
`shard-r.jsonl` (one line per block: key, offset, length, metadata), written in that order, so a killed writer loses at
most the block in flight: a block without its index line, or a torn last line, is cut off when the shard is opened.
"""

import contextlib
import hashlib
import json
import os

import numpy as np


def audio_file_for(data: bytes, folder: str, name: str | None = None, write: bool = True) -> str:
    """
    The file in `folder` that holds the encoded audio `data`, named by the hash of its bytes and `name`'s base name;
    written (atomically) unless it exists: named by its bytes, an existing file holds them already. With `write`
    unset only the name is computed.
    """
    digest = hashlib.blake2b(data, digest_size=8).hexdigest()
    target = os.path.join(folder, f"{digest}-{os.path.basename(name or '') or 'audio'}")
    if write and not os.path.exists(target):
        os.makedirs(folder, exist_ok=True)
        write_atomically(target, data)
    return target


def write_atomically(path: str, data: bytes):
    """Replace `path` by `data` whole or not at all: written to `path.partial`, fsynced, then renamed."""
    try:
        with open(path + ".partial", "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        with contextlib.suppress(OSError):  # e.g. a full disk: the previous `path` stays whole, and no half copy stays
            os.remove(path + ".partial")
        raise
    os.replace(path + ".partial", path)


def write_json_atomically(path: str, value):
    write_atomically(path, json.dumps(value, indent=1).encode())


class ArrayStore:
    """
    Blocks of `(rows, hidden_size)` float16 vectors under string keys, stored once and read memory-mapped: BEATs
    tokens of many clips (training's cache, in a folder named by `model_fingerprint`), or a sound library's
    embeddings and tokens (folders `embeddings/` and `tokens/`). `name` is that folder under `root`.
    """

    def __init__(self, root: str, name: str, hidden_size: int):
        self.directory = os.path.join(root, name)
        self.hidden_size = hidden_size
        self._entries: dict[str, tuple[int, int, int]] = {}  # key -> (shard, offset in tokens, tokens)
        self._metadata: dict[str, dict] = {}  # key -> extra fields stored with the entry by `append`
        self._append_offsets: dict[int, int] = {}  # shard -> rows written, once `append` has opened it
        self._failures: dict[str, str] = {}
        self._arrays: dict[int, np.memmap] = {}
        os.makedirs(self.directory, exist_ok=True)
        self.reload()

    # --- reading -----------------------------------------------------------------------------------------------------

    def _shard_paths(self, shard: int) -> tuple[str, str]:
        return os.path.join(self.directory, f"shard-{shard}.bin"), os.path.join(self.directory, f"shard-{shard}.jsonl")

    def _read_index(self, shard: int) -> tuple[list[dict], int]:
        """The complete entries of a shard and the number of valid bytes of its data file."""
        data_path, index_path = self._shard_paths(shard)
        size = os.path.getsize(data_path) if os.path.exists(data_path) else 0
        entries, end = [], 0
        with contextlib.suppress(FileNotFoundError):  # none yet, or `consolidate` just deleted the shard
            with open(index_path) as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a torn last line: the run was killed while writing it
                    block_end = (entry["offset"] + entry["length"]) * self.hidden_size * 2
                    if block_end > size:
                        break
                    entries.append(entry)
                    end = block_end
        return entries, end

    def reload(self):
        """Re-read every shard's index (after other processes have written)."""
        self._entries.clear()
        self._metadata.clear()
        self._arrays.clear()
        self._failures.clear()
        for name in sorted(os.listdir(self.directory)):
            if name.startswith("shard-") and name.endswith(".jsonl"):
                shard = int(name[len("shard-") : -len(".jsonl")])
                for entry in self._read_index(shard)[0]:
                    if entry["key"] not in self._entries:
                        self._entries[entry["key"]] = (shard, entry["offset"], entry["length"])
                        extra = {k: v for k, v in entry.items() if k not in ("key", "offset", "length")}
                        if extra:
                            self._metadata[entry["key"]] = extra
            elif name.startswith("failures-") and name.endswith(".jsonl"):
                with open(os.path.join(self.directory, name)) as handle:
                    for line in handle:
                        try:
                            failure = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        self._failures[failure["key"]] = failure["reason"]

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def failure(self, key: str) -> str | None:
        """Why a clip could not be extracted, if it could not."""
        return self._failures.get(key)

    def get(self, key: str) -> np.ndarray:
        """The clip's tokens, `(num_tokens, hidden_size)` float16, a read-only memory-mapped view."""
        shard, offset, length = self._entries[key]
        if shard not in self._arrays:
            data_path = self._shard_paths(shard)[0]
            tokens = os.path.getsize(data_path) // (2 * self.hidden_size)
            self._arrays[shard] = np.memmap(data_path, dtype=np.float16, mode="r", shape=(tokens, self.hidden_size))
        return self._arrays[shard][offset : offset + length]


    def metadata(self, key: str) -> dict:
        """The extra fields stored with the entry (see `append`); empty if none."""
        return self._metadata.get(key, {})

    def keys(self) -> list[str]:
        """Every stored key, in storage order."""
        return list(self._entries)

    def shard_array(self, shard: int = 0) -> np.ndarray:
        """A shard's rows as one read-only memory-mapped `(rows, hidden_size)` float16 array."""
        data_path = self._shard_paths(shard)[0]
        rows = self._read_index(shard)[1] // (2 * self.hidden_size)
        if rows == 0:
            return np.zeros((0, self.hidden_size), dtype=np.float16)
        return np.memmap(data_path, dtype=np.float16, mode="r", shape=(rows, self.hidden_size))

    def location(self, key: str) -> tuple[int, int, int]:
        """(shard, first row, rows) of a stored key."""
        return self._entries[key]

    # --- writing -----------------------------------------------------------------------------------------------------

    def _open_for_writing(self, shard: int) -> int:
        """
        Cut off what a killed writer left half-written in a shard and return its length in rows, where writing goes
        on. The index is replaced, not rewritten in place, so a writer killed here too keeps every complete entry.
        Complete entries this object does not know yet (those of its own write that failed half-way) become known, so
        that they are not stored twice.
        """
        data_path, index_path = self._shard_paths(shard)
        entries, end = self._read_index(shard)
        for entry in entries:
            if entry["key"] not in self._entries:
                self._entries[entry["key"]] = (shard, entry["offset"], entry["length"])
                extra = {k: v for k, v in entry.items() if k not in ("key", "offset", "length")}
                if extra:
                    self._metadata[entry["key"]] = extra
        with open(data_path, "ab") as handle:
            handle.truncate(end)
        write_atomically(index_path, "".join(json.dumps(entry) + "\n" for entry in entries).encode())
        return end // (2 * self.hidden_size)

    def append(self, items: list[tuple[str, np.ndarray, dict]], shard: int = 0):
        """
        Store arrays `(rows, hidden_size)` under their keys, with extra JSON fields kept in the entry (`metadata`).
        Durable like `extract`: the rows are on disk (fsync) before their index lines, and the first call cuts off what
        a killed writer left half-written. Keys already stored are skipped. One writer per shard.
        """
        if shard not in self._append_offsets:  # first, so that the entries a failed write left whole are known
            self._append_offsets[shard] = self._open_for_writing(shard)
        self._write([item for item in items if item[0] not in self._entries], shard)

    def _write(self, items: list[tuple[str, np.ndarray, dict]], shard: int):
        data_path, index_path = self._shard_paths(shard)
        if shard not in self._append_offsets:
            self._append_offsets[shard] = self._open_for_writing(shard)
        offset, lines = self._append_offsets[shard], []
        try:
            with open(data_path, "ab") as data:
                for key, array, extra in items:
                    array = np.ascontiguousarray(array, dtype=np.float16)
                    if array.ndim != 2 or array.shape[1] != self.hidden_size:
                        raise ValueError(f"Expected an array (rows, {self.hidden_size}); got {array.shape} for {key}.")
                    data.write(array.tobytes())
                    lines.append({**extra, "key": key, "offset": offset, "length": array.shape[0]})
                    offset += array.shape[0]
                data.flush()
                os.fsync(data.fileno())
            with open(index_path, "a") as index:
                index.writelines(json.dumps(line) + "\n" for line in lines)
                index.flush()
                os.fsync(index.fileno())
        except BaseException:
            # Part of a block or a line may be on disk (a full disk writes what fits): the next call cuts it off
            # (`_open_for_writing`) rather than appending after it, and learns the entries written whole.
            del self._append_offsets[shard]
            raise
        self._append_offsets[shard] = offset
        for line in lines:
            self._entries[line["key"]] = (shard, line["offset"], line["length"])
            extra = {k: v for k, v in line.items() if k not in ("key", "offset", "length")}
            if extra:
                self._metadata[line["key"]] = extra
        self._arrays.pop(shard, None)  # the memory map was sized before these rows

    def consolidate(self):
        """
        Move the entries of every other shard into shard 0 and delete those shards, so that shard 0's rows are the
        whole store (a sound library scans one memory map; its processes each wrote their own shard). Safe to kill: an
        entry is in shard 0 before its shard is deleted, and a rerun skips what shard 0 already holds.
        """
        self.reload()
        in_first = {entry["key"] for entry in self._read_index(0)[0]}
        shards = sorted(int(n[len("shard-") : -len(".jsonl")]) for n in os.listdir(self.directory)
                        if n.startswith("shard-") and n.endswith(".jsonl"))  # fmt: skip
        for shard in (s for s in shards if s != 0):
            entries, end = self._read_index(shard)
            data_path, index_path = self._shard_paths(shard)
            if end:
                rows = np.memmap(data_path, dtype=np.float16, mode="r", shape=(end // (2 * self.hidden_size), self.hidden_size))
                self._write([(e["key"], rows[e["offset"] : e["offset"] + e["length"]],
                              {k: v for k, v in e.items() if k not in ("key", "offset", "length")})
                             for e in entries if e["key"] not in in_first], shard=0)  # fmt: skip
                del rows
            for path in (index_path, data_path):  # the index first: a shard without one is never read
                if os.path.exists(path):
                    os.remove(path)
            self._append_offsets.pop(shard, None)
        self.reload()


__all__ = ["ArrayStore", "audio_file_for", "write_atomically", "write_json_atomically"]
