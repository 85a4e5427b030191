"""The sound-library search engine and its CLI, and the Table-1 evaluation script, on generated audio and a tiny model."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import soundfile
import torch
from conftest import make_waveform, tiny_qformer_config

from audio_qformer import beats_cpu
from audio_io import window_starts
from audio_qformer.indexing import balanced_shares
from audio_qformer.library import AudioLibrary, load_model
from audio_qformer.cli import main
from modeling_audio_qformer import AudioQFormerModel, max_over_queries
from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    AudioQFormerModel(tiny_qformer_config()).save_pretrained(directory)
    AudioQFormerProcessor(BeatsFeatureExtractor(), tokenizer).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    """Six short clips of different kinds and lengths, one in a sub-folder with a space and non-ASCII in its name."""
    directory = tmp_path_factory.mktemp("sounds")
    os.makedirs(directory / "sub folder é")
    names = ["a.wav", "b.wav", "c.flac", "d.wav", "e.wav", "sub folder é/f.wav"]
    kinds = ["mix", "chirp", "quiet", "mix", "chirp", "mix"]
    for i, (name, kind) in enumerate(zip(names, kinds)):
        soundfile.write(directory / name, make_waveform(1.0 + 0.5 * i, seed=i, kind=kind), 16000)
    return directory


class KilledProcessOne:
    """The `PartialState` of process 1 of a 2-process launch, killed at its first wait after embedding its share."""

    num_processes, process_index, is_main_process = 2, 1, False
    waits = 0

    def wait_for_everyone(self):
        self.waits += 1
        if self.waits == 2:
            raise KeyboardInterrupt("killed")


def copy_of(folder, tmp_path, name="lib-audio"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_balanced_shares_deal_equal_bytes():
    # One long file and many short ones: the long file alone in one share, the short ones in the other (by count, as
    # split_between_processes, the long file would share its process with half the short ones).
    assert balanced_shares([1000] + [100] * 10, 2) == [[0], list(range(1, 11))]
    shares = balanced_shares([5, 9, 1, 7, 3, 3, 8], 3)
    assert sorted(i for share in shares for i in share) == list(range(7))  # each index once
    assert shares == [[1, 5], [2, 4, 6], [0, 3]]  # 9 + 3, 1 + 3 + 8, 5 + 7: 12 bytes each
    assert balanced_shares([4, 4], 3) == [[0], [1], []] and balanced_shares([], 2) == [[], []]


def test_window_starts():
    assert window_starts(100, 160, 80) == [0]
    assert window_starts(160, 160, 80) == [0]
    assert window_starts(320, 160, 80) == [0, 80, 160]
    assert window_starts(330, 160, 80) == [0, 80, 160, 170]  # the last window ends with the clip


def test_index_search_equals_brute_force(saved_model, sounds, tmp_path):
    model, processor = load_model(saved_model)
    library = AudioLibrary(str(tmp_path / "lib"), model, processor, saved_model, create=True)
    report = library.index(str(sounds), show_progress=False)
    assert (report["files"], report["embedded"], report["reused"], report["failed"]) == (6, 6, 0, [])

    texts = ["a rising chirp", "quiet hiss", "a tone"]
    hits = library.search(texts, k=6)
    # Brute force: each file embedded alone, scored by the best query token.
    paths = sorted(str(p) for p in sounds.rglob("*") if p.is_file())
    from audio_io import load_audio

    with torch.no_grad():
        audio_embeds = torch.cat([library.embed_waveforms([load_audio(p)])[0] for p in paths])
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
        text_embeds = model.get_text_features(**tokens).text_embeds
    expected = max_over_queries(audio_embeds, text_embeds).t()
    for row, query_hits in zip(expected, hits):
        order = torch.sort(row, descending=True, stable=True)
        assert [h.path for h in query_hits] == [paths[i] for i in order.indices.tolist()]
        np.testing.assert_allclose([h.score for h in query_hits], order.values.numpy(), atol=2e-3)  # float16 store


def test_rerank_moves_only_the_top_k(saved_model, sounds, tmp_path):
    library = AudioLibrary(str(tmp_path / "lib"), *load_model(saved_model), saved_model, create=True)
    library.index(str(sounds), show_progress=False)
    plain = library.search(["a rising chirp"], k=6)[0]
    reranked = library.search(["a rising chirp"], k=6, rerank=3)[0]
    assert {h.path for h in reranked[:3]} == {h.path for h in plain[:3]}
    assert [h.path for h in reranked[3:]] == [h.path for h in plain[3:]]
    assert all(h.match_logit is not None for h in reranked[:3]) and reranked[3].match_logit is None
    scores = [h.score for h in reranked[:3]]
    assert scores == sorted(scores, reverse=True)
    for hit in reranked[:3]:
        assert hit.score == pytest.approx(hit.match_logit + hit.cosine, abs=1e-5)
    # Without stored tokens the re-rank decodes the audio again and gives the same order.
    other = AudioLibrary(str(tmp_path / "lib2"), library.model, library.processor, saved_model, create=True, keep_tokens=False)
    other.index(str(sounds), show_progress=False)
    again = other.search(["a rising chirp"], k=6, rerank=3)[0]
    assert [h.path for h in again] == [h.path for h in reranked]


def test_incremental_index_and_resume(saved_model, sounds, tmp_path, monkeypatch):
    folder = copy_of(sounds, tmp_path)
    model, processor = load_model(saved_model)
    library = AudioLibrary(str(tmp_path / "lib"), model, processor, saved_model, create=True)

    # A run that dies after its first batch keeps what it stored; the next run embeds only the rest.
    calls = {"n": 0}
    original = library.embeddings.append

    def dying_append(items, shard=0):
        original(items, shard)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(library.embeddings, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        library.index(str(folder), batch_size=2, show_progress=False)
    monkeypatch.undo()
    stored = len(library.embeddings)
    assert 0 < stored < 6
    reopened = AudioLibrary(str(tmp_path / "lib"), model, processor)
    report = reopened.index(str(folder), batch_size=2, show_progress=False)
    assert (report["embedded"], report["reused"]) == (6 - stored, stored)
    assert len(reopened.embeddings) == 6 and len(reopened.embeddings.keys()) == len(set(reopened.embeddings.keys()))

    # A new file and a corrupt one: only the new file is embedded, the corrupt one is reported.
    soundfile.write(folder / "g.wav", make_waveform(2.0, seed=9), 16000)
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav")
    report = reopened.index(str(folder), show_progress=False)
    assert (report["files"], report["embedded"], report["reused"]) == (8, 1, 6)
    assert [f["audio"] for f in report["failed"]] == [str(folder / "broken.wav")]
    assert len(reopened.search(["a tone"], k=20)[0]) == 7

    # A deleted file drops out of the results.
    os.remove(folder / "a.wav")
    reopened.index(str(folder), show_progress=False)
    assert str(folder / "a.wav") not in {h.path for h in reopened.search(["a tone"], k=20)[0]}


def test_long_audio_is_windowed(saved_model, tmp_path):
    folder = tmp_path / "long"
    folder.mkdir()
    # 25 s: quiet noise with a loud chirp from 15 s on. Windows of 10.24 s every 5.12 s: starts 0, 5.12, 10.24, 14.76.
    wave = make_waveform(25.0, seed=1, kind="quiet")
    wave[15 * 16000 :] += make_waveform(10.0, kind="chirp")
    soundfile.write(folder / "long.wav", wave, 16000)
    model, processor = load_model(saved_model)
    library = AudioLibrary(str(tmp_path / "lib"), model, processor, saved_model, create=True)
    library.index(str(folder), show_progress=False)
    key = library.embeddings.keys()[0]
    assert library.embeddings.metadata(key)["starts"] == [0, 81920, 163840, 236160]
    assert library.embeddings.get(key).shape == (4, 4 * 16)

    hit = library.search(["a chirp"], k=1)[0][0]
    window_embeds, _ = library.embed_waveforms([wave[s : s + 163840] for s in (0, 81920, 163840, 236160)])
    text = processor.tokenizer(["a chirp"], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        per_window = max_over_queries(window_embeds, model.get_text_features(**text).text_embeds)[:, 0]
    assert hit.cosine == pytest.approx(per_window.max().item(), abs=2e-3)
    assert hit.start_seconds == pytest.approx([0, 5.12, 10.24, 14.76][per_window.argmax().item()])


def test_library_refuses_another_model(saved_model, sounds, tmp_path, tokenizer, monkeypatch):
    library = AudioLibrary(str(tmp_path / "lib"), *load_model(saved_model), saved_model, create=True)
    library.index(str(sounds), show_progress=False)
    torch.manual_seed(1)
    other = AudioQFormerModel(tiny_qformer_config()).eval()
    with pytest.raises(ValueError, match="another model"):
        AudioLibrary(str(tmp_path / "lib"), other, library.processor)
    with pytest.raises(FileNotFoundError, match="No audio library"):
        AudioLibrary.load(str(tmp_path / "nowhere"))
    # The same weights from elsewhere (a copy of the folder, a relative path, as a Space loads a Hub id) are accepted.
    shutil.copytree(saved_model, tmp_path / "copy-of-model")
    monkeypatch.chdir(tmp_path)
    reopened = AudioLibrary.load(str(tmp_path / "lib"), "copy-of-model")
    assert len(reopened.search(["a beep"], k=2)[0]) == 2


def test_fast_cpu_library_embeds_with_the_fast_encoder(saved_model, sounds, tmp_path, monkeypatch):
    # `--fast_cpu`: the library records the setting and embeds every clip (and every `similar` query) with BEATs'
    # fast copy (bfloat16 or int8 by the CPU): close to the exact embeddings, yet not them.
    from audio_qformer import beats_cpu
    from audio_io import load_audio

    # The tiny model's products are too small for a lower precision to measure faster (the fast copy would be the
    # exact one); the paper-size ones are measured in tests/test_beats_fast_paths.py and benchmarks/beats_speed.py.
    monkeypatch.setattr(beats_cpu, "product_speedup", lambda precision, *shape: 4.0)

    exact = AudioLibrary(str(tmp_path / "exact"), *load_model(saved_model), saved_model, create=True)
    fast_dir = str(tmp_path / "fast")
    AudioLibrary(fast_dir, *load_model(saved_model), saved_model, create=True, fast_cpu_encoder=True)
    fast = AudioLibrary.load(fast_dir)  # the setting comes back from library.json
    assert fast.config["fast_cpu_encoder"] is True and exact.config["fast_cpu_encoder"] is False
    waveforms = [load_audio(str(p)) for p in sorted(sounds.rglob("*.wav"))]
    exact_embeds, exact_tokens = exact.embed_waveforms(waveforms)
    fast_embeds, fast_tokens = fast.embed_waveforms(waveforms)
    cosine = torch.nn.functional.cosine_similarity(fast_embeds, exact_embeds, dim=-1)
    assert cosine.min() >= 0.999, cosine.min()
    assert not torch.equal(fast_embeds, exact_embeds)
    assert [t.shape for t in fast_tokens] == [t.shape for t in exact_tokens]
    fast.index(str(sounds), show_progress=False)
    assert fast.search(["a rising chirp"], k=3)[0][0].path  # searchable as usual

    folder = copy_of(sounds, tmp_path)
    assert main(["--library", str(tmp_path / "cli"), "index", str(folder), "--model", saved_model, "--fast_cpu"]) == 0
    assert json.load(open(tmp_path / "cli" / "library.json"))["fast_cpu_encoder"] is True
    exact.index(str(sounds), show_progress=False)
    with pytest.raises(SystemExit):  # an exact library stays exact
        main(["--library", str(tmp_path / "exact"), "index", str(folder), "--fast_cpu"])


def test_bfloat16_beats_library(saved_model, sounds, tmp_path, capsys):
    # `--beats_dtype bfloat16`: recorded in the library, BEATs in bfloat16 (here the CPU's bfloat16 copy): embeddings
    # close to the exact ones, not equal; the setting cannot change on an existing library.
    from audio_io import load_audio

    lib = str(tmp_path / "bf16")
    assert main(["--library", lib, "index", str(sounds), "--model", saved_model, "--beats_dtype", "bfloat16"]) == 0
    library = AudioLibrary.load(lib)
    assert library.config["beats_dtype"] == "bfloat16"
    exact = AudioLibrary(str(tmp_path / "exact"), *load_model(saved_model), saved_model, create=True)
    waveforms = [load_audio(str(p)) for p in sorted(sounds.rglob("*.wav"))]
    low, high = library.embed_waveforms(waveforms)[0], exact.embed_waveforms(waveforms)[0]
    cosine = torch.nn.functional.cosine_similarity(low, high, dim=-1)
    assert cosine.min() >= 0.999 and not torch.equal(low, high), cosine.min()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--library", str(tmp_path / "exact"), "index", str(sounds), "--beats_dtype", "bfloat16"])
    assert "runs BEATs in float32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--library", str(tmp_path / "new"), "index", str(sounds), "--model", saved_model, "--fast_cpu",
              "--beats_dtype", "bfloat16"])  # fmt: skip
    with pytest.raises(ValueError, match="beats_dtype must be one of"):
        AudioLibrary(str(tmp_path / "bad"), *load_model(saved_model), saved_model, create=True, beats_dtype="fp8")


def test_cli_end_to_end(saved_model, sounds, tmp_path, capsys, monkeypatch):
    folder = copy_of(sounds, tmp_path)
    (folder / "notes.wav").write_text("this is a text file, not audio")
    lib = str(tmp_path / "lib")
    kept = []  # index on the CPU keeps freed memory (process-wide: recorded here, not applied to the test process)
    monkeypatch.setattr(beats_cpu, "keep_freed_memory", lambda: kept.append(True) or True)
    assert main(["--library", lib, "index", str(folder), "--model", saved_model]) == 0
    out = capsys.readouterr().out
    assert "7 audio files" in out and "6 embedded" in out and "1 unreadable" in out and "notes.wav" in out
    assert main(["--library", lib, "index", str(folder), "--release_memory"]) == 0
    assert "0 embedded, 6 already indexed" in capsys.readouterr().out
    assert kept == [True]

    assert main(["--library", lib, "search", "a rising chirp", "quiet hiss", "-k", "3", "--rerank", "2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == ["a rising chirp", "quiet hiss"]
    assert all(len(line["results"]) == 3 for line in lines)
    assert lines[0]["results"][0]["match_logit"] is not None and lines[0]["results"][2]["match_logit"] is None

    assert main(["--library", lib, "similar", str(folder / "b.wav"), "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "rank" in table and str(folder / "b.wav") not in table.split("\n", 2)[2]

    assert main(["--library", str(tmp_path / "missing"), "search", "x"]) == 2
    assert "No audio library" in capsys.readouterr().err


def test_evaluation_script_table(saved_model, tmp_path):
    from evaluate_retrieval import main as evaluate_main
    from audio_qformer.synthetic_sounds import generate
    from audio_qformer.ranking_metrics import retrieval_metrics

    generate(str(tmp_path / "data"), num_train=2, num_validation=2, num_library=12, captions_per_clip=2, seed=3)
    output = tmp_path / "table.json"
    results = evaluate_main([
        "--model", saved_model, "--audiofolder", str(tmp_path / "data" / "library"), "--rerank_top_k", "3",
        "--feature_cache_dir", str(tmp_path / "cache"), "--output_json", str(output), "--device", "cpu",
        "--relevance_column", "attributes", "--submission_csv", str(tmp_path / "submission.csv"), "--captions",
    ])  # fmt: skip
    saved = json.loads(output.read_text())
    assert saved["clips"] == 12 and saved["queries"] == 24
    assert set(saved["results"]) == {"ATC", "ATC + re-rank top 3"}
    # Each caption fits its own clip only (distinct attributes): the multi-relevant mAP@12 is then 1/rank in the top 12.
    assert saved["captions_fitting_several_clips"] == 0
    # The ATC row equals the metrics of the plain similarity matrix (the evaluate module against retrieval.py).
    model, processor = load_model(saved_model)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "data" / "library" / "metadata.csv")))
    from audio_io import load_audio
    from audio_qformer.data import clean_caption

    with torch.no_grad():
        audio = model.get_audio_features(**processor.feature_extractor(
            [load_audio(str(tmp_path / "data" / "library" / r["file_name"])) for r in rows], sampling_rate=16000,
            return_tensors="pt")).audio_embeds  # fmt: skip
        captions = [clean_caption(r[c]) for r in rows for c in ("caption_1", "caption_2")]
        tokens = processor.tokenizer(captions, padding=True, return_tensors="pt", return_token_type_ids=False)
        text = model.get_text_features(**tokens).text_embeds
    similarity = max_over_queries(audio, text).t()
    expected = retrieval_metrics(similarity, torch.arange(12).repeat_interleave(2))
    for name, value in expected.items():
        assert results["ATC"][name] == pytest.approx(value, abs=1e-6)
    full_list = retrieval_metrics(similarity, torch.arange(12).repeat_interleave(2), map_at=12)["mAP@12"]
    assert results["ATC"]["mAP@12 multi-relevant"] == pytest.approx(full_list, abs=1e-6)
    # The DCASE submission: the header, one row per caption in the set's order, its ten best files (the re-ranked
    # system by default, whose order differs from ATC only within the top 3 re-ranked).
    submission = list(csv.reader(open(tmp_path / "submission.csv")))
    assert submission[0] == ["caption"] + [f"fname_{i}" for i in range(1, 11)]
    assert [row[0] for row in submission[1:]] == [r[c] for r in rows for c in ("caption_1", "caption_2")]
    atc_order = similarity.argsort(dim=1, descending=True, stable=True)[:, :10].tolist()  # ties: lower index first
    for row, order in zip(submission[1:], atc_order):
        assert len(set(row[1:])) == 10 and row[4:] == [rows[i]["file_name"] for i in order[3:]]
        assert sorted(row[1:4]) == sorted(rows[i]["file_name"] for i in order[:3])
    # `--captions`: each clip captioned once, as the model captions its waveform, scored against its own captions.
    from audio_qformer.captioning import attribute_accuracy, bleu4, caption_waveforms

    captioning = saved["captioning"]
    waves = [load_audio(str(tmp_path / "data" / "library" / r["file_name"])) for r in rows]
    expected = caption_waveforms(model, processor, waves)
    assert [c["caption"] for c in captioning["captions"]] == expected and captioning["clips"] == 12
    references = [[r["caption_1"], r["caption_2"]] for r in rows]
    assert [c["references"] for c in captioning["captions"]] == references
    assert captioning["BLEU-4"] == pytest.approx(bleu4(expected, references))
    truth = [json.loads(r["attributes"]) for r in rows]
    assert captioning["attributes_named_right"] == pytest.approx(attribute_accuracy(expected, truth))
    assert captioning["generation"]["num_beams"] == 3


def test_relevant_clips_by_group_and_multi_relevant_map(tmp_path):
    from datasets import Dataset

    from evaluate_retrieval import read_metadata_column, relevant_clips

    (tmp_path / "metadata.csv").write_text("file_name,caption_1,attributes\na.wav,x,red\nb.wav,y,blue\nc.wav,z,red\n")
    groups = read_metadata_column(str(tmp_path), "attributes")
    paths = [str(tmp_path / n) for n in ("a.wav", "b.wav", "c.wav", "a.wav")]
    rows = Dataset.from_dict({"audio_path": paths, "audio_id": ["A", "B", "C", "A"]})
    assert relevant_clips(rows) == [["A"], ["B"], ["C"], ["A"]]
    assert relevant_clips(rows, groups) == [["A", "C"], ["B"], ["A", "C"], ["A", "C"]]
    with pytest.raises(ValueError, match="no column 'colour'"):
        read_metadata_column(str(tmp_path), "colour")


def test_index_killed_at_random_points_equals_uninterrupted(saved_model, tmp_path):
    """SIGKILL `audio-qformer index` mid-run (several times), restart: same files, same embeddings, no duplicates."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(24):
        soundfile.write(folder / f"clip{i:02d}.wav", make_waveform(1.0 + (i % 5) * 0.7, seed=i), 16000)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}

    def stored(library):
        path = library / "embeddings" / "shard-0.jsonl"
        return path.read_text().count("\n") if path.exists() else 0

    def index(library, kill_when_stored=None, delay=0.0):
        """Run `index`; with `kill_when_stored`, SIGKILL it `delay` s after that many files are stored."""
        command = [sys.executable, "-m", "audio_qformer.cli", "--library", str(library), "index", str(folder),
                   "--model", saved_model, "--batch_size", "2"]  # fmt: skip
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if kill_when_stored is None:
            assert process.wait(timeout=300) == 0, process.stdout.read().decode()[-2000:]
            return True
        while process.poll() is None and stored(library) < kill_when_stored:
            time.sleep(0.01)
        time.sleep(delay)
        finished = process.poll() is not None
        process.send_signal(signal.SIGKILL)
        process.wait()
        return finished

    index(tmp_path / "whole")
    rng = random.Random(0)
    killed = tmp_path / "killed"
    kills = 0
    for _ in range(4):  # each run is killed at a random point after a random number of stored files
        if index(killed, kill_when_stored=stored(killed) + rng.randint(1, 5), delay=rng.uniform(0.0, 0.3)):
            break
        kills += 1
    index(killed)
    assert kills >= 1

    model, processor = load_model(saved_model)
    whole, resumed = (AudioLibrary(str(tmp_path / name), model, processor) for name in ("whole", "killed"))
    assert sorted(whole.embeddings.keys()) == sorted(resumed.embeddings.keys())
    assert len(resumed.embeddings.keys()) == 24
    for key in whole.embeddings.keys():
        np.testing.assert_array_equal(whole.embeddings.get(key), resumed.embeddings.get(key))
        assert whole.embeddings.metadata(key) == resumed.embeddings.metadata(key)
    # Every stored row belongs to exactly one entry: no duplicates, no gaps left by the kills.
    rows = sorted(resumed.embeddings.location(key)[1:] for key in resumed.embeddings.keys())
    assert [offset for offset, _ in rows] == list(np.cumsum([0] + [length for _, length in rows[:-1]]))
    assert resumed.embeddings.shard_array(0).shape[0] == sum(length for _, length in rows)
    assert [h.path for h in resumed.search(["a tone"], k=24)[0]] == [h.path for h in whole.search(["a tone"], k=24)[0]]


