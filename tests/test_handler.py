"""The Inference Endpoints handler, run as the inference toolkit runs it: from a saved folder alone, in a fresh process."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_qformer_config

from modeling_audio_qformer import AudioQFormerModel
from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("endpoint") / "model"
    torch.manual_seed(0)
    AudioQFormerModel(tiny_qformer_config()).eval().save_pretrained(directory)
    AudioQFormerProcessor(BeatsFeatureExtractor(), tokenizer).save_pretrained(directory)
    return directory


def run_alone(script: str, cwd, timeout=300) -> dict:
    """Run `script` in a fresh interpreter with this repository off `sys.path`; its last line is JSON."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_saved_folders_carry_the_handler(saved_folder, tmp_path):
    assert {"handler.py", "audio_io.py", "requirements.txt"} <= set(os.listdir(saved_folder))
    requirements = (saved_folder / "requirements.txt").read_text()
    assert "soundfile" in requirements and "soxr" in requirements
    # A model loaded as remote code (its modules in transformers' cache, without the handler) saved again keeps them,
    # taken from the folder it was loaded from.
    copy = tmp_path / "copy"
    shutil.copytree(saved_folder, copy)
    found = run_alone(
        f"""
        import json, os
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(copy)!r}, trust_remote_code=True)
        model.save_pretrained("again")
        print(json.dumps(sorted(os.listdir("again"))))
        """,
        tmp_path,
    )
    assert {"handler.py", "audio_io.py", "requirements.txt", "modeling_audio_qformer.py"} <= set(found)


HANDLER_SCRIPT = """
    import base64, io, json, sys
    import numpy as np, soundfile, torch
    folder = {folder!r}
    sys.path.insert(0, folder)  # as the inference toolkit does
    from handler import EndpointHandler, MAX_AUDIO_SECONDS
    from transformers import pipeline

    handler = EndpointHandler(folder)
    rate = 44100
    t = np.arange(int(2.5 * rate)) / rate
    stereo = (0.3 * np.stack([np.sin(2 * np.pi * (200 + 800 * t) * t), np.sin(2 * np.pi * 660 * t)], 1)).astype(np.float32)

    def encode(wave, fmt, sr=rate):
        buffer = io.BytesIO()
        soundfile.write(buffer, wave, sr, format=fmt)
        return buffer.getvalue()

    out = {{}}
    labels = ["a rising whistle", "a dog barking", "rain"]
    classifier = pipeline("zero-shot-audio-classification", model=folder, trust_remote_code=True)
    for fmt in ("WAV", "FLAC", "OGG", "MP3"):
        data = encode(stereo, fmt)
        from_bytes = handler({{"inputs": data, "parameters": {{"candidate_labels": labels}}}})
        from_base64 = handler({{"inputs": base64.b64encode(data).decode(), "parameters": {{"candidate_labels": ", ".join(labels)}}}})
        # the pipeline on the same audio, decoded as the handler decodes it (mono, 16 kHz)
        from audio_io import load_audio
        expected = classifier(load_audio(data=data), candidate_labels=labels)
        out[fmt] = {{"bytes": from_bytes, "base64": from_base64, "pipeline": expected}}

    long = (0.1 * np.random.default_rng(0).standard_normal(16000 * 25)).astype(np.float32)
    embedding = handler({{"inputs": encode(long, "FLAC", 16000)}})  # raw audio, no parameters: its embeddings
    out["embedding"] = {{"shape": list(np.shape(embedding["audio_embeds"])), "starts": embedding["window_starts"],
                         "duration": embedding["duration"]}}
    texts = handler({{"inputs": {{"text": ["a dog barks", "rain on a roof"]}}}})
    model, processor = handler.model, handler.processor
    with torch.no_grad():
        tokens = processor(text=["a dog barks", "rain on a roof"], max_length=model.config.eval_max_text_length, return_tensors="pt")
        direct = model.get_text_features(**tokens).text_embeds
    out["text_error"] = float((torch.tensor(texts["text_embeds"]) - direct).abs().max())
    clips = [base64.b64encode(encode(stereo, "WAV")).decode(), base64.b64encode(encode(long, "FLAC", 16000)).decode()]
    out["ranking"] = handler({{"inputs": {{"text": ["a rising whistle", "noise"], "audio": clips}}, "parameters": {{"top_k": 2}}}})
    with torch.no_grad():
        windows = [torch.tensor(e) for e in (handler({{"inputs": clips[0], "parameters": {{"task": "audio-embedding"}}}})["audio_embeds"], embedding["audio_embeds"])]
        text = handler({{"inputs": {{"text": ["a rising whistle", "noise"]}}}})["text_embeds"]
        out["ranking_expected"] = torch.stack([model.score(w, torch.tensor(text)).amax(0) for w in windows], 1).tolist()

    caption_request = {{"inputs": encode(stereo, "WAV"), "parameters": {{"task": "caption"}}}}
    out["caption"] = handler(caption_request)
    out["caption_greedy"] = handler({{"inputs": encode(stereo, "WAV"), "parameters": {{"task": "caption", "num_beams": 1, "max_length": 12}}}})
    with torch.no_grad():
        features = processor.feature_extractor([load_audio(data=encode(stereo, "WAV"))], sampling_rate=16000, return_tensors="pt")
        out["caption_expected"] = [processor.batch_decode(model.generate(**features, **options), skip_special_tokens=True)[0].strip()
                                   for options in ({{}}, {{"num_beams": 1, "max_length": 12}})]
    out["caption_long"] = handler({{"inputs": encode(np.tile(long, 2)[: 16000 * 35], "FLAC", 16000), "parameters": {{"task": "caption"}}}})
    too_long = encode(np.zeros(16000 * (MAX_AUDIO_SECONDS + 2), np.float32) + 0.1, "WAV", 16000)
    bad = {{
        "empty": {{"inputs": b""}},
        "not audio": {{"inputs": b"this is not audio" * 20, "parameters": {{"candidate_labels": labels}}}},
        "bad base64": {{"inputs": "%%%not base64%%%", "parameters": {{"candidate_labels": labels}}}},
        "no labels": {{"inputs": encode(stereo, "WAV"), "parameters": {{"candidate_labels": " , "}}}},
        "too long": {{"inputs": too_long, "parameters": {{"task": "audio-embedding"}}}},
        "unknown task": {{"inputs": encode(stereo, "WAV"), "parameters": {{"task": "translate"}}}},
        "empty text": {{"inputs": {{"text": ["  "]}}}},
        "long text": {{"inputs": {{"text": ["rain " * 201]}}}},
        "many labels": {{"inputs": encode(stereo, "WAV"), "parameters": {{"candidate_labels": ["rain"] * 101}}}},
        "caption option": {{"inputs": encode(stereo, "WAV"), "parameters": {{"task": "caption", "num_beams": "three"}}}},
        "caption range": {{"inputs": encode(stereo, "WAV"), "parameters": {{"task": "caption", "num_beams": 40}}}},
    }}
    out["errors"] = {{}}
    for name, payload in bad.items():
        try:
            handler(payload)
            out["errors"][name] = None
        except ValueError as error:
            out["errors"][name] = str(error)
    print(json.dumps(out))
"""


