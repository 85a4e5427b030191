"""Loaders in the official layouts, the split, audio decoding, the feature cache and the crop."""

import csv
import json
import os

import numpy as np
import pytest
import soundfile
import torch
from conftest import TINY_BEATS, make_waveform

from audio_io import AudioLoadError, load_audio
from audio_qformer.data import (
    clean_caption,
    load_audiocaps,
    load_audiofolder,
    load_clotho,
    load_hub_dataset,
    split_by_clip,
)
from configuration_audio_qformer import BeatsConfig
from audio_qformer.features import FeatureCache, build_cache, model_fingerprint
from audio_qformer.identity import clip_key
from modeling_audio_qformer import BeatsModel
from processing_audio_qformer import BeatsFeatureExtractor
from train import crop_tokens


def write_wav(path, seconds=1.0, seed=0, rate=16000, channels=1):
    wave = make_waveform(seconds, seed=seed)
    if rate != 16000:
        wave = np.interp(np.arange(int(seconds * rate)) / rate, np.arange(wave.size) / 16000, wave).astype(np.float32)
    if channels > 1:
        wave = np.stack([wave] * channels, axis=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, wave, rate)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def clotho(tmp_path):
    root = tmp_path / "clotho"
    for i in range(3):
        write_wav(str(root / "development" / f"sound {i}.wav"), seed=i)
    (root / "development" / "corrupt.wav").write_bytes(b"RIFF not really a wav")
    header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    rows = [[f"sound {i}.wav"] + [f"caption {j} of sound {i}" for j in range(5)] for i in range(3)]
    rows += [["missing.wav"] + ["x"] * 5, ["corrupt.wav"] + ["a broken file, really"] * 5]
    write_csv(root / "clotho_captions_development.csv", header, rows)
    return root


def test_clotho_official_layout(clotho):
    dataset, skipped = load_clotho(str(clotho), "development")
    assert skipped == [{"audio": str(clotho / "development" / "missing.wav"), "reason": "missing file"}]
    assert len(dataset) == 4 * 5  # the corrupt file exists: it is caught when decoded (below)
    ids = dataset["audio_id"]
    assert ids.count("clotho/development/sound 0.wav") == 5 and len(set(ids)) == 4
    with pytest.raises(AudioLoadError, match="corrupt.wav: unreadable"):
        load_audio(str(clotho / "development" / "corrupt.wav"))
    with pytest.raises(FileNotFoundError, match="clotho_captions_evaluation.csv"):
        load_clotho(str(clotho), "evaluation")


def test_audiocaps_official_layout(tmp_path):
    audio = tmp_path / "audio"
    write_wav(str(audio / "abc123def45_30.wav"), seed=1)  # {youtube_id}_{start_time}
    write_wav(str(audio / "91.flac"), seed=2)  # {audiocap_id}
    rows = [[1, "abc123def45", 30, "a dog barks"], [2, "abc123def45", 30, "dogs bark outside"],
            [91, "zzzzzzzzzzz", 0, "rain falls"], [5, "goneeeeeeee", 10, "a video that was deleted"]]  # fmt: skip
    write_csv(tmp_path / "train.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], rows)
    dataset, skipped = load_audiocaps(str(tmp_path / "train.csv"), str(audio))
    assert sorted(dataset["caption"]) == ["a dog barks", "dogs bark outside", "rain falls"]
    by_caption = dict(zip(dataset["caption"], dataset["audio_id"]))
    assert by_caption["a dog barks"] == by_caption["dogs bark outside"] != by_caption["rain falls"]
    assert len(skipped) == 1 and "gone" in skipped[0]["audio"]


def test_audiofolder_and_hub_style_loading(tmp_path):
    folder = tmp_path / "my sounds"
    write_wav(str(folder / "a.wav"), seed=1)
    write_wav(str(folder / "sub" / "b.wav"), seed=2)
    write_csv(folder / "metadata.csv", ["file_name", "caption", "caption_2"],
              [["a.wav", "first", "premier"], ["sub/b.wav", "second", ""], ["c.wav", "gone", ""]])  # fmt: skip
    dataset, skipped = load_audiofolder(str(folder))
    assert sorted(dataset["caption"]) == ["first", "premier", "second"]
    assert [s["reason"] for s in skipped] == ["missing file"]
    # A load_dataset source with the audio as encoded bytes (the Hub layout of e.g. CLAPv2/Clotho).
    from datasets import Audio, Dataset

    with open(folder / "a.wav", "rb") as handle:
        data = handle.read()
    local = Dataset.from_dict({"audio": [{"bytes": data, "path": None}], "caption": [["one", "two"]]})
    local = local.cast_column("audio", Audio(decode=False))
    local.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    hub, skipped = load_hub_dataset("parquet", "train", data_files=str(tmp_path / "hub" / "train.parquet"))
    assert hub["caption"] == ["one", "two"] and len(set(hub["audio_id"])) == 1 and not skipped
    np.testing.assert_allclose(load_audio(data=hub[0]["audio_bytes"]), load_audio(str(folder / "a.wav")))
    with pytest.raises(ValueError, match="no column"):
        load_hub_dataset("parquet", "train", caption_columns=("text",), data_files=str(tmp_path / "hub" / "train.parquet"))


def test_load_audio_downmixes_and_resamples(tmp_path):
    write_wav(str(tmp_path / "stereo.wav"), seconds=1.0, rate=44100, channels=2)
    waveform = load_audio(str(tmp_path / "stereo.wav"))
    assert waveform.dtype == np.float32 and waveform.ndim == 1 and abs(waveform.shape[0] - 16000) <= 1
    reference = make_waveform(1.0)
    assert np.corrcoef(waveform[100:15900], reference[100:15900])[0, 1] > 0.99
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioLoadError, match="no samples"):
        load_audio(str(tmp_path / "empty.wav"))
    with pytest.raises(AudioLoadError, match="no such file"):
        load_audio(str(tmp_path / "nope.wav"))