def test_audio_to_text_metrics_by_hand():
    from audio_qformer.ranking_metrics import audio_to_text_metrics

    # 2 clips, 4 captions (clip of each: 0, 0, 1, 1). Clip 0 ranks captions 2, 0, ... -> its first own caption at rank 2;
    # clip 1 ranks caption 1 first, then 3 -> rank 2 too; with ties (clip 1: captions 1 and 3 equal) the lower index wins.
    similarity = torch.tensor([[0.5, 0.1, 0.9, 0.0], [0.2, 0.8, 0.1, 0.8]])
    metrics = audio_to_text_metrics(similarity, torch.tensor([0, 0, 1, 1]), recall_at=(1, 2))
    assert metrics == {"R@1": 0.0, "R@2": 1.0}
    similarity[1, 3] = 0.9
    assert audio_to_text_metrics(similarity, torch.tensor([0, 0, 1, 1]), recall_at=(1, 2)) == {"R@1": 0.5, "R@2": 1.0}


def test_vector_index_search_matches_exact_and_follows_additions(saved_model, sounds, tmp_path):
    pytest.importorskip("faiss")
    folder = copy_of(sounds, tmp_path)
    library = AudioLibrary(str(tmp_path / "lib"), *load_model(saved_model), saved_model, create=True)
    library.index(str(folder), show_progress=False)
    with pytest.raises(FileNotFoundError, match="no vector index"):
        library.search(["a tone"], k=3, approximate=True)
    assert len(library.vector_index(build=True)) == 6
    texts = ["a rising chirp", "quiet hiss"]
    exact = library.search(texts, k=4)
    approximate = library.search(texts, k=4, approximate=True)
    assert [[h.path for h in hits] for hits in approximate] == [[h.path for h in hits] for hits in exact]
    # A file added later reaches the index on the next search; a deleted one drops out.
    soundfile.write(folder / "g.wav", make_waveform(2.0, seed=9, kind="chirp"), 16000)
    os.remove(folder / "a.wav")
    library.index(str(folder), show_progress=False)
    paths = {h.path for h in library.search(["a chirp"], k=10, approximate=True)[0]}
    assert str(folder / "g.wav") in paths and str(folder / "a.wav") not in paths and len(paths) == 6
    assert len(library.vector_index()) == 7


