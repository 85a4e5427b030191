"""
The loaders on small copies of the real datasets as they are published and downloaded: the same folder trees, file
names, CSV and JSON schemas, Parquet columns and split names (a few rows each, short generated audio), with the file
names and captions the real data has (commas, quotes, accents).
"""

import csv
import json
import os

import numpy as np
import pytest
import soundfile
from conftest import make_waveform

from audio_io import AudioLoadError, load_audio
from audio_qformer.data import load_audiocaps, load_clotho, load_hub_dataset, load_wavcaps


CLOTHO_FILES = ["Radio Garble, \"live\".wav", "Pájaros en el jardín.wav", "01 A pug struggles to breathe 1_14_2008.wav"]
CLOTHO_CAPTIONS = [
    [f"{word} number {i}, with a comma" if i % 2 else f"a \"quoted\" {word} café sound {i}" for i in range(1, 6)]
    for word in ("radio", "birds", "dog")
]  # fmt: skip


def write_audio(path, seconds=0.5, seed=0, rate=16000, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, make_waveform(seconds, seed=seed), rate, format=fmt)


def write_csv(path, header, rows, delimiter=","):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


def write_clotho(csv_path, audio_dir):
    for i, name in enumerate(CLOTHO_FILES):
        write_audio(os.path.join(audio_dir, name), seed=i)
    write_csv(csv_path, ["file_name"] + [f"caption_{i}" for i in range(1, 6)],
              [[name] + captions for name, captions in zip(CLOTHO_FILES, CLOTHO_CAPTIONS)])  # fmt: skip


def captions_by_clip(dataset):
    grouped = {}
    for audio_id, caption in zip(dataset["audio_id"], dataset["caption"]):
        grouped.setdefault(audio_id, []).append(caption)
    return grouped


def test_clotho_zenodo_and_aac_datasets_layouts(tmp_path):
    zenodo = tmp_path / "zenodo"
    write_clotho(zenodo / "clotho_captions_development.csv", zenodo / "development")
    aac = tmp_path / "aac"
    write_clotho(aac / "CLOTHO_v2.1" / "clotho_csv_files" / "clotho_captions_evaluation.csv",
                 aac / "CLOTHO_v2.1" / "clotho_audio_files" / "evaluation")  # fmt: skip
    expected = {f"clotho/{{split}}/{name}": captions for name, captions in zip(CLOTHO_FILES, CLOTHO_CAPTIONS)}
    for root, split, name in [(zenodo, "development", "development"), (zenodo, "dev", "development"),
                              (aac, "evaluation", "evaluation"), (aac / "CLOTHO_v2.1", "eval", "evaluation")]:  # fmt: skip
        dataset, skipped = load_clotho(str(root), split)
        assert not skipped and len(dataset) == 15
        assert captions_by_clip(dataset) == {k.format(split=name): v for k, v in expected.items()}
        assert all(os.path.isfile(path) for path in dataset["audio_path"])
    with pytest.raises(FileNotFoundError, match="clotho_captions_validation.csv under .*CLOTHO_v2.1/clotho_csv_files"):
        load_clotho(str(aac), "validation")
    with pytest.raises(ValueError, match="captioning test, without captions"):
        load_clotho(str(aac), "test")


def write_parquet_copy(folder, splits: dict[str, dict]):
    """A Hub dataset's Parquet layout (`data/{split}-00000-of-00001.parquet`), audio as an `Audio` column."""
    from datasets import Audio, Dataset

    for split, columns in splits.items():
        os.makedirs(folder / "data", exist_ok=True)
        table = Dataset.from_dict(columns).cast_column("audio", Audio(decode=False))
        table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))


def clip_bytes(seed, seconds=0.5):
    import io

    buffer = io.BytesIO()
    soundfile.write(buffer, make_waveform(seconds, seed=seed), 16000, format="WAV")
    return buffer.getvalue()


def test_clotho_hub_copy_with_joined_captions(tmp_path):
    """CLAPv2/Clotho: `audio`, `text` (the five captions joined with ". "), `index`; train / validation / test."""
    copy = tmp_path / "CLAPv2" / "Clotho"
    columns = {
        "audio": [{"bytes": clip_bytes(i), "path": name} for i, name in enumerate(CLOTHO_FILES)],
        "text": [". ".join(captions) for captions in CLOTHO_CAPTIONS],
        "index": [str(i) for i in range(3)],
    }
    write_parquet_copy(copy, {"train": columns, "validation": columns, "test": columns})
    audio_dir = tmp_path / "audio"
    dataset, skipped = load_hub_dataset(str(copy), "evaluation", audio_dir=str(audio_dir))  # the copy's `test`
    assert not skipped and len(dataset) == 15  # five captions a clip, as DCASE's protocol counts them
    assert sorted(captions_by_clip(dataset).values()) == sorted(CLOTHO_CAPTIONS)
    assert set(dataset["audio_id"]) == {f"{copy}/test/{i}" for i in range(3)}
    # The audio was written once per clip, and the rows hold paths only.
    files = sorted(set(dataset["audio_path"]))
    assert len(files) == 3 and all(f.startswith(str(audio_dir)) for f in files) and set(dataset["audio_bytes"]) == {None}
    for path in files:  # named `{hash of the bytes}-{the row's file name}`
        name = os.path.basename(path).split("-", 1)[1]
        np.testing.assert_array_equal(load_audio(path), load_audio(data=clip_bytes(CLOTHO_FILES.index(name))))
    # Another process of the launch reads the rows the first one listed, without the dataset.
    again, again_skipped = load_hub_dataset(str(copy), "evaluation", audio_dir=str(audio_dir), write=False)
    assert again.to_dict() == dataset.to_dict() and again_skipped == skipped
    # The same copy with caption_1..caption_5 columns.
    by_column = {"audio": columns["audio"], **{f"caption_{j + 1}": [c[j] for c in CLOTHO_CAPTIONS] for j in range(5)}}
    write_parquet_copy(tmp_path / "five", {"test": by_column})
    dataset, _ = load_hub_dataset(str(tmp_path / "five"), "test", caption_columns=[f"caption_{j}" for j in range(1, 6)])
    assert sorted(captions_by_clip(dataset).values()) == sorted(CLOTHO_CAPTIONS)