def test_caption_cleaning_as_lavis():
    assert clean_caption('A Dog barks!  "Loudly" (twice).') == "a dog barks loudly twice"
    assert len(clean_caption("word " * 80).split()) == 50


def test_split_by_clip_sizes_and_seeding():
    from datasets import Dataset

    ids = [f"clip{i // 5}" for i in range(5000)]  # 1000 clips x 5 captions
    dataset = Dataset.from_dict({"audio_id": ids, "caption": [str(i) for i in range(5000)]})
    split = split_by_clip(dataset, num_validation=1000, seed=0)
    assert len(split["validation"]) == 1000 and len(split["train"]) == 4000
    assert not set(split["validation"]["audio_id"]) & set(split["train"]["audio_id"])
    assert split_by_clip(dataset, 1000, seed=0)["validation"]["caption"] == split["validation"]["caption"]
    assert split_by_clip(dataset, 1000, seed=1)["validation"]["caption"] != split["validation"]["caption"]
    uneven = Dataset.from_dict({"audio_id": ["a", "a", "a", "b", "c"], "caption": list("vwxyz")})
    assert len(split_by_clip(uneven, 2, seed=3)["validation"]) >= 2
    with pytest.raises(ValueError, match="keep any"):
        split_by_clip(uneven, 5)


def test_crop_on_time_patch_boundaries():
    tokens = np.arange(8 * 100)[:, None].repeat(2, axis=1)  # 100 time patches of 8 tokens
    starts = set()
    for seed in range(50):
        crop = crop_tokens(tokens, 512, 8, np.random.default_rng(seed))
        assert crop.shape == (512, 2) and crop[0, 0] % 8 == 0
        assert np.array_equal(crop[:, 0], np.arange(crop[0, 0], crop[0, 0] + 512))
        starts.add(int(crop[0, 0]))
    assert len(starts) > 10 and max(starts) <= 8 * (100 - 64)
    short = tokens[:200]
    assert crop_tokens(short, 512, 8, np.random.default_rng(0)) is short
    with pytest.raises(ValueError, match="multiple"):
        crop_tokens(tokens, 500, 8, np.random.default_rng(0))


@pytest.fixture
def beats():
    torch.manual_seed(0)
    return BeatsModel(BeatsConfig(**TINY_BEATS)).eval()


