"""The bad-input matrix (`tests/input_matrix.py`) asserted cell by cell, the limits it relies on, and killed extraction.

`python -m tests.input_matrix` prints the same matrix as a table.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import torch
from conftest import TINY_BEATS, make_waveform
from input_matrix import (
    AUDIO_ENTRY_POINTS,
    CAPTION_ENTRY_POINTS,
    Context,
    _Measure,
    audio_cases,
    caption_cases,
    verdict,
)

from audio_io import load_audio
from audio_qformer.data import load_hub_dataset
from configuration_audio_qformer import BeatsConfig
from audio_qformer.features import FeatureCache, build_cache
from audio_qformer.identity import clip_key
from modeling_audio_qformer import BeatsModel
from processing_audio_qformer import BeatsFeatureExtractor


AUDIO_CASES = {case.name: case for case in audio_cases()}
CAPTION_CASES = {case.name: case for case in caption_cases()}


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return Context(str(tmp_path_factory.mktemp("input matrix")))


@pytest.mark.parametrize("entry_point", list(AUDIO_ENTRY_POINTS))
@pytest.mark.parametrize("case", list(AUDIO_CASES))
def test_audio_input(case, entry_point, context):
    outcome = context.run(AUDIO_CASES[case], entry_point)
    if outcome.status == "skip":
        pytest.skip(outcome.detail)
    assert verdict(AUDIO_CASES[case], entry_point, outcome, context) == []


@pytest.mark.parametrize("entry_point", list(CAPTION_ENTRY_POINTS))
@pytest.mark.parametrize("case", list(CAPTION_CASES))
def test_caption_input(case, entry_point, context):
    outcome = context.run(CAPTION_CASES[case], entry_point)
    assert verdict(CAPTION_CASES[case], entry_point, outcome, context) == []


# --- what the matrix relies on -------------------------------------------------------------------------------------


def test_long_file_is_read_only_as_far_as_asked(context):
    path = context.input_path(AUDIO_CASES["one hour"])
    with _Measure() as measure:
        start = load_audio(path, max_seconds=10)
    assert start.shape == (160000,) and measure.peak_mib < 50 and measure.seconds < 5
    np.testing.assert_array_equal(start, load_audio(path, max_seconds=61)[:160000])
    # Resampled clips are cut in source samples: 10 s at 44.1 kHz are 10 s at 16 kHz.
    assert load_audio(context.input_path(AUDIO_CASES["44.1 kHz"]), max_seconds=0.5).shape == (8000,)


def test_fbank_blocks_and_truncation_leave_features_unchanged():
    waveform = make_waveform(7.3, seed=4)
    extractor = BeatsFeatureExtractor()
    whole = extractor(waveform, sampling_rate=16000, return_tensors="np")["input_features"]
    extractor.fbank_block_frames = 97  # many blocks, the last one short
    blocks = extractor(waveform, sampling_rate=16000, return_tensors="np")["input_features"]
    np.testing.assert_array_equal(blocks, whole)
    # With truncation only the kept frames are computed, from the audio cut first: the same frames.
    cut = extractor(waveform, sampling_rate=16000, truncation=True, max_length=300, return_tensors="np")
    np.testing.assert_array_equal(cut["input_features"], whole[:, :300])
    assert cut["feature_attention_mask"].shape == (1, 300)


def test_hub_loader_reports_clips_without_a_caption(tmp_path):
    from datasets import Dataset

    data = {"audio": [{"bytes": b"RIFF", "path": f"{name}.wav"} for name in "abc"], "caption": ["a dog", "  ", None]}
    Dataset.from_dict(data).to_parquet(str(tmp_path / "train.parquet"))
    dataset, skipped = load_hub_dataset("parquet", "train", data_files=str(tmp_path / "train.parquet"))
    assert dataset["caption"] == ["a dog"]
    assert [item["reason"] for item in skipped] == ["no caption", "no caption"]


def test_non_finite_tokens_are_reported_not_stored(tmp_path, monkeypatch):
    torch.manual_seed(0)
    beats = BeatsModel(BeatsConfig(**TINY_BEATS)).eval()
    path = str(tmp_path / "loud.wav")
    soundfile.write(path, make_waveform(1.0), 16000)
    original = beats.forward

    def overflowing(*args, **kwargs):
        outputs = original(*args, **kwargs)
        outputs.last_hidden_state[0, 3] = 1e6  # beyond float16
        return outputs

    monkeypatch.setattr(beats, "forward", overflowing)
    clips = [{"key": clip_key(path), "audio_path": path, "audio_bytes": None}]
    extractor = BeatsFeatureExtractor()
    cache, failures, _ = build_cache(str(tmp_path / "cache"), clips, beats, extractor, show_progress=False)
    assert len(cache) == 0 and failures[0]["audio"] == path and "non-finite tokens" in failures[0]["reason"]


# --- killed extraction ---------------------------------------------------------------------------------------------
#
# `test_feature_cache_extracts_resumes_and_invalidates` (test_data.py) cuts a shard by hand. Here `build_cache` runs in
# a subprocess that is SIGKILLed, at chosen points inside a write and at a random moment, then run again; the cache
# must end as an uninterrupted run leaves it, and what a killed run leaves must never be read as complete.


def _install_kill_point(event: str, count: int):
    """
    SIGKILL this process at the `count`-th `event` of `FeatureCache.extract`: `decode` (before a clip is decoded),
    `block` (halfway through writing a clip's tokens), `fsync` (a batch's tokens on disk, its index lines not yet
    written), `index` (halfway through a batch's index lines), `reindex` (halfway through rewriting the index at start).
    """
    import builtins

    from audio_qformer import features, store

    seen = 0

    def hit(partial=None):
        nonlocal seen
        seen += 1
        if seen == count:
            if partial is not None:
                partial()
            os.kill(os.getpid(), signal.SIGKILL)

    class Killable:
        def __init__(self, handle, what):
            self._handle, self._what = handle, what

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

        def _half(self, data):
            def write():
                self._handle.write(data[: len(data) // 2])
                self._handle.flush()

            return write

        def write(self, data):
            if self._what == event and event in ("block", "reindex"):
                hit(self._half(data))
            return self._handle.write(data)

        def writelines(self, lines):
            text = "".join(lines)
            if self._what == event:
                hit(self._half(text))
            return self._handle.write(text)

    def killable_open(path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        name = os.path.basename(str(path))
        what = {
            ("bin", "ab"): "block", ("jsonl", "a"): "index", ("partial", "wb"): "reindex"
        }.get((name.rsplit(".", 1)[-1], mode))  # fmt: skip
        return Killable(handle, what) if name.startswith("shard-") and what else handle

    features.open = store.open = killable_open  # extraction writes in `features`, the index rewrite in `store`
    if event == "decode":
        load = features.load_audio
        features.load_audio = lambda *args, **kwargs: hit() or load(*args, **kwargs)
    if event == "fsync":
        fsync = os.fsync

        def killing_fsync(fd):
            fsync(fd)
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".bin"):
                hit()

        os.fsync = killing_fsync


def _extraction_job(root: str, clips: list[dict], event: str, count: int, ready: int):
    """One `build_cache` run with the tests' tiny BEATs, optionally killed at an event; the failures go to a file."""
    torch.manual_seed(0)
    beats = BeatsModel(BeatsConfig(**TINY_BEATS)).eval()
    if event != "none":
        _install_kill_point(event, count)
    os.write(ready, b"r")
    _, failures, _ = build_cache(root, clips, beats, BeatsFeatureExtractor(), batch_size=2, show_progress=False)
    with open(os.path.join(root, "failures.json"), "w") as handle:
        json.dump([failure["audio"] for failure in failures], handle)


def _job_server(clips_path: str):
    """
    The subprocess: imports torch and the project once, then for each request on stdin (`root event count kill_after`)
    forks a process that runs `_extraction_job` and answers its exit status (negative: the signal that ended it). With
    `kill_after` >= 0 it SIGKILLs the job that many seconds after it started extracting.
    """
    torch.set_num_threads(1)  # before any work, so a forked job inherits no thread pool
    with open(clips_path) as handle:
        clips = json.load(handle)
    for line in sys.stdin:
        root, event, count, kill_after = line.split()
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                _extraction_job(root, clips, event, int(count), ready_write)
                os._exit(0)
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(1)
        os.close(ready_write)
        os.read(ready_read, 1)
        os.close(ready_read)
        if float(kill_after) >= 0:
            time.sleep(float(kill_after))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)