def test_handler_from_a_fresh_process(saved_folder, tmp_path):
    folder = tmp_path / "endpoint-model"
    shutil.copytree(saved_folder, folder)
    out = run_alone(HANDLER_SCRIPT.format(folder=str(folder)), tmp_path, timeout=600)
    for fmt in ("WAV", "FLAC", "OGG", "MP3"):
        by_bytes, by_base64, expected = out[fmt]["bytes"], out[fmt]["base64"], out[fmt]["pipeline"]
        assert [r["label"] for r in by_bytes] == [r["label"] for r in expected] == [r["label"] for r in by_base64], fmt
        for got, want in zip(by_bytes, expected):
            assert abs(got["score"] - want["score"]) < 1e-5, fmt
        assert by_bytes == by_base64
    # 25 s: windows of 10.24 s every 5.12 s, the last ending with the clip
    assert out["embedding"]["shape"] == [4, 4, 16] and out["embedding"]["duration"] == 25.0
    assert out["embedding"]["starts"] == [0.0, 5.12, 10.24, 14.76]
    assert out["text_error"] < 1e-6
    expected = out["ranking_expected"]  # (texts, audios): each audio's best window
    for text, ranked in enumerate(out["ranking"]):
        assert [r["audio"] for r in ranked] == sorted(range(2), key=lambda a: -expected[text][a])
        assert all(abs(r["score"] - expected[text][r["audio"]]) < 1e-5 for r in ranked)
    errors = out["errors"]
    assert "empty" in errors["empty"]
    assert "not audio in a readable format" in errors["not audio"] and "Format not recognised" in errors["not audio"]
    assert "not valid base64" in errors["bad base64"]
    assert "candidate_labels is empty" in errors["no labels"]
    assert "longer than the endpoint's limit of 600 s" in errors["too long"]
    assert "Unknown task 'translate'" in errors["unknown task"]
    assert "needs non-empty texts" in errors["empty text"]
    assert "longer than the endpoint's limit of 1000 characters" in errors["long text"]
    assert "at most 100 labels of 1000 characters each; got 101" in errors["many labels"]
    assert "parameters.num_beams must be int" in errors["caption option"]
    assert "parameters.num_beams must be 1 to 10, got 40" in errors["caption range"]
    # Captions: the model's generate on the decoded clip (beam search by default, options passed through); a clip
    # over 30 s is captioned window by window.
    assert out["caption"] == [{"start_seconds": 0.0, "caption": out["caption_expected"][0]}]
    assert out["caption_greedy"][0]["caption"] == out["caption_expected"][1]
    assert [part["start_seconds"] for part in out["caption_long"]] == [0.0, 5.12, 10.24, 15.36, 20.48, 24.76]