def test_two_processes_index_as_one(saved_model, sounds, tmp_path):
    """`accelerate launch --num_processes 2 -m audio_qformer.cli ... index`: disjoint shares, one library like a single run."""
    import subprocess
    import sys

    from conftest import ROOT

    sounds = copy_of(sounds, tmp_path)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "audio_qformer.cli"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*launch, "--library", str(tmp_path / "two"), "index", str(sounds), "--model", saved_model],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [int(line.split("unreadable")[0].split(": ")[-1].split(" embedded")[0])
              for line in result.stdout.splitlines() if " of 2: " in line]  # fmt: skip
    assert len(counts) == 2 and sum(counts) == 6 and min(counts) >= 1, result.stdout  # each embedded its own share
    one = AudioLibrary(str(tmp_path / "one"), *load_model(saved_model), saved_model, create=True)
    one.index(str(sounds), show_progress=False)
    two = AudioLibrary.load(str(tmp_path / "two"))
    assert two.stored_files() == one.stored_files()
    assert sorted(n for n in os.listdir(tmp_path / "two" / "embeddings") if n.startswith("shard-")) == [
        "shard-0.bin", "shard-0.jsonl"]  # the processes' shards moved into one  # fmt: skip
    assert len(two.embeddings) == 6  # none embedded twice
    for key in one.live_keys():
        np.testing.assert_allclose(two.embeddings.get(key).astype(np.float32), one.embeddings.get(key).astype(np.float32),
                                   atol=2e-3)  # fmt: skip
    for rerank in (0, 3):
        got = [(h.path, round(h.score, 2)) for h in two.search(["a beep", "noise"], k=4, rerank=rerank)[0]]
        assert got == [(h.path, round(h.score, 2)) for h in one.search(["a beep", "noise"], k=4, rerank=rerank)[0]]
    # A second launch finds nothing new
    again = subprocess.run([*launch, "--library", str(tmp_path / "two"), "index", str(sounds)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0 and again.stdout.count("0 embedded, 6 already indexed") == 2, again.stdout


def test_consolidate_moves_shards_into_the_first_once(tmp_path):
    from audio_qformer.store import ArrayStore

    cache = ArrayStore(str(tmp_path), "store", 4)
    blocks = {f"k{i}": np.full((i + 1, 4), i, np.float16) for i in range(5)}
    cache.append([("k0", blocks["k0"], {"n": 0})], shard=0)
    cache.append([("k1", blocks["k1"], {"n": 1}), ("k2", blocks["k2"], {"n": 2})], shard=1)
    cache.append([("k3", blocks["k3"], {"n": 3}), ("k4", blocks["k4"], {"n": 4})], shard=2)
    # a consolidation killed after copying shard 1 but before deleting it: shard 0 already holds k1 and k2
    shutil.copy(tmp_path / "store" / "shard-1.jsonl", tmp_path / "keep.jsonl")
    shutil.copy(tmp_path / "store" / "shard-1.bin", tmp_path / "keep.bin")
    cache.consolidate()
    shutil.copy(tmp_path / "keep.jsonl", tmp_path / "store" / "shard-1.jsonl")
    shutil.copy(tmp_path / "keep.bin", tmp_path / "store" / "shard-1.bin")
    cache.consolidate()
    reopened = ArrayStore(str(tmp_path), "store", 4)
    assert sorted(os.listdir(tmp_path / "store")) == ["shard-0.bin", "shard-0.jsonl"]
    assert reopened.shard_array(0).shape == (15, 4)  # 1 + 2 + 3 + 4 + 5 rows, none twice
    for key, block in blocks.items():
        assert reopened.location(key)[0] == 0 and np.array_equal(reopened.get(key), block)
        assert reopened.metadata(key) == {"n": int(key[1])}


def test_a_second_index_run_stops_while_one_holds_the_lock(saved_model, sounds, tmp_path, capsys):
    import fcntl

    from audio_qformer.library import LibraryBusyError

    library = AudioLibrary(str(tmp_path / "lib"), *load_model(saved_model), saved_model, create=True)
    with open(tmp_path / "lib" / "index.lock", "w") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `index` holds it
        with pytest.raises(LibraryBusyError, match="being indexed by another run"):
            library.index(str(sounds), show_progress=False)
        assert main(["--library", str(tmp_path / "lib"), "index", str(sounds)]) == 2
        assert "being indexed by another run" in capsys.readouterr().err
        assert len(library.embeddings) == 0  # nothing written while the other run held it
    assert library.index(str(sounds), show_progress=False)["embedded"] == 6  # free again: the lock is released
    assert library.index(str(sounds), show_progress=False)["reused"] == 6


def test_a_killed_multi_process_run_is_completed_by_the_next_run(saved_model, sounds, tmp_path, monkeypatch):
    """Process 1 of 2 stores its share in its own shard and is killed before the main process consolidates: search
    refuses the unfinished library with a clear message, and a plain rerun embeds the rest and consolidates."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: objects)
    sounds = copy_of(sounds, tmp_path)
    library = AudioLibrary(str(tmp_path / "lib"), *load_model(saved_model), saved_model, create=True)
    with pytest.raises(KeyboardInterrupt):
        library.index(str(sounds), show_progress=False, state=KilledProcessOne())
    stored = {library.embeddings.location(k)[0] for k in library.embeddings.keys()}
    share = len(library.embeddings)  # process 1's share: about half of the bytes
    assert 0 < share < 6 and stored == {1}
    library.files = {str(sounds): {k: k for k in library.embeddings.keys()}}  # as if a file list named them
    with pytest.raises(ValueError, match="did not finish: run `audio-qformer index` on it again"):
        library.search(["a beep"], k=2)
    library.files = {}
    report = library.index(str(sounds), show_progress=False)
    assert report["embedded"] == 6 - share and report["reused"] == share
    one = AudioLibrary(str(tmp_path / "one"), *load_model(saved_model), saved_model, create=True)
    one.index(str(sounds), show_progress=False)
    assert {library.embeddings.location(k)[0] for k in library.embeddings.keys()} == {0}
    assert library.stored_files() == one.stored_files()
    assert [h.path for h in library.search(["a beep"], k=6)[0]] == [h.path for h in one.search(["a beep"], k=6)[0]]


def test_library_with_captions_and_the_caption_command(saved_model, sounds, tmp_path, capsys):
    # `index --captions`: each file's caption is the model's caption of its first window's stored BEATs tokens, shown
    # by search (table and JSON) and similar; `caption` captions files without a library, and writes DCASE task 6A's
    # submission file.
    from audio_qformer.captioning import caption_token_arrays

    folder = copy_of(sounds, tmp_path)
    lib = str(tmp_path / "lib")
    assert main(["--library", lib, "index", str(folder), "--model", saved_model, "--captions", "--keep_tokens"]) == 0
    capsys.readouterr()
    library = AudioLibrary.load(lib)
    keys = library.live_keys()
    expected = caption_token_arrays(library.model, library.processor, [library.tokens.get(f"{key}#0") for key in keys])
    stored = {library.path_of(key): caption for key, caption in zip(keys, expected)}
    assert all(caption for caption in expected) and {f["path"]: f["caption"] for f in library.stored_files()} == stored
    assert main(["--library", lib, "search", "a rising chirp", "-k", "6", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert len(hits) == 6 and all(hit["caption"] == stored[hit["path"]] for hit in hits)
    assert main(["--library", lib, "similar", str(folder / "a.wav"), "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert sum(caption in table for caption in set(expected)) >= 1
    # A library indexed without captions does not get them half-way.
    plain = str(tmp_path / "plain")
    assert main(["--library", plain, "index", str(folder), "--model", saved_model]) == 0
    # ... nor BEATs tokens, unless asked (--keep_tokens above): re-ranking then runs BEATs again, to the same order.
    plain_library = AudioLibrary.load(plain)
    assert plain_library.config["keep_tokens"] is False and len(plain_library.tokens) == 0 and len(library.tokens) == 6
    with_tokens = [hit.path for hit in library.search(["a chirp"], k=4, rerank=4)[0]]
    assert [hit.path for hit in plain_library.search(["a chirp"], k=4, rerank=4)[0]] == with_tokens
    with pytest.raises(SystemExit):
        main(["--library", plain, "index", str(folder), "--captions"])
    assert "indexed without captions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--library", plain, "index", str(folder), "--keep_tokens"])
    assert "indexed without BEATs tokens" in capsys.readouterr().err

    (folder / "notes.wav").write_text("not audio")
    csv_path = tmp_path / "captions.csv"
    assert main(["caption", str(folder), "--model", saved_model, "--json", "--submission_csv", str(csv_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model, processor = load_model(saved_model)
    assert [line["file"] for line in lines] == sorted(str(p) for p in folder.rglob("*.*") if p.suffix in (".wav", ".flac"))
    # each caption is the model's caption of the whole (short) file
    from audio_io import load_audio

    with torch.no_grad():
        inputs = processor(audio=[load_audio(str(folder / "b.wav"))], sampling_rate=16000, return_tensors="pt")
        expected_b = processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)[0].strip()
    assert next(line for line in lines if line["file"].endswith("b.wav"))["captions"] == [
        {"start_seconds": 0.0, "caption": expected_b}]  # fmt: skip
    assert [line["error"] for line in lines if "error" in line] == ["unreadable audio (Format not recognised.)"]
    rows = list(csv.reader(open(csv_path)))
    assert rows[0] == ["file_name", "caption_predicted"] and len(rows) == 1 + 6
    assert {row[0] for row in rows[1:]} == {"a.wav", "b.wav", "c.flac", "d.wav", "e.wav", "f.wav"}
    assert main(["caption", str(tmp_path / "nowhere.wav"), "--model", saved_model]) == 2