class _Jobs:
    """A `_job_server` subprocess: `run(root, event, count, kill_after)` gives the exit status of one extraction."""

    def __init__(self, clips_path):
        command = [sys.executable, os.path.abspath(__file__), clips_path]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, root, event="none", count=0, kill_after=-1.0) -> int:
        self.process.stdin.write(f"{root} {event} {count} {kill_after}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, "the job server died"
        return int(answer)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _open_cache(root):
    (fingerprint,) = [name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name))]
    return FeatureCache(root, fingerprint, TINY_BEATS["encoder_embed_dim"])


def _assert_consistent(cache, reference, before):
    """Every entry the cache shows is complete and equal to the uninterrupted run's; none that was complete is lost."""
    assert set(cache.keys()) <= set(reference)
    for key in cache.keys():
        np.testing.assert_array_equal(cache.get(key), reference[key])
    assert set(before) <= set(cache.keys())


def test_killed_extraction_resumes_to_the_uninterrupted_cache(tmp_path):
    paths = []
    for index in range(10):  # equal lengths, so a resumed run batches clips differently without padding them
        paths.append(str(tmp_path / "audio" / f"clip {index}.wav"))
        os.makedirs(os.path.dirname(paths[-1]), exist_ok=True)
        soundfile.write(paths[-1], make_waveform(1.0, seed=index), 16000)
    paths.insert(4, str(tmp_path / "audio" / "broken.wav"))
    with open(paths[4], "wb") as handle:
        handle.write(b"not audio")
    clips_path = str(tmp_path / "clips.json")
    with open(clips_path, "w") as handle:
        json.dump([{"key": clip_key(path), "audio_path": path, "audio_bytes": None} for path in paths], handle)

    jobs = _Jobs(clips_path)
    try:
        reference_root = str(tmp_path / "reference")
        assert jobs.run(reference_root) == 0
        with open(os.path.join(reference_root, "failures.json")) as handle:
            assert json.load(handle) == [paths[4]]
        reference_cache = _open_cache(reference_root)
        reference = {key: np.array(reference_cache.get(key)) for key in reference_cache.keys()}
        assert len(reference) == 10

        rng = random.Random(int(os.environ.get("KILL_TEST_SEED", "0")))
        kills = [("block", rng.randint(2, 5)), ("reindex", 1), ("index", rng.randint(1, 2)), ("fsync", 1),
                 ("decode", rng.randint(1, 3))]  # fmt: skip
        root = str(tmp_path / "killed")
        os.makedirs(root)
        before = []
        for event, count in kills:
            assert jobs.run(root, event, count) == -signal.SIGKILL, f"not killed at {event} #{count}"
            cache = _open_cache(root)
            _assert_consistent(cache, reference, before)
            before = cache.keys()
        assert len(before) < 10  # the kills left work to resume
        # A kill at any moment (or none, if the job was faster).
        assert jobs.run(root, kill_after=rng.uniform(0.0, 0.3)) in (0, -signal.SIGKILL)
        _assert_consistent(_open_cache(root), reference, before)

        assert jobs.run(root) == 0
    finally:
        jobs.close()
    with open(os.path.join(root, "failures.json")) as handle:
        assert json.load(handle) == [paths[4]]  # the broken clip is still reported
    cache = _open_cache(root)
    assert sorted(cache.keys()) == sorted(reference)
    for key, tokens in reference.items():
        np.testing.assert_array_equal(cache.get(key), tokens)
    # One shard: each key once, blocks back to back from offset 0, nothing after the last one.
    with open(os.path.join(cache.directory, "shard-0.jsonl")) as handle:
        entries = [json.loads(line) for line in handle]
    assert len({entry["key"] for entry in entries}) == len(entries) == 10
    assert [entry["offset"] for entry in entries] == list(np.cumsum([0] + [entry["length"] for entry in entries[:-1]]))
    size = os.path.getsize(os.path.join(cache.directory, "shard-0.bin"))
    assert size == (entries[-1]["offset"] + entries[-1]["length"]) * TINY_BEATS["encoder_embed_dim"] * 2


if __name__ == "__main__":  # the subprocess of the killed-extraction test
    _job_server(sys.argv[1])