YOUTUBE_IDS = ["r1nicOVtvkQ", "-0w1YA1Hm4_", "7fmOlUlwoNg", "zzX_-q01abc", "GoneVideo01"]


def audiocaps_csvs(folder):
    """v1 CSVs: train one caption a clip; val five rows a clip. The last video is gone from YouTube."""
    train = [[100 + i, ytid, 30 + i, f"train caption, {ytid}"] for i, ytid in enumerate(YOUTUBE_IDS)]
    val = [[200 + 5 * i + j, ytid, 10 * i, f"val \"caption\" {j} of {ytid}"] for i, ytid in enumerate(YOUTUBE_IDS[:2])
           for j in range(5)]  # fmt: skip
    header = ["audiocap_id", "youtube_id", "start_time", "caption"]
    write_csv(folder / "train.csv", header, train)
    write_csv(folder / "val.csv", header, val)
    return train, val


@pytest.mark.parametrize("tool", ["aac-datasets", "audiocaps-dl", "audioset", "audiocaps-download", "custom"])
def test_audiocaps_as_each_download_tool_writes_it(tool, tmp_path):
    train, val = audiocaps_csvs(tmp_path / "csv")
    audio = tmp_path / "AUDIOCAPS" / "audio_32000Hz"
    for split, rows in (("train", train), ("val", val)):
        for audiocap_id, ytid, start, _ in rows:
            if ytid == "GoneVideo01":
                continue
            name = {
                "aac-datasets": f"{ytid}_{start}.flac",
                "audiocaps-dl": f"{ytid}_{start * 1000}_{start * 1000 + (10000 if start else 7250)}.wav",
                "audioset": f"Y{ytid}_{start:.3f}_{start + 10:.3f}.wav",
                "audiocaps-download": f"{audiocap_id}.ogg",  # one file per caption row
                "custom": f"clip-{ytid}-{start}.wav",
            }[tool]
            write_audio(str(audio / split / name), seed=start, fmt="OGG" if name.endswith(".ogg") else None)
    patterns = ["clip-{youtube_id}-{start_time}"] if tool == "custom" else []
    for csv_name, rows, clips in (("train.csv", train, 4), ("val.csv", val, 2)):
        # One parent folder for every CSV, searched at any depth.
        dataset, skipped = load_audiocaps(str(tmp_path / "csv" / csv_name), str(audio), patterns)
        grouped = captions_by_clip(dataset)
        assert len(grouped) == clips, (tool, csv_name)
        expected = {}
        for _, ytid, start, caption in rows:
            if ytid != "GoneVideo01":
                expected.setdefault(f"audiocaps/{ytid}_{start}", []).append(caption)
        assert grouped == expected, (tool, csv_name)
        assert [s["audio"] for s in skipped] == (["youtube GoneVideo01 from 34 s"] if csv_name == "train.csv" else [])
        assert all(p.startswith(str(audio / csv_name[:-4])) for p in dataset["audio_path"])


def test_audiocaps_errors_say_what_was_looked_for(tmp_path):
    audiocaps_csvs(tmp_path / "csv")
    write_audio(str(tmp_path / "audio" / "train" / "something_else.wav"))
    with pytest.raises(ValueError) as error:
        load_audiocaps(str(tmp_path / "csv" / "train.csv"), str(tmp_path / "audio"))
    message = str(error.value)
    for part in ("no file for any of its 5 clips (5 rows)", str(tmp_path / "audio"), "1 audio files, e.g. something_else.wav",
                 "{youtube_id}_{start_ms}_{end_ms}", "--audiocaps_file_pattern"):  # fmt: skip
        assert part in message
    with pytest.raises(ValueError, match="Unknown field {start}"):
        load_audiocaps(str(tmp_path / "csv" / "train.csv"), str(tmp_path / "audio"), ["{youtube_id}_{start}"])
    # An .m4a clip is listed, then refused when decoded, saying how to convert it.
    m4a = tmp_path / "m4a" / "100.m4a"
    m4a.parent.mkdir()
    m4a.write_bytes(b"\0\0\0\x20ftypM4A " + bytes(200))
    dataset, _ = load_audiocaps(str(tmp_path / "csv" / "train.csv"), str(m4a.parent))
    assert dataset["audio_path"] == [str(m4a)]
    with pytest.raises(AudioLoadError, match="ffmpeg -i in.m4a out.flac"):
        load_audio(str(m4a))


