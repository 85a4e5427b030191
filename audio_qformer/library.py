# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""The sound library: a folder of audio embedded once with the audio Q-Former, searchable by text or by example.

    library = AudioLibrary.open("my-library")                # its recorded model; create=True, model=M for a new one
    library.index("/path/to/sounds")                         # resumable; later runs embed new or changed files only
    library.search(["a dog barks"], k=10, rerank=16)         # ranked files, best window each
    library.similar("/path/to/sounds/example.wav", k=10)

The report's inference: every clip's audio embeddings (32 query tokens x 256) are computed once and stored; a text's
embedding is scored against them by the model's score (cosine of the best query token, `AudioQFormerModel.score`),
computed in chunks over the stored float16 embeddings by `vector_search.exact_search` (or its FAISS index for large
libraries); optionally the matching head re-ranks the top k. Files longer than a window are cut into overlapping
windows and a file scores as its best window.

A library folder holds `library.json` (the model it was built with and its identity hash, its settings),
`embeddings/` (one row of 32 x 256 float16 per window) and, with `keep_tokens=True`, `tokens/` (each window's BEATs
tokens, so re-ranking needs no audio decoding), both `store.ArrayStore`s, and `files.json` (the files of each indexed
folder). This class is the facade; its phases live in their own modules: `indexing` (listing, keys, shares between
processes, decoding, writing, the lock), `embedding` (windows and the BEATs copy), `library_dataset` (export and
import as a `datasets.Dataset`), `library_paths` (where files are and their keys). The command line over it is
`audio_qformer.cli` (`audio-qformer`).
"""

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from audio_io import AUDIO_EXTENSIONS, HOP_SECONDS, WINDOW_SECONDS, AudioLoadError, load_audio
from audio_qformer import indexing, library_dataset
from audio_qformer.embedding import LibraryEncoder
from audio_qformer.identity import weights_fingerprint
from audio_qformer.indexing import LIBRARY_FILES, LibraryBusyError, LibraryDiskFullError, stopping_when_disk_full
from audio_qformer.library_dataset import library_features, open_dataset
from audio_qformer.library_paths import LibraryPaths
from audio_qformer.model_loading import load_model, model_reference
from audio_qformer.retrieval import rerank_with_matching_head, tokenize_texts
from audio_qformer.store import ArrayStore, write_json_atomically
from audio_qformer.vector_search import exact_search


LIBRARY_CONFIG = "library.json"
BEATS_DTYPES = ("float32", "bfloat16")
# The settings a library is created with, and their defaults. Fixed from then on: `AudioLibrary` refuses another
# value for an existing library (None means "the library's own"). Libraries made before a setting existed have its
# default.
SETTINGS = {"keep_tokens": False, "window_seconds": WINDOW_SECONDS, "hop_seconds": HOP_SECONDS, "fast_cpu_encoder": False,
            "captions": False, "beats_dtype": "float32"}  # fmt: skip
# What the app's libraries (so a Space's too) store beside the embeddings: each file's caption, shown with each hit,
# and the BEATs tokens, so that its re-rank switch answers in about a second instead of running BEATs again.
BROWSING_LIBRARY = {"captions": True, "keep_tokens": True}


class LibrarySettingError(ValueError):
    """A setting given for an existing library that differs from the one it was created with."""

    def __init__(self, directory: str, setting: str, stored, given):
        self.directory, self.setting, self.stored, self.given = directory, setting, stored, given
        super().__init__(f"The library {directory} was created with {setting}={stored!r}; {setting} applies to new "
                         f"libraries only (got {given!r}): index into a new library.")  # fmt: skip


@dataclass
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
    `AudioLibrary.open` opens or creates one by folder and model name; the constructor takes a loaded model.

    Args:
        directory (`str`): the library folder (created when `create=True`).
        model ([`AudioQFormerModel`]) and processor ([`AudioQFormerProcessor`]): the model that embeds; an existing
            library refuses a model with other weights.
        model_name (`str`, *optional*): where the model comes from, recorded so that `open` finds it: a Hub id, or a
            folder (recorded by its absolute path, `model_reference`: the library opens from anywhere).
        create (`bool`, defaults to `False`): create the library if the folder holds none.

    The settings below are fixed when a library is created (`SETTINGS` holds their defaults); None means the
    library's own, and another value for an existing library raises `LibrarySettingError`.

        keep_tokens (`bool`, default `False`): also store each window's BEATs tokens, so that re-ranking needs no
            audio decoding and no BEATs run; they take about 46 times the embeddings' space
            (`benchmarks/library_storage.py`).
        window_seconds, hop_seconds (`float`, default 10.24 and 5.12): the windows a file is cut into.
        fast_cpu_encoder (`bool`, default `False`): on the CPU, embed with BEATs' fast copy
            (`beats_cpu.cpu_copy(..., "fast")`: bfloat16 or int8 products, whichever this CPU runs faster, else the
            exact path with a warning; embeddings within a cosine of 0.99999 of the exact ones). Otherwise the CPU
            runs the exact float32 copy.
        captions (`bool`, default `False`): also store a caption of each file, written by the model's caption head
            from its first window as it is embedded; search hits carry it.
        beats_dtype (`str`, default `"float32"`): `"bfloat16"` runs BEATs in bfloat16 on any device and, on a GPU,
            the Q-Former under bfloat16 autocast.
    """

    def __init__(self, directory: str, model, processor, model_name: str | None = None, create: bool = False,
                 keep_tokens: bool | None = None, window_seconds: float | None = None, hop_seconds: float | None = None,
                 fast_cpu_encoder: bool | None = None, captions: bool | None = None, beats_dtype: str | None = None):  # fmt: skip
        self.directory, self.model, self.processor = directory, model, processor
        self.sampling_rate = processor.feature_extractor.sampling_rate
        given = {"keep_tokens": keep_tokens, "window_seconds": window_seconds, "hop_seconds": hop_seconds,
                 "fast_cpu_encoder": fast_cpu_encoder, "captions": captions, "beats_dtype": beats_dtype}  # fmt: skip
        config_path = os.path.join(directory, LIBRARY_CONFIG)
        identity = weights_fingerprint(model)
        if os.path.exists(config_path):
            with open(config_path) as handle:
                self.config = json.load(handle)
            if self.config["model_identity"] != identity:
                raise ValueError(
                    f"The library {directory} was built with another model ({self.config.get('model')}, identity "
                    f"{self.config['model_identity']}); this model's identity is {identity}. Use that model, or "
                    "index into a new --library (libraries of the first format computed identities from the model's "
                    "path too: index those again)."
                )
            for setting, value in given.items():
                stored = self.config.get(setting, SETTINGS[setting])
                if value is not None and value != stored:
                    raise LibrarySettingError(directory, setting, stored, value)
        elif create:
            settings = {setting: SETTINGS[setting] if value is None else value for setting, value in given.items()}
            if settings["beats_dtype"] not in BEATS_DTYPES:
                raise ValueError(f"beats_dtype must be one of {', '.join(BEATS_DTYPES)}; got {settings['beats_dtype']!r}.")
            if settings["hop_seconds"] <= 0 or settings["hop_seconds"] > settings["window_seconds"]:
                raise ValueError(f"Need 0 < hop_seconds <= window_seconds; got {settings['hop_seconds']} and "
                                 f"{settings['window_seconds']}.")  # fmt: skip
            os.makedirs(directory, exist_ok=True)
            self.config = {"format": 1, "model": model_reference(model_name), "model_identity": identity, **settings}
            with stopping_when_disk_full(directory):
                write_json_atomically(config_path, self.config)
        else:
            raise FileNotFoundError(
                f"No audio library at {directory}: build one with `audio-qformer --library {directory} index DIR --model MODEL`."
            )
        # The file list before the stored entries: an `index` run writes it after every entry it names is stored (in
        # shard 0), so while another run is appending, each listed file is found complete here.
        files_path = os.path.join(directory, LIBRARY_FILES)
        self.files: dict[str, dict[str, str]] = json.load(open(files_path)) if os.path.exists(files_path) else {}
        embed_width = model.config.num_query_tokens * model.config.embed_dim
        self.embeddings = ArrayStore(directory, "embeddings", embed_width)
        self.tokens = ArrayStore(directory, "tokens", model.config.audio_config.hidden_size)
        self.paths = LibraryPaths(directory)
        self.encoder = LibraryEncoder(model, processor, self.config)
        self.files_changed()

    @classmethod
    def open(cls, directory: str, model: str | None = None, create: bool = False, device="cpu", **settings) -> "AudioLibrary":
        """
        Open the library at `directory` with the model it recorded (or `model`, a saved model folder or Hub id), or
        create it with `create=True` (then `model` is needed) and `settings` (`SETTINGS`: `keep_tokens`,
        `window_seconds`, `hop_seconds`, `fast_cpu_encoder`, `captions`, `beats_dtype`). An existing library refuses
        settings it was not created with (`LibrarySettingError`).
        """
        config_path = os.path.join(directory, LIBRARY_CONFIG)
        if not os.path.exists(config_path):
            if not create:
                raise FileNotFoundError(
                    f"No audio library at {directory}: build one with `audio-qformer --library {directory} index DIR --model MODEL`."
                )
            if not model:
                raise ValueError(f"A new library ({directory}) needs a model: a saved model folder or Hub id.")
            return cls(directory, *load_model(model, device), model, create=True, **settings)
        with open(config_path) as handle:
            name = model or json.load(handle)["model"]
        try:
            loaded, processor = load_model(name, device)
        except (OSError, ValueError) as error:  # a folder moved (not a valid Hub id either), or no network
            raise ValueError(f"The library {directory}'s model {name} cannot be loaded here ({error}); give the model "
                             "with --model (a saved model folder or Hub id).") from error  # fmt: skip
        return cls(directory, loaded, processor, name, **settings)

    @classmethod
    def load(cls, directory: str, model_name_or_path: str | None = None, device="cpu") -> "AudioLibrary":
        """Open an existing library with the model it was built with (or the one given): `open` without creating."""
        return cls.open(directory, model_name_or_path, device=device)

    def record_model(self, name_or_path: str) -> None:
        """
        Record where the library's model is found from now on (`open` loads it from there), e.g. after its folder moved:
        this library's model must have been loaded from there. A local folder is recorded by its absolute path.
        """
        self.config["model"] = model_reference(name_or_path)
        with stopping_when_disk_full(self.directory):
            write_json_atomically(os.path.join(self.directory, LIBRARY_CONFIG), self.config)

    @classmethod
    def from_dataset(cls, dataset, directory: str, model_name_or_path: str | None = None, device="cpu",
                     split: str = "train") -> "AudioLibrary":  # fmt: skip
        """A library exported by `to_dataset`, opened as the folder `directory` (`library_dataset.open_export`)."""
        return library_dataset.open_export(cls, dataset, directory, model_name_or_path, device, split)

    def to_dataset(self, cache_dir: str | None = None):
        """The library as a `datasets.Dataset`, one row per window (`library_dataset.export`)."""
        return library_dataset.export(self, cache_dir)

    def index(self, source, batch_size: int = 8, show_progress: bool = True, state=None, audio_column: str = "audio",
              dataset_name: str | None = None) -> dict:  # fmt: skip
        """
        Embed every audio file under the folder `source` (or a `datasets.Dataset` of audio) not yet in the library,
        resumably, sharing the work between the processes of an Accelerate `state`; returns `{"files", "embedded",
        "reused", "failed"}` (`indexing.index`).
        """
        return indexing.index(self, source, batch_size, show_progress, state, audio_column, dataset_name)

    def windows(self, waveform: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
        """The first samples of a waveform's windows, and the windows (`LibraryEncoder.windows`)."""
        return self.encoder.windows(waveform)

    def embed_waveforms(self, waveforms: list[np.ndarray], batch_size: int = 8):
        """Audio embeddings `(n, queries, embed_dim)` of 16 kHz mono waveforms, and their BEATs tokens (float16)."""
        return self.encoder.embed_waveforms(waveforms, batch_size)

    # --- the files it lists -------------------------------------------------------------------------------------------

    def path_of(self, key: str) -> str:
        """The file of a stored key, absolute."""
        return self.paths.absolute(self.embeddings.metadata(key)["path"])

    def files_changed(self):
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
        return real if self.paths.key(path) == key else None

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
                cut = self.encoder.windows(waveform)[1]
                wanted += [(key, window) for window in sorted(windows)]
                waveforms += [cut[window] for window in sorted(windows)]
            device, batch = next(self.model.parameters()).device, 8
            for first in range(0, len(waveforms), batch):
                inputs = self.processor.feature_extractor(
                    waveforms[first : first + batch], sampling_rate=self.sampling_rate, return_tensors="pt"
                )
                states, mask = self.encoder.audio_hidden_states(inputs.to(device))
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
        embeds, _ = self.encoder.embed_waveforms(self.encoder.windows(waveform)[1])
        query = embeds.reshape(1, -1, embeds.shape[-1])  # every query token of every window
        return [self._hit(*hit) for hit in self._top_files(query, k, exclude={os.path.abspath(path)})[0]]


__all__ = ["AudioLibrary", "BROWSING_LIBRARY", "LibraryBusyError", "LibraryDiskFullError", "LibrarySettingError",
           "SETTINGS", "SearchHit", "library_features", "load_model", "model_reference", "open_dataset"]
