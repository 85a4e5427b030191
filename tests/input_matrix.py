"""The bad-input matrix (issue 8): the awkward inputs a real sound library holds, through every entry point that reads
audio or captions, and the outcome each must give. `tests/test_bad_inputs.py` asserts it; for the table run

    .venv/bin/python -m tests.input_matrix

from the repository root.

Every (input, entry point) cell has one of three outcomes, and nothing else is accepted:

- `ok`: a correct result, checked (a 16 kHz mono float32 waveform matching the signal that was written, features of
  the right shape, finite tokens, the row kept);
- `error`: a single-clip API raises a specific exception naming the file (when it has one) and the problem;
- `skipped`: a batch job goes on and lists the input, with the reason, in what it returns.

`n/a` marks inputs an entry point cannot be given: the array API gets what `soundfile.read` decodes, so a file that
soundfile cannot decode never reaches it. A batch job that neither keeps nor reports an input fails as `dropped`.

The behaviours chosen:

- Undecodable files (corrupt bytes, a text file named .wav, a header cut short, a FLAC stream cut short, an
  empty file, no read permission) and files without samples or with NaN/inf samples: `AudioLoadError` from
  `load_audio`, skipped and reported by `build_cache`. The loaders only list files (decoding is `build_cache`'s job),
  so they keep every file that exists and report missing ones.
- A WAV cut inside its data: libsndfile reads the samples present (streaming writers leave such headers too, so
  refusing them would reject valid files); `load_audio` warns that the header disagrees with the file.
- Any sampling rate and channel count: `load_audio` averages the channels and resamples to 16 kHz; the feature
  extractor takes 16 kHz mono arrays only and raises `ValueError` stating both rates, or asking for a downmix.
- Silence is valid audio, not a failure: its fbank is Kaldi's log floor (the extractor's padding value).
- Long audio: `load_audio(max_seconds=...)` decodes only the start; `build_cache` decodes at most `max_seconds` + 1 s
  (60 s by default), keeps the first `max_seconds` and logs the clips it cut. The feature extractor computes the
  fbank in blocks of 60 s, so an hour of audio costs its float32 result (~180 MB) and not ~4 GB of float64
  spectrogram; with `truncation=True, max_length=n` it computes only the `n` frames kept.
- Captions: a caption with no word left after `clean_caption` (empty, blank, punctuation only) is no caption: a clip
  without any is skipped and reported by the loaders, and empty captions next to real ones are counted in a warning.
  Long captions are cut to 50 words by `clean_caption` and to the tokenizer's `max_length` by the processor; other
  scripts go through, with the [UNK]s the English vocabulary gives them.

Adding an entry point (the CLI's `index`, the evaluation script): write an adapter `adapter(context, path) -> Outcome`
(audio) or `adapter(context, caption) -> Outcome` (captions) that calls it on one input, and add it to
`AUDIO_ENTRY_POINTS` / `CAPTION_ENTRY_POINTS` with its kind. Expectations are written per kind, not per entry point, so
a batch job (`kind="batch"`: keeps the clip or reports it) inherits the `batch` column of every case and the tests
parametrize over it with no other change. `batch_outcome` turns a batch job's result into an `Outcome`.
"""

import csv
import hashlib
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from conftest import TINY_BEATS  # noqa: E402


# --- outcomes and expectations ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one entry point did with one input."""

    status: str  # "ok", "error", "skipped", "n/a", "dropped" (a batch job lost it), "skip" (case not runnable here)
    detail: str = ""  # a few words for the table
    message: str = ""  # the full error message or skip reason
    error: type | None = None
    value: Any = None  # the waveform, features, tokens, row, cleaned caption or token ids
    item: dict | None = None  # the batch job's report entry for a skipped input
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_mib: float = 0.0

    def __str__(self):
        if self.status == "error":
            return f"error: {self.error.__name__} ({self.detail})"
        if self.status == "skipped":
            return f"skipped+reported ({self.detail})"
        return f"{self.status} ({self.detail})" if self.detail else self.status


@dataclass
class Expect:
    status: str
    match: str = ""  # a regex the error message (error) or the report's reason (skipped) must contain
    error: type | None = None  # the exception type of an error

    def __str__(self):
        return {"error": f"error: {getattr(self.error, '__name__', '?')}", "skipped": "skipped+reported"}.get(
            self.status, self.status
        ) + (f" /{self.match}/" if self.match else "")


def _ok():
    return Expect("ok")


def _error(match: str, error: type | None = None) -> Expect:
    if error is None:
        from audio_io import AudioLoadError

        error = AudioLoadError
    return Expect("error", match, error)


