"""The Gradio app (`app.py`) through `gradio_client` and a real browser, and the folders the Hub pushes upload."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile
import torch
from conftest import ROOT, make_waveform, tiny_qformer_config

from modeling_audio_qformer import AudioQFormerModel
from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor


gr = pytest.importorskip("gradio")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("app-model")
    torch.manual_seed(0)
    AudioQFormerModel(tiny_qformer_config()).eval().save_pretrained(directory)
    AudioQFormerProcessor(BeatsFeatureExtractor(), tokenizer).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    """Five clips of different kinds, one longer than a window, and a file that is not audio."""
    directory = tmp_path_factory.mktemp("app-sounds")
    for i, kind in enumerate(["mix", "chirp", "quiet", "mix", "mix"]):
        soundfile.write(directory / f"clip{i}.wav", make_waveform(1.0 + i if i < 4 else 14.0, seed=i, kind=kind), 16000)
    (directory / "broken.wav").write_bytes(b"this is not audio" * 10)
    return directory


@pytest.fixture(scope="module")
def library(saved_model, sounds, tmp_path_factory):
    import app

    return app.open_library(str(tmp_path_factory.mktemp("app-lib") / "lib"), saved_model, str(sounds))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(server_app):
    """An app server (`app.make_server`) run by uvicorn in a thread, as `app.py` runs it; yields its address."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(server_app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def client(library):
    from gradio_client import Client

    import app

    with serving(app.make_server(app.SoundSearchApp(library))) as url:
        yield Client(url, verbose=False)


def test_sign_in_guards_the_app(library):
    from gradio_client import Client

    import app

    with serving(app.make_server(app.SoundSearchApp(library), auth=[("alice", "a long passphrase")])) as url:
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(url + "config")
        with pytest.raises(Exception, match="credentials were not provided"):
            Client(url, verbose=False)
        hits = Client(url, auth=("alice", "a long passphrase"), verbose=False).predict("rain", 2, False, api_name="/search")
        assert [hit["file"] for hit in hits] == [hit.path for hit in library.search(["rain"], k=2)[0]]


def assert_same_hits(got: list[dict], hits):
    assert [g["file"] for g in got] == [h.path for h in hits]
    for g, h in zip(got, hits):
        assert (g["score"], g["cosine"], g["start_seconds"]) == pytest.approx((h.score, h.cosine, h.start_seconds))
        assert (g["match_logit"] is None) == (h.match_logit is None)
        assert g["caption"] == h.caption and h.caption  # the app builds libraries with captions
        assert g["audio_url"].startswith("library-audio/") and g["audio_url"].endswith("/" + os.path.basename(h.path))


def test_endpoints_equal_the_library(client, library, sounds, saved_model):
    from gradio_client import handle_file
    from transformers import pipeline

    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/search", "/similar", "/describe", "/classify"}  # fmt: skip
    for rerank in (False, True):
        got = client.predict("a rising whistle", 4, rerank, api_name="/search")
        assert_same_hits(got, library.search(["a rising whistle"], k=4, rerank=16 * rerank)[0])
    assert any(hit["match_logit"] is not None for hit in got)  # the re-ranked run
    long_clip = str(sounds / "clip4.wav")
    got = client.predict(handle_file(long_clip), 3, api_name="/similar")
    # the upload is a copy, so the library's own clip4 is not excluded as it is for its own path
    expected = library.similar(long_clip, k=3)
    assert [os.path.basename(h["file"]) for h in got[1:]] == [os.path.basename(h.path) for h in expected[:2]]
    assert os.path.basename(got[0]["file"]) == "clip4.wav" and got[0]["score"] == pytest.approx(1.0, abs=1e-3)
    # Classify: a clip within one window scores as transformers' zero-shot pipeline
    labels = ["a rising whistle", "a dog barking", "rain"]
    got = client.predict(handle_file(str(sounds / "clip1.wav")), ", ".join(labels), api_name="/classify")
    classifier = pipeline("zero-shot-audio-classification", model=saved_model, trust_remote_code=True)
    expected = classifier(make_waveform(2.0, seed=1, kind="chirp"), candidate_labels=labels)
    assert got["label"] == expected[0]["label"]
    assert {c["label"]: c["confidence"] for c in got["confidences"]} == pytest.approx(
        {r["label"]: r["score"] for r in expected}, abs=1e-5)  # fmt: skip
    # Describe: the caption command's captions of the same file (one part within 30 s)
    from audio_qformer.captioning import caption_files

    got = client.predict(handle_file(long_clip), api_name="/describe")
    assert got == caption_files(library.model, library.processor, [long_clip])[0]["captions"]


