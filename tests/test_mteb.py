"""mteb's own evaluator runs the model (`audio_qformer.mteb_encoder`), offline, on tasks built from local clips in
mteb's task format: its scores equal the project's own evaluation of the same data, in both directions."""

import json
import os

import numpy as np
import pytest
import soundfile
import torch
from conftest import make_waveform, tiny_qformer_config


mteb = pytest.importorskip("mteb")
from audio_qformer.mteb_encoder import load_encoder, stack_vectors  # noqa: E402
from audio_qformer.retrieval import embed_texts  # noqa: E402


KINDS = ["mix", "chirp", "quiet"]
LABELS = ["a steady tone with some noise", "a rising whistle", "very quiet hiss"]
RATE = 48000  # Clotho's rate: the wrapper resamples


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    from modeling_audio_qformer import AudioQFormerModel
    from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor

    directory = tmp_path_factory.mktemp("mteb-model")
    torch.manual_seed(0)
    AudioQFormerModel(tiny_qformer_config()).eval().save_pretrained(directory)
    AudioQFormerProcessor(BeatsFeatureExtractor(), tokenizer).save_pretrained(directory)
    with open(directory / "all_results.json", "w") as handle:  # as train.py writes it
        json.dump({"sources": ["CLAPv2/Clotho", "audiofolder data"]}, handle)
    return str(directory)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Eight clips of three kinds at 48 kHz (an audiofolder for the project's evaluation), two captions each."""
    folder = tmp_path_factory.mktemp("mteb-clips")
    rows = []
    for i in range(8):
        kind = KINDS[i % 3]
        wave = make_waveform(1.0 + 0.3 * i, seed=i, kind=kind)
        wave = np.interp(np.arange(int(len(wave) * 3)) / RATE, np.arange(len(wave)) / 16000, wave).astype(np.float32)
        soundfile.write(folder / f"clip{i}.wav", wave, RATE, subtype="FLOAT")
        rows.append((f"clip{i}.wav", f"{LABELS[i % 3]} number {i}", f"clip {i}: {kind} sound"))
    with open(folder / "metadata.csv", "w") as handle:
        handle.write("file_name,caption_1,caption_2\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return folder, rows


def test_mteb_scores_equal_the_projects_own(saved_model, clips, tmp_path):
    import evaluate_retrieval
    from transformers import pipeline

    from audio_io import load_audio
    from audio_qformer.mteb_encoder import evaluate, local_tasks

    folder, rows = clips
    labels = {row[0]: LABELS[i % 3] for i, row in enumerate(rows)}
    tasks = local_tasks(str(folder), labels, name="Local")
    results = {r.task_name: r.scores["test"][0] for r in evaluate(saved_model, tasks, str(tmp_path / "out"))}
    own = evaluate_retrieval.main(["--model", saved_model, "--audiofolder", str(folder), "--rerank_top_k", "0",
                                   "--feature_cache_dir", str(tmp_path / "cache"), "--output_json", str(tmp_path / "own.json")])  # fmt: skip
    audio_to_text = json.loads((tmp_path / "own.json").read_text())["audio_to_text"]
    t2a, a2t, zero_shot = results["LocalT2A"], results["LocalA2T"], results["LocalZeroShot"]
    # Text -> audio: one relevant clip a caption, so mteb's map_at_10 is DCASE's mAP@10.
    assert t2a["recall_at_1"] == pytest.approx(own["ATC"]["R@1"], abs=1e-5)
    assert t2a["recall_at_5"] == pytest.approx(own["ATC"]["R@5"], abs=1e-5)
    assert t2a["map_at_10"] == pytest.approx(own["ATC"]["mAP@10"], abs=1e-5)
    # Audio -> text: a clip's captions are relevant; the project counts a clip found when one of them ranks in the top k.
    assert a2t["hit_rate_at_1"] == pytest.approx(audio_to_text["R@1"], abs=1e-5)
    assert a2t["hit_rate_at_5"] == pytest.approx(audio_to_text["R@5"], abs=1e-5)
    # Zero-shot classification: the transformers pipeline on the same clips and labels.
    classifier = pipeline("zero-shot-audio-classification", model=saved_model, trust_remote_code=True)
    best = [classifier(load_audio(str(folder / row[0])), candidate_labels=LABELS, hypothesis_template="{}")[0]["label"]
            for row in rows]  # fmt: skip
    assert zero_shot["accuracy"] == pytest.approx(np.mean([label == labels[row[0]] for label, row in zip(best, rows)]), abs=1e-5)
    # The result files, in the results repository's layout, with the model's meta data.
    model_dir = tmp_path / "out" / "results" / f"local__{os.path.basename(saved_model)}" / "local"
    assert {"LocalT2A.json", "LocalA2T.json", "LocalZeroShot.json", "model_meta.json"} <= set(os.listdir(model_dir))
    meta = json.loads((model_dir / "model_meta.json").read_text())
    assert set(meta["training_datasets"]) == {"ClothoT2ARetrieval", "ClothoA2TRetrieval", "ClothoT2ARetrieval.v2",
                                              "ClothoA2TRetrieval.v2"}  # fmt: skip
    assert meta["modalities"] == ["audio", "text"]


def test_long_clips_score_as_their_best_window(saved_model):
    """A clip over one window is its windows' query vectors; a shorter clip is padded with its own vectors."""
    from audio_qformer.embedding import LibraryEncoder

    encoder = load_encoder(saved_model, device="cpu")
    long, short = make_waveform(17.0, seed=3), make_waveform(2.0, seed=4, kind="chirp")
    vectors = [encoder._clip_vectors({"array": w, "sampling_rate": 16000}) for w in (long, short)]
    assert [len(v) for v in vectors] == [3 * 4, 4]  # 17 s: windows from 0, 5.12 and 6.76 s; 4 queries each
    stacked = stack_vectors(vectors)
    assert stacked.shape == (2, 12, 16) and (stacked[1, 4:] == stacked[1, 0]).all()
    texts = embed_texts(encoder.model, encoder.processor, ["a rising whistle", "noise"]).numpy()
    library = LibraryEncoder(encoder.model, encoder.processor, {"window_seconds": 10.24, "hop_seconds": 5.12})
    expected = torch.stack([encoder.model.score(library.embed_waveforms(library.windows(w)[1])[0], torch.from_numpy(texts))
                            .amax(0) for w in (long, short)])  # fmt: skip
    torch.testing.assert_close(encoder.similarity(stacked, texts), expected, atol=1e-5, rtol=0)  # audio -> text
    torch.testing.assert_close(encoder.similarity(texts, stacked), expected.T, atol=1e-5, rtol=0)  # text -> audio
    torch.testing.assert_close(encoder.similarity_pairwise(stacked, texts), expected.diagonal(), atol=1e-5, rtol=0)


def test_sentence_transformers_loads_the_model_but_its_similarity_cannot_score_clips(saved_model):
    """What `SentenceTransformer(path, trust_remote_code=True)` does with the model, as docs/evaluation_and_captioning.md says."""
    sentence_transformers = pytest.importorskip("sentence_transformers")

    model = sentence_transformers.SentenceTransformer(saved_model, trust_remote_code=True, device="cpu")
    clip = make_waveform(2.0, seed=4, kind="chirp")
    audio = model.encode([{"array": clip, "sampling_rate": 16000}])
    text = model.encode(["a rising whistle", "noise"])
    assert audio.shape == (1, 4, 16) and text.shape == (2, 16)  # a clip is its query vectors, a text one vector
    with pytest.raises(RuntimeError, match="self must be a matrix"):
        model.similarity(audio, text)
    # The model's own score of the same vectors is the mteb encoder's.
    encoder = load_encoder(saved_model, device="cpu")
    expected = encoder.similarity(encoder._clip_vectors({"array": clip, "sampling_rate": 16000})[None], embed_texts(encoder.model, encoder.processor, ["a rising whistle", "noise"]).numpy())
    torch.testing.assert_close(encoder.similarity(audio, text), expected, atol=1e-5, rtol=0)