def _skipped(match: str) -> Expect:
    return Expect("skipped", match)


NOT_DECODABLE = Expect("n/a")


# --- audio inputs ----------------------------------------------------------------------------------------------------


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    """The test signal: per channel a sine at 440 + 110 * channel Hz, amplitude 0.3, shape (samples, channels)."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * (440 + 110 * c) * t) for c in range(channels)], axis=1).astype(np.float32)


@dataclass
class AudioCase:
    name: str
    make: Callable[[str], str]  # writes the input into a fresh directory and returns its path
    expect: dict[str, Expect]  # by entry-point kind: "array", "file", "listing", "batch"
    seconds: float | None = None  # duration of the decoded clip, for an ok outcome
    channels: int = 1  # channels written (the 16 kHz reference averages them)
    lossy: bool = False  # compare only length and level with the reference
    silent: bool = False
    max_peak_mib: float | None = None  # memory budget of one entry-point call
    requires: Callable[[], str | None] = lambda: None  # a reason the case cannot run here

    @property
    def reference(self) -> np.ndarray | None:
        """The mono 16 kHz waveform `load_audio` must return (None when there is no simple one)."""
        if self.seconds is None or self.silent or self.seconds > 60:
            return None
        return tone(self.seconds, 16000, self.channels).mean(axis=1)


def _wav(name, seconds=1.0, rate=16000, channels=1, **write_kwargs):
    def make(directory):
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        soundfile.write(path, tone(seconds, rate, channels), rate, **write_kwargs)
        return path

    return make


def _bytes(name, data):
    def make(directory):
        path = os.path.join(directory, name)
        with open(path, "wb") as handle:
            handle.write(data() if callable(data) else data)
        return path

    return make


def _cut(name, keep: Callable[[int], int]):
    """A 1 s clip whose file keeps only `keep(size)` of its bytes (a broken download)."""

    def make(directory):
        path = os.path.join(directory, name)
        soundfile.write(path, tone(1.0, 16000), 16000)
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(data[: keep(len(data))])
        return path

    return make


def _with_bad_sample(name, value):
    def make(directory):
        path = os.path.join(directory, name)
        wave = tone(1.0, 16000)
        wave[8000] = value
        soundfile.write(path, wave, 16000, subtype="FLOAT")  # PCM would clip NaN/inf to full scale
        return path

    return make


def _silent(directory):
    path = os.path.join(directory, "silence.wav")
    soundfile.write(path, np.zeros(16000, np.float32), 16000)
    return path


def _empty_wav(directory):
    path = os.path.join(directory, "no samples.wav")
    soundfile.write(path, np.zeros(0, np.float32), 16000)
    return path


def _missing(directory):
    return os.path.join(directory, "never written.wav")


def _unreadable(directory):
    path = _wav("locked.wav")(directory)
    os.chmod(path, 0)
    return path


def _as_root():
    return "root reads any file" if hasattr(os, "geteuid") and os.geteuid() == 0 else None


ONE_HOUR = 3600.0


def _one_hour(directory):
    """An hour at 16 kHz (115 MB of PCM16), written a minute at a time: a 1 s tone then silence, each minute."""
    path = os.path.join(directory, "one hour.wav")
    minute = np.zeros(60 * 16000, np.float32)
    minute[:16000] = tone(1.0, 16000)[:, 0]
    with soundfile.SoundFile(path, "w", samplerate=16000, channels=1, subtype="PCM_16") as handle:
        for _ in range(int(ONE_HOUR // 60)):
            handle.write(minute)
    return path


def _random_bytes():
    return b"RIFF\x24\x00\x00\x00WAVE" + np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()


def audio_cases() -> list[AudioCase]:
    ok = {"array": _ok(), "file": _ok(), "listing": _ok(), "batch": _ok()}

    def rate(hz):
        return {**ok, "array": _error(f"sampled at {hz} Hz", ValueError)}

    def undecodable(match):
        return {"array": NOT_DECODABLE, "file": _error(match), "listing": _ok(), "batch": _skipped(match)}

    cases = [
        AudioCase("16 kHz mono wav", _wav("plain.wav"), ok, seconds=1.0),
        AudioCase("8 kHz", _wav("8k.wav", rate=8000), rate(8000), seconds=1.0),
        AudioCase("22.05 kHz", _wav("22k.wav", rate=22050), rate(22050), seconds=1.0),
        AudioCase("44.1 kHz", _wav("44k.wav", rate=44100), rate(44100), seconds=1.0),
        AudioCase("48 kHz", _wav("48k.wav", rate=48000), rate(48000), seconds=1.0),
        AudioCase(
            "stereo 16 kHz",
            _wav("stereo.wav", channels=2),
            {**ok, "array": _error("[Dd]ownmix", ValueError)},
            seconds=1.0,
            channels=2,
        ),
        AudioCase("6 channels, 48 kHz", _wav("5.1.wav", rate=48000, channels=6), rate(48000), seconds=1.0, channels=6),
        AudioCase("flac 16 kHz", _wav("clip.flac"), ok, seconds=1.0),
        AudioCase("ogg vorbis 44.1 kHz", _wav("clip.ogg", rate=44100), rate(44100), seconds=1.0, lossy=True),
        AudioCase("mp3 44.1 kHz", _wav("clip.mp3", rate=44100), rate(44100), seconds=1.0, lossy=True),
        AudioCase(
            "non-ASCII path, spaces, [brackets]",
            _wav(os.path.join("bibliothèque sonore", "pluie d'été [1] – 雨 & مطر.wav")),
            ok,
            seconds=1.0,
        ),
        AudioCase("10 ms clip", _wav("blip.wav", seconds=0.01), ok, seconds=0.01),
        AudioCase("all silent", _silent, ok, seconds=1.0, silent=True),
        AudioCase("wav cut in its data", _cut("cut.wav", lambda size: size - 16000), ok, seconds=0.5),  # 8000 samples
        AudioCase("wav cut in its header", _cut("cut header.wav", lambda size: 30), undecodable("unreadable")),
        AudioCase("flac cut short", _cut("cut.flac", lambda size: size // 2), undecodable("unreadable")),
        AudioCase("corrupt bytes", _bytes("corrupt.wav", _random_bytes), undecodable("unreadable")),
        AudioCase("text file named .wav", _bytes("notes.wav", b"just some text\n" * 20), undecodable("unreadable")),
        AudioCase("zero-length file", _bytes("empty.wav", b""), undecodable("empty file")),
        AudioCase(
            "wav with zero samples",
            _empty_wav,
            {"array": _error("empty waveform", ValueError), "file": _error("no samples"), "listing": _ok(),
             "batch": _skipped("no samples")},  # fmt: skip
        ),
        AudioCase(
            "NaN samples",
            _with_bad_sample("nan.wav", np.nan),
            {"array": _error("non-finite", ValueError), "file": _error("NaN or infinite"), "listing": _ok(),
             "batch": _skipped("NaN or infinite")},  # fmt: skip
        ),
        AudioCase(
            "inf samples",
            _with_bad_sample("inf.wav", np.inf),
            {"array": _error("non-finite", ValueError), "file": _error("NaN or infinite"), "listing": _ok(),
             "batch": _skipped("NaN or infinite")},  # fmt: skip
        ),
        AudioCase(
            "missing file",
            _missing,
            {"array": NOT_DECODABLE, "file": _error("no such file"), "listing": _skipped("missing file"),
             "batch": _skipped("no such file")},  # fmt: skip
        ),
        AudioCase("no read permission", _unreadable, undecodable("permission denied"), requires=_as_root),
        # The whole hour through the array API and `load_audio`; `build_cache` keeps 60 s. The budgets are a few times
        # what each must hold (the array API: its 180 MB result; `load_audio`: the 230 MB waveform).
        AudioCase("one hour", _one_hour, ok, seconds=ONE_HOUR, max_peak_mib=900),
    ]
    # "folder": a job that scans a folder (the CLI's `index DIR`) expects what a batch job does, but a missing file
    # is simply not in the folder.
    for case in cases:
        case.expect.setdefault("folder", NOT_DECODABLE if case.name == "missing file" else case.expect["batch"])
    return cases


# --- caption inputs --------------------------------------------------------------------------------------------------


@dataclass
class CaptionCase:
    name: str
    text: str
    expect: dict[str, Expect]  # by entry-point kind: "clean", "listing", "tokenizer"
    cleaned: str | None = None  # what `clean_caption` must return, when it is simple to state
    truncated: bool = False  # the tokenizer must cut it to its maximum length


LONG_CAPTION = ("a dog barks loudly while rain falls on a tin roof " * 100)[:5000]


def caption_cases() -> list[CaptionCase]:
    ok = {"clean": _ok(), "listing": _ok(), "tokenizer": _ok()}
    no_caption = {**ok, "listing": _skipped("no caption")}
    return [
        CaptionCase("plain", "A dog barks.", ok, cleaned="a dog barks"),
        CaptionCase("empty", "", no_caption, cleaned=""),
        CaptionCase("whitespace only", " \t  ", no_caption, cleaned=""),
        CaptionCase("punctuation only", "... !!! (*)", no_caption, cleaned=""),
        CaptionCase("5000 characters", LONG_CAPTION, ok, truncated=True),
        CaptionCase("Chinese", "狗在院子里叫", ok, cleaned="狗在院子里叫"),
        CaptionCase("Arabic", "كلب ينبح في الحديقة", ok, cleaned="كلب ينبح في الحديقة"),
        CaptionCase("emoji", "🐶 barks at 🎵", ok, cleaned="🐶 barks at 🎵"),
    ]


# --- the context the adapters share ----------------------------------------------------------------------------------


class Context:
    """A work directory, each case's input (made once) and the objects the entry points need (built once)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._inputs: dict[str, str] = {}
        self._objects: dict[str, Any] = {}

    def _get(self, name, build):
        if name not in self._objects:
            self._objects[name] = build()
        return self._objects[name]

    @property
    def extractor(self):
        from processing_audio_qformer import BeatsFeatureExtractor

        return self._get("extractor", BeatsFeatureExtractor)

    @property
    def beats(self):
        def build():
            import torch

            from configuration_audio_qformer import BeatsConfig
            from modeling_audio_qformer import BeatsModel

            torch.manual_seed(0)
            return BeatsModel(BeatsConfig(**TINY_BEATS)).eval()

        return self._get("beats", build)

    @property
    def processor(self):
        def build():
            from transformers import AutoTokenizer

            from audio_qformer.building import default_bert_checkpoint
            from processing_audio_qformer import AudioQFormerProcessor

            return AudioQFormerProcessor(self.extractor, AutoTokenizer.from_pretrained(default_bert_checkpoint()))

        return self._get("processor", build)

    @property
    def library(self):
        """A sound library on a tiny random model (the CLI's engine)."""

        def build():
            import torch

            from audio_qformer.library import AudioLibrary
            from conftest import tiny_qformer_config
            from modeling_audio_qformer import AudioQFormerModel

            torch.manual_seed(0)
            model = AudioQFormerModel(tiny_qformer_config()).eval()
            return AudioLibrary(os.path.join(self.directory, "library"), model, self.processor, create=True)

        return self._get("library", build)

    def input_path(self, case: AudioCase) -> str:
        """The case's file, written on first use into its own directory."""
        if case.name not in self._inputs:
            directory = os.path.join(self.directory, "audio", re.sub(r"\W+", "_", case.name))
            os.makedirs(directory, exist_ok=True)
            self._inputs[case.name] = case.make(directory)
        return self._inputs[case.name]

    def run(self, case, entry_name: str) -> Outcome:
        if isinstance(case, AudioCase):
            reason = case.requires()
            if reason:
                return Outcome("skip", reason)
            return AUDIO_ENTRY_POINTS[entry_name].adapter(self, self.input_path(case))
        return CAPTION_ENTRY_POINTS[entry_name].adapter(self, case.text)