def test_audiocaps_hub_copy_one_row_per_caption(tmp_path):
    """OpenSound/AudioCaps: `audiocap_id, youtube_id, start_time, audio, caption`, the audio repeated in every row."""
    copy = tmp_path / "OpenSound" / "AudioCaps"
    rows = [(200 + j, "r1nicOVtvkQ", 10, f"caption {j}, of the clip") for j in range(5)] + [(300, "7fmOlUlwoNg", 0, "rain")]
    columns = {"audiocap_id": [r[0] for r in rows], "youtube_id": [r[1] for r in rows], "start_time": [r[2] for r in rows],
               "audio": [{"bytes": clip_bytes(r[2]), "path": f"{r[1]}.wav"} for r in rows], "caption": [r[3] for r in rows]}  # fmt: skip
    write_parquet_copy(copy, {"train": columns, "validation": columns, "test": columns})
    dataset, skipped = load_hub_dataset(str(copy), "val", audio_dir=str(tmp_path / "audio"))
    grouped = captions_by_clip(dataset)
    assert grouped == {f"{copy}/validation/r1nicOVtvkQ_10": [f"caption {j}, of the clip" for j in range(5)],
                       f"{copy}/validation/7fmOlUlwoNg_0": ["rain"]}  # fmt: skip
    assert len(set(dataset["audio_path"])) == 2 and len(os.listdir(tmp_path / "audio" / os.listdir(tmp_path / "audio")[0])) == 4


def test_wavcaps_json_and_exclusion_lists(tmp_path):
    root = tmp_path / "WavCaps"
    entries = {
        "FreeSound": [{"id": "180913", "file_name": "x.wav", "href": "...", "tags": ["dog"], "description": "d",
                       "author": "a", "duration": 2.5, "download_link": "...", "caption": "A dog barks, twice.",
                       "audio": "wav_path"},
                      {"id": "117790", "caption": "a Clotho clip", "duration": 1.0, "audio": "wav_path"},
                      {"id": "555", "caption": "not downloaded", "duration": 1.0, "audio": "wav_path"}],
        "AudioSet_SL": [{"id": "Yb0RFKhbpFJA.wav", "caption": "Music plays.", "duration": 10.0, "audio": "wav_path"},
                        {"id": "Yr1nicOVtvkQ.wav", "caption": "an AudioCaps clip", "duration": 10.0, "audio": "wav_path"}],
    }  # fmt: skip
    for source, data in entries.items():
        json_path = root / "json_files" / source / f"{source.lower()}_final.json"
        json_path.parent.mkdir(parents=True)
        json_path.write_text(json.dumps({"num_captions_per_audio": 1, "data": data}))
        for i, entry in enumerate(data):
            if entry["id"] != "555":  # as the zips unpack: the scratch path, then <Source>_flac/<id>.flac
                stem = entry["id"].replace(".wav", "")
                write_audio(str(root / "Audio" / "mnt" / "fast" / f"{source}_flac" / f"{stem}.flac"), seed=i)
    write_csv(root / "blacklist_clotho.full.v2.csv", ["index", "id"], [[0, "117790"]])
    (root / "blacklist.json").write_text(json.dumps({"AudioSet": ["Yr1nicOVtvkQ.wav"], "FreeSound": []}))
    exclude = [str(root / "blacklist_clotho.full.v2.csv"), str(root / "blacklist.json")]
    freesound, skipped = load_wavcaps(str(root / "json_files" / "FreeSound" / "freesound_final.json"), str(root / "Audio"), exclude)
    assert freesound["caption"] == ["A dog barks, twice."] and freesound["audio_id"] == ["wavcaps/FreeSound/180913.flac"]
    assert {s["audio"]: s["reason"] for s in skipped} == {"FreeSound/117790": "in an exclusion list",
                                                          "FreeSound/555": "missing file"}  # fmt: skip
    audioset, skipped = load_wavcaps(str(root / "json_files" / "AudioSet_SL" / "audioset_sl_final.json"), str(root / "Audio"), exclude)
    assert audioset["caption"] == ["Music plays."] and audioset["audio_path"][0].endswith("AudioSet_SL_flac/Yb0RFKhbpFJA.flac")
    assert skipped == [{"audio": "AudioSet_SL/Yr1nicOVtvkQ.wav", "reason": "in an exclusion list"}]


def test_loading_script_copies_are_refused_in_one_line(tmp_path):
    script_copy = tmp_path / "audiocaps"
    script_copy.mkdir()
    (script_copy / "audiocaps.py").write_text("import datasets\n")  # as confit/audiocaps holds it
    with pytest.raises(ValueError, match="is a dataset loading script, which datasets 4 and newer do not run"):
        load_hub_dataset(str(script_copy), "train")
