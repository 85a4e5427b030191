"""What `audio-qformer` does with the inputs a user gets wrong or changes: paths that move, sources that are missing,
settings given to an existing library, devices this machine lacks, stale exports imported into a live library."""

import json
import os
import shutil

import numpy as np
import pytest
import soundfile
import torch
from conftest import make_waveform
from test_search import copy_of, saved_model, sounds  # noqa: F401 (fixtures shared with the search tests)

from audio_qformer.library import AudioLibrary, load_model, open_dataset
from audio_qformer.cli import main


def exit_status(argv) -> int:
    """`main`'s status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def recorded_model(lib) -> str:
    with open(os.path.join(lib, "library.json")) as handle:
        return json.load(handle)["model"]


def test_a_library_finds_its_model_from_any_folder_and_after_a_move(saved_model, sounds, tmp_path, monkeypatch, capsys):  # noqa: F811
    shutil.copytree(saved_model, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    assert main(["--library", "lib", "index", str(sounds), "--model", "model"]) == 0  # a relative folder ...
    assert recorded_model("lib") == str(tmp_path / "model")  # ... recorded by its absolute path, as from Python
    assert AudioLibrary("pylib", *load_model("model"), "model", create=True).config["model"] == str(tmp_path / "model")
    capsys.readouterr()
    os.makedirs("elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["--library", "../lib", "search", "a rising chirp", "-k", "2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["results"]
    assert len(found) == 2

    shutil.move(str(tmp_path / "model"), str(tmp_path / "moved"))  # the model moves: a clear error, naming the fix
    assert main(["--library", "../lib", "search", "a rising chirp"]) == 2
    error = capsys.readouterr().err
    assert f"The library ../lib's model {tmp_path / 'model'} cannot be loaded here" in error and "--model" in error
    import app

    with pytest.raises(SystemExit, match=r"app.py: The library ../lib's model .* cannot be loaded here"):
        app.open_library("../lib", None, None)
    assert main(["--library", "../lib", "search", "a rising chirp", "-k", "2", "--json", "--model", "../moved"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == found
    assert recorded_model("../lib") == str(tmp_path / "model")  # searching records nothing ...
    assert main(["--library", "../lib", "index", str(sounds), "--model", "../moved"]) == 0
    assert "0 embedded, 6 already indexed" in capsys.readouterr().out
    assert recorded_model("../lib") == str(tmp_path / "moved")  # ... index with --model records where it is now
    assert main(["--library", "../lib", "search", "a rising chirp", "-k", "2", "--json"]) == 0


def test_index_from_an_audiofolder_and_missing_sources(saved_model, sounds, tmp_path, capsys):  # noqa: F811
    folder = copy_of(sounds, tmp_path, "audiofolder")
    (folder / "metadata.csv").write_text("file_name,text\na.wav,x\n")
    assert main(["--library", str(tmp_path / "plain"), "index", str(folder), "--model", saved_model]) == 0
    # An audiofolder through --hub_dataset: its files, read by this project's decoder (no torchcodec), the same library.
    assert main(["--library", str(tmp_path / "hub"), "index", "--hub_dataset", str(folder), "--model", saved_model]) == 0
    assert "6 audio files in" in capsys.readouterr().out.splitlines()[-1]
    plain, hub = AudioLibrary.load(str(tmp_path / "plain")), AudioLibrary.load(str(tmp_path / "hub"))
    assert hub.live_keys() == plain.live_keys() and hub.stored_files() == plain.stored_files()
    os.makedirs(folder / "test")
    shutil.copy(folder / "a.wav", folder / "test" / "a.wav")
    assert [os.path.basename(p) for p in open_dataset(str(folder), "test")["audio"]] == ["a.wav"]  # a split's subfolder
    with pytest.raises(ValueError, match="has no subfolder 'valid'"):
        open_dataset(str(folder), "valid")

    # Sources that are not there: one line naming them, and no library left behind.
    for command in (["index", str(tmp_path / "nowhere")], ["index", "--hub_dataset", str(tmp_path / "nowhere")]):
        assert main(["--library", str(tmp_path / "new"), *command, "--model", saved_model]) == 2
        assert f"{tmp_path / 'nowhere'}: no" in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "new")
    # A saved Dataset has one split: another --hub_split is refused, not ignored.
    from datasets import Dataset

    Dataset.from_dict({"audio": [str(folder / "a.wav")]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"saved holds one split, 'train'; not 'test' \(--hub_split\)"):
        open_dataset(str(tmp_path / "saved"), "test")
    # An exported Parquet file may be named directly.
    assert main(["--library", str(tmp_path / "plain"), "export", str(tmp_path / "out")]) == 0
    parquet = tmp_path / "out" / "data" / "train-00000-of-00001.parquet"
    assert len(open_dataset(str(parquet))) == 6
    import pyarrow.parquet as pq  # an export with no rows: refused in words, no library made

    os.makedirs(tmp_path / "empty-export" / "data")
    pq.write_table(pq.read_table(parquet).slice(0, 0), tmp_path / "empty-export" / "data" / parquet.name)
    capsys.readouterr()
    assert main(["--library", str(tmp_path / "imported"), "import", str(tmp_path / "empty-export")]) == 2
    assert "empty-export has no rows (split 'train')" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "imported")


def test_settings_devices_and_counts_are_checked(saved_model, sounds, tmp_path, capsys):  # noqa: F811
    lib = str(tmp_path / "lib")
    assert main(["--library", lib, "index", str(sounds), "--model", saved_model]) == 0
    capsys.readouterr()
    checks = [
        (["index", str(sounds), "--window_seconds", "2"], "cuts files with window_seconds 10.24; --window_seconds applies"),
        (["index", str(sounds), "--hop_seconds", "1"], "cuts files with hop_seconds 5.12; --hop_seconds applies"),
        (["similar", str(sounds)], "is a folder: `similar` takes one audio file"),
        (["--device", "gpu", "search", "x"], "--device gpu: not a device"),
        (["caption", str(sounds), "--model", str(tmp_path / "gone")], f"The model {tmp_path / 'gone'} cannot be loaded"),
    ]
    if not torch.cuda.is_available():
        checks.append((["--device", "cuda", "search", "x"], "--device cuda: no CUDA device here"))
    checks += [(["search", "x", "-k", "0"], "argument -k: must be at least 1; got 0"),
               (["index"], "index needs a folder DIR or --hub_dataset"),
               (["index", str(sounds), "--hub_dataset", "x"], "not both")]  # fmt: skip
    for command, message in checks:
        assert exit_status(["--library", lib, *command]) == 2, command
        assert message in capsys.readouterr().err, command
    # An empty library exports nothing and leaves no folder.
    os.makedirs(tmp_path / "empty")
    assert main(["--library", str(tmp_path / "e"), "index", str(tmp_path / "empty"), "--model", saved_model]) == 0
    assert main(["--library", str(tmp_path / "e"), "export", str(tmp_path / "out")]) == 2
    assert "holds no files yet: nothing to export" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    # A first run's stored files are not listed until it ends: search says so.
    first = AudioLibrary(str(tmp_path / "first"), *load_model(saved_model), saved_model, create=True)
    width = first.embeddings.hidden_size
    first.embeddings.append([("k", np.zeros((1, width)), {"path": "x.wav", "seconds": 1.0, "starts": [0]})])
    with pytest.raises(ValueError, match="lists no files yet: an index run is storing its first files"):
        first.search(["x"])


def test_import_keeps_the_entries_a_library_has(saved_model, sounds, tmp_path, capsys):  # noqa: F811
    folder = copy_of(sounds, tmp_path)
    lib = str(tmp_path / "lib")
    assert main(["--library", lib, "index", str(folder), "--model", saved_model, "--vector_index"]) == 0
    assert main(["--library", lib, "export", str(tmp_path / "old")]) == 0
    soundfile.write(folder / "a.wav", make_waveform(2.5, seed=40, kind="chirp"), 16000)  # changed since the export
    assert main(["--library", lib, "index", str(folder), "--vector_index"]) == 0
    out = capsys.readouterr().out
    assert "1 embedded, 5 already indexed" in out and "Vector index: 6 windows (1 more of files changed or gone" in out
    library = AudioLibrary.load(lib)
    before = {f["path"]: f for f in library.stored_files()}
    changed = next(key for key in library.live_keys() if library.path_of(key) == str(folder / "a.wav"))
    assert main(["--library", lib, "import", str(tmp_path / "old")]) == 0
    assert "6 files, 6 windows with" in capsys.readouterr().out  # the library's files now, not every stored window
    library = AudioLibrary.load(lib)
    assert {f["path"]: f for f in library.stored_files()} == before
    assert changed in library.live_keys()  # the new embeddings, not the export's stale ones


def test_open_is_the_one_way_in_and_refuses_other_settings(saved_model, tmp_path):  # noqa: F811
    from audio_qformer.library import LibrarySettingError

    lib = str(tmp_path / "lib")
    with pytest.raises(FileNotFoundError, match="No audio library at"):
        AudioLibrary.open(lib)
    with pytest.raises(ValueError, match="needs a model"):
        AudioLibrary.open(lib, create=True)
    made = AudioLibrary.open(lib, saved_model, create=True, window_seconds=4.0, hop_seconds=2.0, captions=True)
    assert (made.config["window_seconds"], made.config["hop_seconds"], made.config["captions"]) == (4.0, 2.0, True)
    again = AudioLibrary.open(lib)  # its recorded model, its own settings
    assert again.config == made.config
    for setting, value in (("window_seconds", 10.24), ("captions", False), ("keep_tokens", True), ("beats_dtype", "bfloat16")):
        with pytest.raises(LibrarySettingError, match=f"created with {setting}="):
            AudioLibrary.open(lib, create=True, **{setting: value})
        with pytest.raises(LibrarySettingError):  # the constructor, as the app and the Space builder call it
            AudioLibrary(lib, *load_model(saved_model), **{setting: value})
    assert AudioLibrary.open(lib, window_seconds=4.0, captions=True).config == made.config  # the same: accepted