# --- measuring -------------------------------------------------------------------------------------------------------


def _rss() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0  # not Linux: memory is not measured


class _Measure:
    """Wall time and peak resident memory above the start (sampled every 5 ms) of the code it wraps."""

    def __enter__(self):
        self.start, self.peak, self.started = _rss(), _rss(), time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.started
        self.peak_mib = (max(self.peak, _rss()) - self.start) / 2**20
        return False


class _Warnings(logging.Handler):
    """Collects (instead of printing) what the named loggers warn about while it is active."""

    def __init__(self, *names):
        super().__init__(logging.WARNING)
        self.loggers, self.messages, self._saved = [logging.getLogger(name) for name in names], [], []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        for logger in self.loggers:
            self._saved.append((logger.level, logger.propagate))
            logger.addHandler(self)
            logger.setLevel(logging.WARNING)
            logger.propagate = False
        return self

    def __exit__(self, *exc):
        for logger, (level, propagate) in zip(self.loggers, self._saved):
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate
        return False


def _error_outcome(error: Exception) -> Outcome:
    message = str(error)
    return Outcome("error", _short(message), message, type(error))


def _short(message: str, limit: int = 34) -> str:
    """The part of a message after the file name (`path: reason`), cut for the table."""
    reason = message.split(": ", 1)[-1] if re.match(r"^(/|<bytes>)", message) else message
    reason = re.sub(r"\s*\(.*", "", reason) or reason
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