def test_bad_input_gives_a_message_and_the_app_keeps_serving(client, sounds, tmp_path, monkeypatch):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    import app

    silent = tmp_path / "silence.wav"
    soundfile.write(silent, np.zeros(16000, np.float32), 16000)
    long = tmp_path / "long.wav"
    soundfile.write(long, np.full(16000 * 5, 0.1, np.float32), 16000)
    monkeypatch.setattr(app, "MAX_CLIP_SECONDS", 3)  # the app reads it per request
    cases = [
        (("   ", 3, False, "/search"), "Type what you want to hear"),
        ((handle_file(str(sounds / "broken.wav")), 3, "/similar"), "not audio this app can read: unreadable audio"),
        ((handle_file(str(silent)), 3, "/similar"), "The clip is silent"),
        ((handle_file(str(long)), 3, "/similar"), "longer than"),
        ((handle_file(str(sounds / "clip1.wav")), " , ", "/classify"), "Give at least one label"),
        ((None, "rain", "/classify"), "Upload or record a clip first"),
        ((handle_file(str(silent)), "/describe"), "The clip is silent"),
    ]
    for (*inputs, endpoint), message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*inputs, api_name=endpoint)
    assert len(client.predict("rain", 2, False, api_name="/search")) == 2


def test_library_view_lists_files_and_failures(library):
    import app

    text, rows, failures = app.SoundSearchApp(library).summary()
    assert sorted(row[0] for row in rows) == [f"clip{i}.wav" for i in range(5)]
    assert [row[2] for row in sorted(rows)] == [1, 1, 1, 1, 2]  # 14 s: two windows
    assert len(failures) == 1 and failures[0][0].endswith("broken.wav") and "Format not recognised" in failures[0][1]
    assert "**5 files**, 6 windows" in text and "could not be read: 1" in text


def test_model_card_is_truthful(tmp_path):
    from huggingface_hub import ModelCard

    from audio_qformer.hub_pages import write_model_card

    results = {"clotho-evaluation": {"mAP@10": 0.2647, "R@1": 0.1602, "R@5": 0.4, "R@10": 0.55}}
    training = {"preset": "stage2", "sources": ["Clotho"], "steps": 10, "learning_rate": 1e-5, "total_batch_size": 256}
    card = ModelCard.load(write_model_card(str(tmp_path), "you/audio-qformer", results, training, "you/search"))
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "feature-extraction" and "widget" not in data  # a real Hub task, nothing unrenderable
    assert {"custom_code", "audio", "zero-shot-audio-classification", "text-to-audio-retrieval"} <= set(data["tags"])
    result = data["model-index"][0]["results"][0]
    assert result["task"]["type"] == "text-to-audio-retrieval"
    assert {m["type"]: m["value"] for m in result["metrics"]}["mAP@10"] == 26.47
    for section in ("## How to use", "### Inference Endpoints", "### The Space", "## Training", "## Results", "## Limits"):
        assert section in card.text
    assert "spaces/you/search" in card.text and "AutoModel.from_pretrained(\"you/audio-qformer\"" in card.text
    assert "model.generate(**audio)" in card.text and "audio-captioning" in data["tags"]


def wait_for_server(url: str, process, seconds=180):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no app at {url} after {seconds} s")