def test_feature_cache_extracts_resumes_and_invalidates(tmp_path, beats, monkeypatch):
    extractor = BeatsFeatureExtractor()
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / "audio" / f"{i}.wav"))
        write_wav(paths[-1], seconds=1.0 + 0.3 * i, seed=i)
    (tmp_path / "audio" / "bad.wav").write_bytes(b"junk")
    clips = [{"key": clip_key(p), "audio_path": p, "audio_bytes": None} for p in paths + [str(tmp_path / "audio" / "bad.wav")]]
    cache, failures, _ = build_cache(str(tmp_path / "cache"), clips, beats, extractor, batch_size=2, show_progress=False)
    assert len(cache) == 5 and [f["audio"] for f in failures] == [str(tmp_path / "audio" / "bad.wav")]
    assert "unreadable" in failures[0]["reason"]
    # The cached tokens are BEATs' output for the clip (float16).
    with torch.no_grad():
        expected = beats(**extractor(load_audio(paths[3]), sampling_rate=16000, return_tensors="pt")).last_hidden_state[0]
    cached = cache.get(clips[3]["key"])
    assert cached.dtype == np.float16 and cached.shape == tuple(expected.shape)
    np.testing.assert_allclose(cached.astype(np.float32), expected.numpy(), atol=2e-3, rtol=2e-3)

    # A second run computes nothing (every clip is cached; the bad one is tried again and fails again).
    calls = []
    original = beats.forward
    monkeypatch.setattr(beats, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    cache, failures, _ = build_cache(str(tmp_path / "cache"), clips[:5], beats, extractor, show_progress=False)
    assert calls == [] and not failures

    # A killed run: a torn index line and an unindexed block are cut off, and only the lost clip is recomputed.
    directory = cache.directory
    index = open(os.path.join(directory, "shard-0.jsonl")).read().splitlines()
    with open(os.path.join(directory, "shard-0.jsonl"), "w") as handle:
        handle.write("\n".join(index[:-1]) + "\n" + index[-1][:10])
    lost = json.loads(index[-1])["key"]
    with open(os.path.join(directory, "shard-0.bin"), "ab") as handle:
        handle.write(b"\0" * 1000)
    cache = FeatureCache(str(tmp_path / "cache"), os.path.basename(directory), 32)
    assert len(cache) == 4 and lost not in cache
    cache.extract(clips[:5], beats, extractor, show_progress=False)
    assert len(calls) == 1 and len(cache) == 5
    np.testing.assert_array_equal(cache.get(clips[3]["key"]), cached)

    # An edited file gets a new key; other BEATs weights get another cache directory.
    write_wav(paths[0], seconds=2.5, seed=9)
    os.utime(paths[0], ns=(1, 1))
    assert clip_key(paths[0]) != clips[0]["key"]
    other = BeatsModel(BeatsConfig(**TINY_BEATS)).eval()
    assert model_fingerprint(other, extractor) != model_fingerprint(beats, extractor)
    assert model_fingerprint(beats, BeatsFeatureExtractor(fbank_mean=0.0)) != model_fingerprint(beats, extractor)


# --- the embedded synthetic set -----------------------------------------------------------------------------------


def test_synthetic_sets_have_distinct_attributes_and_readable_captions(tmp_path):
    from audio_qformer.synthetic_sounds import all_attribute_sets, caption_attributes, distinct_attributes, generate

    # The demo's sizes draw without repeats within a set; sets may overlap each other.
    rng = np.random.default_rng(0)
    drawn = {name: [json.dumps(a, sort_keys=True) for a in distinct_attributes(count, rng)]
             for name, count in (("train", 400), ("validation", 60), ("library", 60))}  # fmt: skip
    assert all(len(set(sets)) == len(sets) for sets in drawn.values())
    assert len(all_attribute_sets()) == 567 and set(drawn["library"]) & set(drawn["train"])
    with pytest.raises(ValueError, match="only 567 combinations"):
        distinct_attributes(568, rng)

    generate(str(tmp_path), num_train=30, num_validation=5, num_library=8, captions_per_clip=3, seed=1)
    for split, count in (("train", 30), ("validation", 5), ("library", 8)):
        with open(tmp_path / split / "metadata.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        attributes = [json.loads(row["attributes"]) for row in rows]
        assert len(rows) == count and len({json.dumps(a, sort_keys=True) for a in attributes}) == count
        for row, clip in zip(rows, attributes):
            captions = [row[f"caption_{i}"] for i in (1, 2, 3)]
            assert len(set(captions)) == 3  # three wordings, each naming exactly this clip's attributes
            assert all(caption_attributes(caption) == clip for caption in captions), captions
            wave, rate = soundfile.read(tmp_path / split / row["file_name"])
            assert rate == 16000 and 2.5 <= len(wave) / rate <= 4.5 and np.abs(wave).max() < 1
    with pytest.raises(ValueError, match="no wording"):
        caption_attributes("a low tone barking loudly, in a large hall and at an even volume")


def test_reading_audio_and_searching_import_no_datasets():
    """One job per module: decoding a file or searching a library never loads `datasets` (the training loaders do)."""
    import subprocess
    import sys

    from conftest import ROOT

    code = "import sys, audio_io, audio_qformer.library, audio_qformer.cli; print('datasets' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