# --- audio entry points ----------------------------------------------------------------------------------------------


@dataclass
class EntryPoint:
    kind: str  # which column of the cases' expectations applies
    adapter: Callable[[Context, str], Outcome]
    names_file: bool = True  # its errors and reports must name the file
    check: Callable | None = None  # `check(case, outcome, context) -> problems`, for an ok outcome, beyond its kind's


def feature_extractor_entry(context: Context, path: str) -> Outcome:
    """`BeatsFeatureExtractor.__call__` on what `soundfile.read` gives, at the file's own sampling rate."""
    try:
        waveform, rate = soundfile.read(path, dtype="float32")
    except Exception:
        return Outcome("n/a", "soundfile cannot decode it")
    try:
        with _Measure() as measure:
            features = context.extractor(waveform, sampling_rate=rate, return_tensors="np")
    except Exception as error:
        return _error_outcome(error)
    frames = features["input_features"].shape[1]
    detail = f"{frames} frames" + (f", {measure.seconds:.1f} s, +{measure.peak_mib:.0f} MiB" if frames > 10**5 else "")
    return Outcome("ok", detail, value=(features, waveform), seconds=measure.seconds, peak_mib=measure.peak_mib)


def load_audio_entry(context: Context, path: str) -> Outcome:
    from audio_io import load_audio

    try:
        with _Warnings("audio_io") as warned, _Measure() as measure:
            waveform = load_audio(path)
    except Exception as error:
        return _error_outcome(error)
    info = soundfile.info(path)
    changes = [f"{info.samplerate / 1000:g}→16 kHz"] if info.samplerate != 16000 else []
    changes += [f"{info.channels}→1 ch"] if info.channels > 1 else []
    changes += ["warned: header"] if warned.messages else []
    detail = ", ".join([f"{waveform.shape[0] / 16000:.2f} s"] + changes)
    if waveform.shape[0] > 10**7:
        detail += f", {measure.seconds:.1f} s, +{measure.peak_mib:.0f} MiB"
    return Outcome("ok", detail, value=waveform, warnings=warned.messages, seconds=measure.seconds,
                   peak_mib=measure.peak_mib)  # fmt: skip