def test_space_folder_runs_alone(saved_model, sounds, tmp_path):
    from huggingface_hub import SpaceCard

    from audio_qformer.hub_pages import write_space_folder

    space = tmp_path / "space"
    files = write_space_folder(str(space), "you/audio-qformer", sounds=str(sounds), model=saved_model)
    modules = {"app.py", "audio_io.py", "audio_qformer/__init__.py", "audio_qformer/library.py", "configuration_audio_qformer.py",
               "modeling_audio_qformer.py", "processing_audio_qformer.py", "audio_qformer/store.py",
               "audio_qformer/retrieval.py", "audio_qformer/vector_search.py"}  # fmt: skip
    assert modules <= set(files) and {"README.md", "requirements.txt", "app_defaults.json", "library/library.json"} <= set(files)
    assert "library/sounds/clip0.wav" in files and not any(f.startswith(("train", "demo")) for f in files)
    card = SpaceCard.load(space / "README.md")
    assert card.data.sdk == "gradio" and card.data.models == ["you/audio-qformer"] and card.data.app_file == "app.py"
    assert json.loads((space / "app_defaults.json").read_text()) == {"model": "you/audio-qformer", "library": "library"}
    # A clone elsewhere (new paths and modification times), run with its own files only: nothing is embedded again.
    clone = tmp_path / "clone"
    shutil.copytree(space, clone, copy_function=shutil.copyfile)
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen([sys.executable, "app.py", "--model", saved_model, "--port", str(port)], cwd=clone,
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": "",
                               "HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        wait_for_server(f"http://127.0.0.1:{port}/", process)
        from gradio_client import Client

        hits = Client(f"http://127.0.0.1:{port}/", verbose=False).predict("rain", 3, False, api_name="/search")
        assert len(hits) == 3 and all(h["file"].startswith(str(clone / "library" / "sounds")) for h in hits)
    finally:
        process.terminate()
        process.wait(30)
    output = (tmp_path / "app.log").read_text()
    assert "0 embedded, 5 already stored, 1 unreadable" in output, output[-2000:]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_in_a_browser(saved_model, library, sounds, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--model", saved_model, "--library",
                                library.directory, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    top_hit = library.search(["a rising whistle"], k=1)[0][0]
    top = os.path.basename(top_hit.path)
    top_seconds = next(f["seconds"] for f in library.stored_files() if f["path"] == top_hit.path)
    upload = tmp_path / "upload" / "clip1.wav"  # a copy: not excluded as the library's own file would be
    upload.parent.mkdir()
    shutil.copyfile(sounds / "clip1.wav", upload)
    similar_top = os.path.basename(library.similar(str(upload), k=1)[0].path)
    try:
        wait_for_server(f"http://127.0.0.1:{port}/", process)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                tempfile.mkdtemp(dir=tmp_path), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            page = browser.new_page()
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "blob:", "data:")) else None)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#query textarea").fill("a rising whistle")
            page.locator("#search-button").click()
            page.locator("#search-results .hit").first.wait_for(timeout=60_000)
            assert f"1. {top}" in page.locator("#search-results .hit").first.inner_text()
            # the browser's own player, fed by the app's audio route
            audio = page.locator("#search-results .hit-audio audio[src]").first
            audio.wait_for(state="attached", timeout=30_000)
            page.wait_for_function("a => a.readyState >= 1", arg=audio.element_handle(), timeout=30_000)
            assert audio.evaluate("a => a.duration") == pytest.approx(top_seconds, abs=0.05)  # fetched and decoded
            assert audio.evaluate("a => a.currentSrc").startswith(f"http://127.0.0.1:{port}/library-audio/")
            link = page.locator("#search-results .hit-audio a[download]").first
            assert link.get_attribute("download") == top and link.get_attribute("href") == audio.get_attribute("src")
            page.screenshot(path=str(tmp_path / "search.png"))
            page.get_by_role("tab", name="Similar").click()
            page.locator("#similar-clip input[type=file]").set_input_files(str(upload))
            page.locator("#similar-clip audio").first.wait_for(state="attached", timeout=30_000)
            page.locator("#similar-button").click()
            first = page.locator("#similar-results .hit").first
            first.wait_for(timeout=60_000)
            assert f"1. {similar_top}" in first.inner_text()
            browser.close()
        assert not outside, f"the page fetched from outside: {outside[:5]}"
    finally:
        process.terminate()
        process.wait(30)
