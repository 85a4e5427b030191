"""Libraries as data: `export` to Parquet (one row per window), `import` back without embedding, `index` from a dataset."""

import os
import shutil

import numpy as np
import pytest
import soundfile
import torch
from conftest import make_waveform, tiny_qformer_config
from test_search import saved_model, sounds  # noqa: F401 (fixtures shared with the search tests)

from audio_qformer.library import AudioLibrary, load_model
from audio_qformer.cli import main
from modeling_audio_qformer import AudioQFormerModel


TEXTS = ["a rising chirp", "quiet hiss", "a tone"]


@pytest.fixture(scope="module")
def library(saved_model, sounds, tmp_path_factory):  # noqa: F811
    """A library whose sounds live inside it (`LIB/sounds/`, stored relative), one of them 25 s long (four windows)."""
    directory = tmp_path_factory.mktemp("exported") / "lib"
    shutil.copytree(sounds, directory / "sounds")
    soundfile.write(directory / "sounds" / "long.wav", make_waveform(25.0, seed=7, kind="chirp"), 16000)
    library = AudioLibrary(str(directory), *load_model(saved_model), saved_model, create=True)
    library.index(str(directory / "sounds"), show_progress=False)
    return library


@pytest.fixture(scope="module")
def exported(library, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert main(["--library", library.directory, "export", str(out)]) == 0
    return str(out)


def relative(library, hits):
    return [(os.path.relpath(hit.path, library.directory), hit.start_seconds) for hit in hits]


def test_export_is_parquet_that_load_dataset_reads(library, exported):
    from datasets import load_dataset

    files = [os.path.join(exported, "data", "train-00000-of-00001.parquet")]
    dataset = load_dataset("parquet", data_files=files, split="train", cache_dir=os.path.join(exported, "..", "hf"))
    keys = library.live_keys()
    assert len(dataset) == sum(len(library.embeddings.metadata(key)["starts"]) == 0 or
                               len(library.embeddings.metadata(key)["starts"]) for key in keys) == 7 + 3  # fmt: skip
    assert dataset.features["audio_embeds"].shape == (4, 16) and dataset.features["audio_embeds"].dtype == "float16"
    assert set(dataset.unique("model")) == {library.config["model"]}
    assert set(dataset.unique("model_identity")) == {library.config["model_identity"]}
    rows = dataset.with_format("numpy")
    first = 0
    for key in keys:  # one row per window, in the library's order, embeddings exactly as stored
        meta, stored = library.embeddings.metadata(key), np.asarray(library.embeddings.get(key))
        block = rows[first : first + len(meta["starts"])]
        assert set(block["path"].tolist()) == {meta["path"]} and not os.path.isabs(meta["path"])  # relative: inside
        assert dataset[first : first + len(meta["starts"])]["start_seconds"] == [start / 16000 for start in meta["starts"]]
        np.testing.assert_array_equal(block["audio_embeds"].reshape(len(stored), -1).astype(np.float16), stored)
        first += len(meta["starts"])
    assert {p for p in dataset["path"] if p.endswith("long.wav")} == {os.path.join("sounds", "long.wav")}


def test_faiss_index_over_query_vectors_ranks_as_search(library, exported):
    """`Dataset.add_faiss_index` indexes one vector per row: a row per query token makes an exact (flat, inner
    product) index whose best row per file is the library's score, the best query token's cosine."""
    faiss = pytest.importorskip("faiss")
    from datasets import load_dataset

    windows = load_dataset(exported, split="train", cache_dir=os.path.join(exported, "..", "hf"))

    def query_rows(batch):  # one row per (window, query token)
        embeds = np.asarray(batch["audio_embeds"], dtype=np.float32)
        return {"path": np.repeat(batch["path"], embeds.shape[1]).tolist(), "query_embed": embeds.reshape(-1, embeds.shape[2])}

    vectors = windows.map(query_rows, batched=True, remove_columns=windows.column_names)
    vectors.add_faiss_index("query_embed", metric_type=faiss.METRIC_INNER_PRODUCT)
    tokens = library.processor.tokenizer(TEXTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        text_embeds = library.model.get_text_features(**tokens).text_embeds.numpy()
    scores, indices = vectors.search_batch("query_embed", text_embeds, k=len(vectors))
    for query_scores, query_indices, hits in zip(scores, indices, library.search(TEXTS, k=7)):
        best = {}
        for score, index in zip(query_scores, query_indices):
            best.setdefault(vectors[int(index)]["path"], float(score))  # best first: the file's best query vector
        assert list(best) == [os.path.relpath(hit.path, library.directory) for hit in hits]
        np.testing.assert_allclose(list(best.values()), [hit.score for hit in hits], atol=1e-5)


def test_import_searches_as_the_library(library, exported, tmp_path, capsys):
    target = str(tmp_path / "imported")
    assert main(["--library", target, "import", exported]) == 0
    assert "7 files, 10 windows" in capsys.readouterr().out
    imported = AudioLibrary.load(target)
    assert imported.stored_files() == [{**f, "path": f["path"].replace(library.directory, target)}
                                       for f in library.stored_files()]  # fmt: skip
    assert len(imported.tokens) == 0  # nothing embedded
    for ours, theirs in zip(imported.search(TEXTS, k=7), library.search(TEXTS, k=7)):
        assert relative(imported, ours) == relative(library, theirs)
        assert [h.score for h in ours] == [h.score for h in theirs]  # the same float16 numbers
    # Re-ranking needs BEATs tokens, which are not exported: without the audio it is refused, naming why ...
    with pytest.raises(ValueError, match="Re-ranking needs the BEATs tokens of .*sounds.*no such file"):
        imported.search(TEXTS, k=7, rerank=3)
    # ... and with the sounds copied beside it, the audio is decoded again and the order is the library's.
    shutil.copytree(os.path.join(library.directory, "sounds"), os.path.join(target, "sounds"))
    for ours, theirs in zip(imported.search(TEXTS, k=7, rerank=3), library.search(TEXTS, k=7, rerank=3)):
        assert relative(imported, ours) == relative(library, theirs)
        np.testing.assert_allclose([h.score for h in ours], [h.score for h in theirs], atol=1e-3)
    # An index run over the copied sounds finds every file stored already (content keys travel with the rows).
    assert imported.index(os.path.join(target, "sounds"), show_progress=False)["reused"] == 7
    # Importing twice adds nothing.
    again = AudioLibrary.from_dataset(exported, target)
    assert len(again.embeddings) == 7 and again.embeddings.shard_array(0).shape[0] == 10


def test_import_refuses_bad_datasets(library, exported, saved_model, tmp_path, tokenizer, capsys):  # noqa: F811
    from datasets import load_dataset

    from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor

    dataset = load_dataset(exported, split="train", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['model_identity'\]; its columns are \['path'"):
        AudioLibrary.from_dataset(dataset.remove_columns("model_identity"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="has no rows"):
        AudioLibrary.from_dataset(dataset.select([]), str(tmp_path / "b"))
    other = tmp_path / "other-model"
    torch.manual_seed(1)
    AudioQFormerModel(tiny_qformer_config()).save_pretrained(other)
    AudioQFormerProcessor(BeatsFeatureExtractor(), tokenizer).save_pretrained(other)
    assert main(["--library", str(tmp_path / "c"), "import", exported, "--model", str(other)]) == 2
    error = capsys.readouterr().err
    assert f"was embedded by {saved_model} (model_identity {library.config['model_identity']})" in error
    assert not os.path.exists(tmp_path / "c" / "library.json")  # refused before anything was written
    elsewhere = dataset.remove_columns("model").add_column("model", [str(tmp_path / "gone")] * len(dataset))
    with pytest.raises(ValueError, match=r"its model .*gone cannot be loaded here .*; give it with --model"):
        AudioLibrary.from_dataset(elsewhere, str(tmp_path / "e"))
    long_rows = [i for i, path in enumerate(dataset["path"]) if path.endswith("long.wav")]
    shuffled = dataset.select([long_rows[0], min(set(range(len(dataset))) - set(long_rows)), long_rows[1]])
    with pytest.raises(ValueError, match=r"the windows of sounds/long.wav \(file_key .*\) are not consecutive rows"):
        AudioLibrary.from_dataset(shuffled, str(tmp_path / "d"))


def test_export_pushes_with_datasets_push_to_hub(library, tmp_path, monkeypatch):
    from datasets import Dataset

    pushed = []
    monkeypatch.setattr(Dataset, "push_to_hub", lambda self, repo_id, **kwargs: pushed.append((repo_id, len(self), kwargs)))
    assert main(["--library", library.directory, "export", str(tmp_path / "out"), "--push_to_hub", "me/sounds"]) == 0
    assert pushed == [("me/sounds", 10, {"private": None})]
    assert os.listdir(tmp_path / "out") == ["data"]  # the temporary Arrow copy is gone


def test_index_from_a_dataset_equals_the_folder(saved_model, sounds, tmp_path, capsys):  # noqa: F811
    from datasets import Audio, Dataset

    folder = AudioLibrary(str(tmp_path / "folder"), *load_model(saved_model), saved_model, create=True)
    folder.index(str(sounds), show_progress=False)
    paths = sorted(str(p) for p in sounds.rglob("*") if p.is_file())

    # Rows carrying the encoded bytes (as a Hub dataset's Parquet does), saved to disk: written inside the library.
    rows = [{"bytes": open(p, "rb").read(), "path": os.path.basename(p)} for p in paths]
    with_bytes = Dataset.from_dict({"clip": rows, "caption": ["x"] * 6}).cast_column("clip", Audio(decode=False))
    with_bytes.save_to_disk(str(tmp_path / "saved"))
    lib = str(tmp_path / "from-bytes")
    command = ["--library", lib, "index", "--hub_dataset", str(tmp_path / "saved"), "--audio_column", "clip"]
    assert main([*command, "--model", saved_model]) == 0
    assert "6 audio files in" in capsys.readouterr().out
    assert main(command) == 0  # a re-run writes and embeds nothing
    assert "0 embedded, 6 already indexed" in capsys.readouterr().out
    from_bytes = AudioLibrary.load(lib)
    by_name = {os.path.basename(f["path"]).split("-", 1)[1]: f for f in from_bytes.stored_files()}
    assert sorted(by_name) == sorted(os.path.basename(p) for p in paths)
    assert all(os.path.dirname(f["path"]).endswith(os.path.join("sounds", "saved")) for f in by_name.values())
    for key in folder.live_keys():
        meta = folder.embeddings.metadata(key)
        twin = by_name[os.path.basename(meta["path"])]["path"]
        twin = next(k for k in from_bytes.live_keys() if from_bytes.path_of(k) == twin)
        assert from_bytes.embeddings.metadata(twin)["starts"] == meta["starts"]
        np.testing.assert_allclose(from_bytes.embeddings.get(twin).astype(np.float32),
                                   folder.embeddings.get(key).astype(np.float32), atol=2e-3)  # fmt: skip

    # Rows naming local files (an audiofolder's rows, undecoded): the very library a folder index makes.
    with_paths = Dataset.from_dict({"audio": paths + [str(tmp_path / "gone.wav")]})
    from_paths = AudioLibrary(str(tmp_path / "from-paths"), folder.model, folder.processor, saved_model, create=True)
    report = from_paths.index(with_paths, show_progress=False)
    assert (report["files"], report["embedded"]) == (7, 6)
    assert report["failed"] == [{"audio": str(tmp_path / "gone.wav"),
                                 "reason": "no such file, and the row holds no audio bytes"}]  # fmt: skip
    assert from_paths.live_keys() == folder.live_keys() and from_paths.stored_files() == folder.stored_files()
    for key in folder.live_keys():
        np.testing.assert_array_equal(from_paths.embeddings.get(key), folder.embeddings.get(key))

    # Bad input: a missing column (named with the dataset's real columns), an empty dataset.
    columns = r"saved \(--hub_audio_column audio\): no column\(s\) \['audio'\]; its columns are \['clip', 'caption'\]"
    with pytest.raises(ValueError, match=columns):
        from_paths.index(with_bytes, show_progress=False, dataset_name="saved")
    assert main(["--library", lib, "index", "--hub_dataset", str(tmp_path / "saved")]) == 2
    assert "its columns are ['clip', 'caption']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no rows"):
        from_paths.index(with_paths.select([]), show_progress=False)


def test_captions_travel_with_the_export(saved_model, sounds, tmp_path):  # noqa: F811
    # A library indexed with captions exports them (one per file, on each of its rows); the imported library shows them.
    lib = str(tmp_path / "lib")
    assert main(["--library", lib, "index", str(sounds), "--model", saved_model, "--captions"]) == 0
    assert main(["--library", lib, "export", str(tmp_path / "out")]) == 0
    assert main(["--library", str(tmp_path / "imported"), "import", str(tmp_path / "out")]) == 0
    original, imported = AudioLibrary.load(lib), AudioLibrary.load(str(tmp_path / "imported"))
    assert imported.config["captions"] is True
    expected = {(hit.path, hit.caption) for hit in original.search(TEXTS, k=6)[0]}
    assert {(hit.path, hit.caption) for hit in imported.search(TEXTS, k=6)[0]} == expected
    assert all(caption for _, caption in expected)


def test_encoder_settings_travel_with_the_export(saved_model, sounds, tmp_path):  # noqa: F811
    # How BEATs ran travels too, so that files indexed into the imported library are embedded as the others; an export
    # without those columns (made before they existed) imports as the exact float32 encoder.
    from datasets import load_dataset

    lib = str(tmp_path / "lib")
    library = AudioLibrary(lib, *load_model(saved_model), saved_model, create=True, beats_dtype="bfloat16")
    library.index(str(sounds), show_progress=False)
    assert main(["--library", lib, "export", str(tmp_path / "out")]) == 0
    assert main(["--library", str(tmp_path / "imported"), "import", str(tmp_path / "out")]) == 0
    imported = AudioLibrary.load(str(tmp_path / "imported"))
    assert (imported.config["beats_dtype"], imported.config["fast_cpu_encoder"]) == ("bfloat16", False)
    files = [os.path.join(tmp_path, "out", "data", "train-00000-of-00001.parquet")]
    dataset = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    older = dataset.remove_columns(["beats_dtype", "fast_cpu_encoder"])
    opened = AudioLibrary.from_dataset(older, str(tmp_path / "older"))
    assert (opened.config["beats_dtype"], opened.config["fast_cpu_encoder"]) == ("float32", False)
    assert [h.path for h in opened.search(TEXTS, k=6)[0]] == [h.path for h in imported.search(TEXTS, k=6)[0]]