def _write_metadata(directory: str, rows: list[list[str]]):
    with open(os.path.join(directory, "metadata.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "caption"])
        writer.writerows(rows)


def _companion(directory: str) -> str:
    """A good clip next to the input, so that a loader has one usable clip whatever happens to the input."""
    path = os.path.join(directory, "companion clip.wav")
    if not os.path.exists(path):
        soundfile.write(path, tone(1.0, 16000), 16000)
    return path


def loader_entry(context: Context, path: str) -> Outcome:
    """`load_audiofolder` on a folder whose metadata.csv lists the input (and a good companion clip)."""
    from audio_qformer.data import load_audiofolder

    directory = os.path.dirname(path)
    _companion(directory)
    _write_metadata(directory, [[os.path.basename(path), "the input"], ["companion clip.wav", "a good clip"]])
    try:
        with _Warnings("audio_qformer") as warned:
            dataset, skipped = load_audiofolder(directory)
    except Exception as error:
        return _error_outcome(error)
    rows = [row for row in dataset if row["caption"] == "the input"]
    if rows:
        return Outcome("ok", "row kept, decoded later", value=rows[0])
    items = [item for item in skipped if os.path.basename(item["audio"]) == os.path.basename(path)]
    if items:
        return Outcome("skipped", items[0]["reason"], items[0]["reason"], item=items[0], warnings=warned.messages)
    return Outcome("dropped", "neither kept nor reported")


def batch_outcome(
    path: str, stored: np.ndarray | None, reports: list[dict], warnings: list[str] = (), detail: str = ""
) -> Outcome:
    """
    The outcome of a batch job for one input: `stored` is the array it kept for it (tokens, embeddings; None if
    nothing), `reports` the items it reported as skipped (dicts with `audio` and `reason`) and `warnings` what it
    logged.
    """
    if stored is not None:
        return Outcome("ok", detail or f"{stored.shape[0]} rows", value=stored, warnings=list(warnings))
    items = [item for item in reports if item.get("audio") == path]
    if items:
        reason = items[0]["reason"]
        return Outcome("skipped", _short(reason), reason, item=items[0], warnings=list(warnings))
    return Outcome("dropped", "neither stored nor reported")


def build_cache_entry(context: Context, path: str) -> Outcome:
    """`build_cache` on the input alone (one shared cache directory, so a good clip is never extracted twice)."""
    from audio_qformer.features import build_cache
    from audio_qformer.identity import clip_key

    key = clip_key(path)
    clips = [{"key": key, "audio_path": path, "audio_bytes": None}]
    root = os.path.join(context.directory, "feature cache")
    try:
        with _Warnings("audio_qformer", "audio_io") as warned, _Measure() as measure:
            cache, failures, _ = build_cache(root, clips, context.beats, context.extractor, show_progress=False)
    except Exception as error:  # a batch job must never raise for one bad input
        return Outcome("error", f"crashed: {type(error).__name__}", str(error), type(error))
    tokens = np.array(cache.get(key)) if key in cache else None
    cut = any("were cut" in message for message in warned.messages)
    detail = f"{len(tokens)} tokens" + (", cut at 60 s, logged" if cut else "") if tokens is not None else ""
    outcome = batch_outcome(path, tokens, failures, warned.messages, detail)
    outcome.seconds, outcome.peak_mib = measure.seconds, measure.peak_mib
    return outcome


def _check_tokens(case: AudioCase, outcome: Outcome, context: Context) -> list[str]:
    """BEATs gives 8 tokens per 16 frames of what `build_cache` keeps (60 s at most, the rest reported)."""
    tokens, problems = outcome.value, []
    if tokens.shape[1] != context.beats.config.hidden_size:
        problems.append(f"tokens {tokens.shape}, expected (n, {context.beats.config.hidden_size})")
    if case.seconds is not None:
        expected = 8 * (context.extractor.num_frames(int(round(min(case.seconds, 60.0) * 16000))) // 16)
        if abs(tokens.shape[0] - expected) > 8:
            problems.append(f"{tokens.shape[0]} tokens, expected {expected}")
        if case.seconds > 60 and not any("were cut" in message for message in outcome.warnings):
            problems.append("a clip cut to 60 s was not reported")
    return problems


def cli_index_entry(context: Context, path: str) -> Outcome:
    """`audio-qformer index DIR` (`AudioLibrary.index`) on the input's folder, into one shared library."""
    from audio_qformer.identity import clip_key

    if not os.path.exists(path):
        return Outcome("n/a", "a folder scan only sees files that exist")
    key = clip_key(path)
    try:
        with _Warnings("audio_qformer", "audio_io") as warned, _Measure() as measure:
            library = context.library
            report = library.index(os.path.dirname(path), show_progress=False)
    except Exception as error:  # a batch job must never raise for one bad input
        return Outcome("error", f"crashed: {type(error).__name__}", str(error), type(error))
    stored = np.array(library.embeddings.get(key), dtype=np.float32) if key in library.embeddings else None
    detail = f"{len(stored)} window{'s' * (len(stored) > 1)}" if stored is not None else ""
    outcome = batch_outcome(path, stored, report["failed"], warned.messages, detail)
    outcome.seconds, outcome.peak_mib = measure.seconds, measure.peak_mib
    return outcome


def _check_windows(case: AudioCase, outcome: Outcome, context: Context) -> list[str]:
    """One embedding row per 10.24 s window (5.12 s apart), each of the tiny model's 4 queries x 16."""
    from audio_io import window_starts

    rows = outcome.value
    if case.seconds is None:
        return []
    expected = len(window_starts(int(round(case.seconds * 16000)), 163840, 81920))
    return [] if rows.shape == (expected, 64) else [f"stored {rows.shape}, expected ({expected}, 64)"]


AUDIO_ENTRY_POINTS: dict[str, EntryPoint] = {
    "BeatsFeatureExtractor": EntryPoint("array", feature_extractor_entry, names_file=False),
    "load_audio": EntryPoint("file", load_audio_entry),
    "load_audiofolder": EntryPoint("listing", loader_entry),
    "build_cache": EntryPoint("batch", build_cache_entry, check=_check_tokens),
    "audio-qformer index": EntryPoint("folder", cli_index_entry, check=_check_windows),
}


# --- caption entry points --------------------------------------------------------------------------------------------


def clean_caption_entry(context: Context, text: str) -> Outcome:
    from audio_qformer.data import clean_caption

    try:
        cleaned = clean_caption(text)
    except Exception as error:
        return _error_outcome(error)
    words = len(cleaned.split())
    return Outcome("ok", f"{words} word{'s' * (words > 1)}" if words else "empty", value=cleaned)


def caption_loader_entry(context: Context, text: str) -> Outcome:
    """`load_audiofolder` with the caption for one clip (and a normal caption for another)."""
    from audio_qformer.data import load_audiofolder

    directory = os.path.join(context.directory, "captions", hashlib.sha1(text.encode()).hexdigest()[:12])
    os.makedirs(directory, exist_ok=True)
    soundfile.write(os.path.join(directory, "input.wav"), tone(1.0, 16000), 16000)
    _companion(directory)
    _write_metadata(directory, [["input.wav", text], ["companion clip.wav", "a good clip"]])
    try:
        with _Warnings("audio_qformer") as warned:
            dataset, skipped = load_audiofolder(directory)
    except Exception as error:
        return _error_outcome(error)
    rows = [row for row in dataset if row["audio_path"].endswith("input.wav")]
    if rows:
        return Outcome("ok", "row kept", value=rows[0])
    items = [item for item in skipped if item["audio"].endswith("input.wav")]
    if items:
        return Outcome("skipped", items[0]["reason"], items[0]["reason"], item=items[0], warnings=warned.messages)
    return Outcome("dropped", "neither kept nor reported")


def processor_text_entry(context: Context, text: str) -> Outcome:
    """`AudioQFormerProcessor(text=...)`: the tokenizer with the processor's truncation."""
    try:
        ids = context.processor(text=text, return_tensors="np")["input_ids"][0]
    except Exception as error:
        return _error_outcome(error)
    unknown = int((ids == context.processor.tokenizer.unk_token_id).sum())
    return Outcome("ok", f"{len(ids)} tokens" + (f", {unknown} [UNK]" if unknown else ""), value=ids)


CAPTION_ENTRY_POINTS: dict[str, EntryPoint] = {
    "clean_caption": EntryPoint("clean", clean_caption_entry, names_file=False),
    "load_audiofolder": EntryPoint("listing", caption_loader_entry, names_file=False),
    "processor (text)": EntryPoint("tokenizer", processor_text_entry, names_file=False),
}


# --- checking outcomes -----------------------------------------------------------------------------------------------


def _close_to_reference(case: AudioCase, waveform: np.ndarray) -> list[str]:
    reference = case.reference
    if reference is None:
        return []
    if abs(waveform.shape[0] - reference.shape[0]) > 1:
        return [f"{waveform.shape[0]} samples at 16 kHz, expected {reference.shape[0]}"]
    n = min(waveform.shape[0], reference.shape[0])
    got, want = waveform[:n], reference[:n]
    if case.lossy:
        ratio = np.sqrt(np.mean(got**2) / np.mean(want**2))
        return [] if abs(ratio - 1) < 0.05 else [f"level {ratio:.3f} of the signal written"]
    edge = min(200, n // 4)  # resamplers ring at the edges of a clip cut from a longer signal
    error = np.abs(got[edge : n - edge] - want[edge : n - edge]).max() if n > 2 * edge else 0.0
    return [] if error < 5e-3 else [f"differs from the signal written by up to {error:.4f}"]


def _check_ok(case, kind: str, outcome: Outcome, context: Context) -> list[str]:
    problems = []
    if isinstance(case, CaptionCase):
        if kind == "clean":
            if case.cleaned is not None and outcome.value != case.cleaned:
                problems.append(f"clean_caption gave {outcome.value!r}, expected {case.cleaned!r}")
            if len(outcome.value.split()) > 50:
                problems.append("more than 50 words")
        elif kind == "listing" and outcome.value["caption"] != case.text:
            problems.append("the loader changed the caption")
        elif kind == "tokenizer":
            ids, tokenizer = outcome.value, context.processor.tokenizer
            # The processor's 35, unless the tokenizer brings its own `max_length` (see `AudioQFormerProcessor`).
            limit = tokenizer.init_kwargs.get("max_length") or type(context.processor).text_kwargs["max_length"]
            if ids[0] != tokenizer.cls_token_id or ids[-1] != tokenizer.sep_token_id:
                problems.append("not framed by [CLS] ... [SEP]")
            if len(ids) > limit or (case.truncated and len(ids) != limit):
                problems.append(f"{len(ids)} tokens; the limit is {limit}")
        return problems

    if kind == "file":
        waveform = outcome.value
        if waveform.dtype != np.float32 or waveform.ndim != 1 or not np.isfinite(waveform).all():
            problems.append(f"not a finite mono float32 waveform ({waveform.dtype}, {waveform.shape})")
        elif case.seconds is not None and abs(waveform.shape[0] - case.seconds * 16000) > 1:
            problems.append(f"{waveform.shape[0]} samples, expected {case.seconds * 16000:.0f}")
        else:
            problems += _close_to_reference(case, waveform)
        if case.silent and np.abs(waveform).max() != 0:
            problems.append("silence is not silent")
    elif kind == "array":
        features, waveform = outcome.value
        values = features["input_features"]
        frames = context.extractor.num_frames(waveform.shape[0])
        if values.shape != (1, frames, context.extractor.feature_size) or not np.isfinite(values).all():
            expected = (1, frames, context.extractor.feature_size)
            problems.append(f"features {values.shape}, expected {expected}, finite")
        if case.silent and not np.allclose(values, context.extractor.padding_value, rtol=1e-6):
            problems.append("the fbank of silence is not the log floor")
    elif kind == "listing":
        if os.path.basename(outcome.value["audio_path"]) != os.path.basename(context.input_path(case)):
            problems.append("the row does not point at the file")
    elif kind in ("batch", "folder"):
        stored = np.asarray(outcome.value)
        if stored.ndim != 2 or stored.shape[0] == 0 or not np.isfinite(stored).all():
            problems.append(f"stored {stored.shape} {stored.dtype}, expected a non-empty finite (rows, size) array")
    if case.max_peak_mib is not None and outcome.peak_mib > case.max_peak_mib:
        problems.append(f"used {outcome.peak_mib:.0f} MiB, over the budget of {case.max_peak_mib:.0f} MiB")
    return problems


def verdict(case, entry_name: str, outcome: Outcome, context: Context) -> list[str]:
    """What is wrong with `outcome` for this case at this entry point (empty when it is as expected)."""
    entry_points = AUDIO_ENTRY_POINTS if isinstance(case, AudioCase) else CAPTION_ENTRY_POINTS
    entry = entry_points[entry_name]
    expect = case.expect[entry.kind]
    if outcome.status == "skip":
        return []
    if outcome.status != expect.status:
        return [f"expected {expect}, got {outcome}: {outcome.message}".rstrip(": ")]
    problems = []
    path = context.input_path(case) if isinstance(case, AudioCase) else None
    if expect.status == "error":
        if not issubclass(outcome.error, expect.error):
            problems.append(f"raised {outcome.error.__name__}, expected {expect.error.__name__}")
        if not re.search(expect.match, outcome.message):
            problems.append(f"message {outcome.message!r} does not say /{expect.match}/")
        if entry.names_file and path not in outcome.message:
            problems.append(f"message {outcome.message!r} does not name the file")
    elif expect.status == "skipped":
        if not re.search(expect.match, outcome.message):
            problems.append(f"reported reason {outcome.message!r} does not say /{expect.match}/")
        if entry.names_file and os.path.basename(outcome.item["audio"]) != os.path.basename(path):
            problems.append(f"the report names {outcome.item['audio']!r}, not the file")
        if not any(outcome.item["audio"] in message for message in outcome.warnings):
            problems.append("skipped without a warning naming it")
    elif expect.status == "ok":
        problems += _check_ok(case, entry.kind, outcome, context)
        problems += entry.check(case, outcome, context) if entry.check else []
    return problems


# --- the table -------------------------------------------------------------------------------------------------------


def label(case, entry_name: str, outcome: Outcome) -> str:
    """The outcome in a few words; an expected error shows the words of its message the expectation looks for."""
    entry_points = AUDIO_ENTRY_POINTS if isinstance(case, AudioCase) else CAPTION_ENTRY_POINTS
    expect = case.expect[entry_points[entry_name].kind]
    found = re.search(expect.match, outcome.message) if outcome.status == "error" and expect.match else None
    return f"error: {outcome.error.__name__} ({found.group(0)})" if found else str(outcome)


def _table(title: str, cases, entry_points: dict[str, EntryPoint], context: Context) -> list[str]:
    width = 44
    names = list(entry_points)
    first = max(len(case.name) for case in cases) + 2
    print(f"\n{title}\n")
    print("".ljust(first) + "".join(name.ljust(width) for name in names))
    print("".ljust(first) + "".join(f"({entry_points[name].kind})".ljust(width) for name in names))
    wrong = []
    for case in cases:
        cells = []
        for name in names:
            outcome = context.run(case, name)
            problems = verdict(case, name, outcome, context)
            text = ("✗ " if problems else "") + label(case, name, outcome)
            cells.append((text if len(text) <= width - 2 else text[: width - 3] + "…").ljust(width))
            wrong += [f"{case.name} × {name}: {problem}" for problem in problems]
        print(case.name.ljust(first) + "".join(cells))
    return wrong


def main() -> int:
    import datasets

    datasets.disable_progress_bars()  # keep the output a table
    datasets.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as directory:
        context = Context(directory)
        wrong = _table("Audio inputs × entry points", audio_cases(), AUDIO_ENTRY_POINTS, context)
        wrong += _table("Captions × entry points", caption_cases(), CAPTION_ENTRY_POINTS, context)
    print("\n" + "\n".join(wrong) if wrong else "")
    print(f"{len(wrong)} unexpected outcome(s)" if wrong else "Every outcome as expected.")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
