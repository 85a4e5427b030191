# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""
The sound-search app: a Gradio Blocks interface over a sound library (`audio_qformer.library.AudioLibrary`), run locally or as
the model's Hugging Face Space.

    python app.py --model DIR_OR_HUB_ID --library LIBRARY_DIR [--sounds DIR] [--port 7860] [--host 127.0.0.1]
                  [--max_upload_mb 200]

Tabs: Search (a text → the best files, each with a player, its score, where its best window starts and its caption when
the library stores captions), Similar (an uploaded or recorded clip → files that sound like it), Describe (a clip → the
model's caption of it, window by window beyond 30 s), Classify (a clip and comma-separated labels → ranked labels) and
Library (what is indexed, and the files that could not be read). The named API endpoints `/search`, `/similar`,
`/describe` and `/classify` serve `gradio_client`. Offline-safe: no analytics, no share link, no server-side rendering; gradio 6.17 and
newer bundle their fonts.

What the server hands out: the library's indexed audio files (`LibraryAudio`: each checked to be listed, inside its
indexed folder, and the file that was embedded) and the clips uploaded to it; nothing else on the disk. It has no
sign-in: the README's "Serving the app and the endpoint to others" says what it exposes and how to add one.

Run with no arguments (as a Space runs it), `app_defaults.json` beside this file names the model and the library folder
(`python -m audio_qformer.hub_pages space` writes it). Sounds under the library's `sounds/` folder that are not embedded yet are embedded
before the app serves (a progress bar in the log); stored ones never again.
"""

import argparse
import atexit
import html
import json
import mimetypes
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from urllib.parse import quote

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
# Gradio serves its upload folder to anyone who names a file in it; one of this app's own, not the machine's shared
# /tmp/gradio, holds this app's uploads only. Removed when the process ends.
if not os.environ.get("GRADIO_TEMP_DIR"):
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="audio-qformer-app-")
    atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)

import fastapi  # noqa: E402
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from audio_io import AudioLoadError, load_audio  # noqa: E402
from audio_qformer.library import BROWSING_LIBRARY, AudioLibrary, SearchHit  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
APP_DEFAULTS = "app_defaults.json"
# What one request may ask for. The endpoint handler (`handler.py`) has the same clip limit.
MAX_CLIP_SECONDS = 600  # an uploaded clip to compare, describe or classify
MAX_UPLOAD_MB = 200  # an upload's size (`--max_upload_mb`): 10 minutes of 48 kHz stereo 24-bit WAV take 173 MB
MAX_TEXT_CHARACTERS = 1000  # a query or a label; the model reads at most its `eval_max_text_length` tokens
MAX_LABELS = 100
MAX_RESULTS = 50
SILENCE_PEAK = 1e-4  # a clip whose loudest sample is below -80 dBFS has nothing to compare
# The route of the library's audio files: `/library-audio/<file key>/<file name>` (see `LibraryAudio`).
AUDIO_ROUTE = "library-audio"
# transformers' zero-shot audio classification pipeline's template, as the endpoint handler uses it.
HYPOTHESIS_TEMPLATE = "This is a sound of {}."


class SoundSearchApp:
    """The app's work, apart from its layout: each method is one API endpoint and returns plain JSON values."""

    def __init__(self, library: AudioLibrary, max_upload_mb: int = MAX_UPLOAD_MB):
        self.library, self.max_upload_mb = library, max_upload_mb
        self.audio = LibraryAudio(library)

    def search(self, query: str, k: int = 10, rerank: bool = False) -> list[dict]:
        if not query or not query.strip():
            raise gr.Error("Type what you want to hear, e.g. 'a dog barks while cars pass by'.")
        if len(query) > MAX_TEXT_CHARACTERS:
            raise gr.Error(f"The query is longer than {MAX_TEXT_CHARACTERS} characters.")
        depth = self.library.model.config.rerank_top_k if rerank else 0
        hits = self.library.search([query.strip()], k=self._k(k), rerank=depth)[0]
        return [self._as_json(hit) for hit in hits]

    def similar(self, audio_path: str | None, k: int = 10) -> list[dict]:
        self._clip(audio_path)
        return [self._as_json(hit) for hit in self.library.similar(audio_path, k=self._k(k))]

    def describe(self, audio_path: str | None) -> list[dict]:
        """The model's caption of a clip: `[{"start_seconds", "caption"}]`, one part per window beyond 30 s."""
        from audio_qformer.captioning import caption_parts, caption_waveforms

        parts = caption_parts(self._clip(audio_path), self.library.sampling_rate)
        captions = caption_waveforms(self.library.model, self.library.processor, [samples for _, samples in parts])
        return [{"start_seconds": start, "caption": caption} for (start, _), caption in zip(parts, captions)]

    @torch.no_grad()
    def classify(self, audio_path: str | None, labels: str) -> dict[str, float]:
        if len(labels or "") > MAX_LABELS * (MAX_TEXT_CHARACTERS + 1):  # before splitting an over-long text
            raise gr.Error(f"Give at most {MAX_LABELS} labels of {MAX_TEXT_CHARACTERS} characters each.")
        names = [label.strip() for label in (labels or "").split(",") if label.strip()]
        if not names:
            raise gr.Error("Give at least one label, e.g. 'a dog barking, rain, a car engine'.")
        if len(names) > MAX_LABELS or any(len(name) > MAX_TEXT_CHARACTERS for name in names):
            raise gr.Error(f"Give at most {MAX_LABELS} labels of {MAX_TEXT_CHARACTERS} characters each; got "
                           f"{len(names)}, the longest {max(map(len, names))}.")  # fmt: skip
        waveform = self._clip(audio_path)
        library, model = self.library, self.library.model
        audio_embeds, _ = library.embed_waveforms(library.windows(waveform)[1])
        tokens = library.processor.tokenizer([HYPOTHESIS_TEMPLATE.format(n) for n in names], padding=True,
                                             return_tensors="pt")  # fmt: skip
        text_embeds = model.get_text_features(**tokens).text_embeds.float()
        scores = model.zero_shot_logits(audio_embeds, text_embeds).softmax(-1)
        return dict(zip(names, scores.tolist()))

    def summary(self) -> tuple[str, list[list], list[list]]:
        """The library as Markdown, its files `[name, seconds, windows, folder, caption]` and its unreadable files."""
        library, config = self.library, self.library.config
        rows = [[os.path.basename(f["path"]), round(f["seconds"], 2), f["windows"], os.path.dirname(f["path"]),
                 f["caption"] or ""] for f in library.stored_files()]  # fmt: skip
        failures = [[f["audio"], f["reason"]] for f in library.failures()]
        tokens = "BEATs tokens stored for re-ranking." if config["keep_tokens"] else "No stored tokens."
        text = (
            f"**{len(rows)} files**, {sum(row[2] for row in rows)} windows of {config['window_seconds']} s "
            f"({config['hop_seconds']} s apart), {sum(row[1] for row in rows) / 60:.1f} minutes of audio. "
            f"Model: `{config.get('model')}`. Library folder: `{library.directory}`. {tokens} "
            f"Files that could not be read: {len(failures)}.\n\n"
            f"Limits: uploads up to {self.max_upload_mb} MB, clips up to {MAX_CLIP_SECONDS // 60} minutes, queries "
            f"and labels up to {MAX_TEXT_CHARACTERS} characters, {MAX_LABELS} labels, {MAX_RESULTS} files a search. "
            "The app plays the library's own files and the clips uploaded to it, nothing else."
        )
        return text, rows, failures

    def _as_json(self, hit: SearchHit) -> dict:
        # "file", not "path": gradio takes any dict with a "path" for a file to upload or download. `audio_url` is
        # where the app serves the file (relative to the app's address), None where it does not (`LibraryAudio`).
        fields = asdict(hit)
        return {"file": fields.pop("path"), **fields, "audio_url": self.audio.url(hit.path)}

    def _k(self, k) -> int:
        return max(1, min(int(k or 10), MAX_RESULTS))

    def _clip(self, audio_path: str | None) -> np.ndarray:
        if not audio_path:
            raise gr.Error("Upload or record a clip first.")
        try:
            # Decoded a little past the limit: enough to tell an over-long clip, in bounded memory (`load_audio`).
            waveform = load_audio(audio_path, sampling_rate=self.library.sampling_rate, max_seconds=MAX_CLIP_SECONDS + 1)
        except AudioLoadError as error:
            raise gr.Error(f"That file is not audio this app can read: {error.reason}") from error
        if len(waveform) > MAX_CLIP_SECONDS * self.library.sampling_rate:
            raise gr.Error(f"The clip is longer than {MAX_CLIP_SECONDS // 60} minutes: upload a shorter one.")
        if float(np.abs(waveform).max()) < SILENCE_PEAK:
            raise gr.Error("The clip is silent (nothing above -80 dBFS): there is nothing to compare.")
        return waveform


class LibraryAudio:
    """
    The library's audio files over HTTP, and nothing else: `GET /library-audio/<file key>/<file name>`.

    Why a route of the app's own. Gradio serves a file when it lies under one of `allowed_paths` (folders or files),
    the static paths, its upload folder or its cache (`gradio.route_utils.file_fetch`). Giving it the indexed folders
    serves every file in them (secrets beside the audio included), and giving it each indexed file makes every
    request scan the whole list. So Gradio is given no `allowed_paths` at all: its `/gradio_api/file=` route serves
    only the clips uploaded to this app (and the files it wrote itself), from a private temporary folder. The players
    fetch the library's files here instead, by file key: a request names no path, so `..`, absolute paths and other
    files cannot be asked for; a key is served only if `AudioLibrary.shareable_file` finds it listed, an audio file,
    inside its indexed folder after symlinks, and still the very file that was embedded (which a key in an imported
    export cannot prove for a file here). A key is 128 bits of a hash of the file's path, size and modification time,
    or of its content: only someone who was shown it by a search, or who has the file, can name it.
    """

    def __init__(self, library: AudioLibrary):
        self.library = library
        self._keys = None  # the searched files' paths -> their keys, read once
        self._checked = {}  # key -> (real path, its stat signature) of a file found shareable

    def url(self, path: str) -> str | None:
        """Where the app serves the library file `path` (a search hit's), or None if it does not."""
        if self._keys is None:
            self._keys = {self.library.path_of(key): key for key in self.library.live_keys()}
        key = self._keys.get(path)
        if key is None or self.file(key) is None:
            return None
        return f"{AUDIO_ROUTE}/{quote(key, safe='')}/{quote(os.path.basename(path), safe='')}"

    def file(self, key: str) -> str | None:
        """The real path to serve for `key`, or None; checked again whenever the file changed since."""
        checked = self._checked.get(key)
        if checked is not None and _signature(checked[0]) == checked[1]:
            return checked[0]
        real = self.library.shareable_file(key)
        if real is None:
            self._checked.pop(key, None)
            return None
        self._checked[key] = (real, _signature(real))
        return real

    def response(self, key: str, name: str) -> fastapi.Response:
        real = self.file(key)
        if real is None or name != os.path.basename(self.library.path_of(key)):
            return fastapi.Response("Not found", status_code=404, media_type="text/plain")
        media_type = mimetypes.guess_type(real)[0] or "application/octet-stream"
        # Starlette's FileResponse answers byte ranges (206), which players ask for when seeking.
        return fastapi.responses.FileResponse(real, media_type=media_type, filename=name, content_disposition_type="inline",
                                              headers={"X-Content-Type-Options": "nosniff"})  # fmt: skip


def _signature(path: str) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _results_view(hits: list[dict] | None):
    """One row per hit: rank, file name, score, where its best window starts, and a player."""
    if not hits:
        return
    for rank, hit in enumerate(hits, 1):
        with gr.Row(equal_height=True):
            where = f" · from {hit['start_seconds']:.1f} s" if hit["start_seconds"] else ""
            match = f" · match logit {hit['match_logit']:.2f}" if hit.get("match_logit") is not None else ""
            caption = f"  \n*{hit['caption']}*" if hit.get("caption") else ""
            gr.Markdown(f"**{rank}. {os.path.basename(hit['file'])}**  \nscore {hit['score']:.3f}{match}{where}{caption}",
                        elem_classes="hit")  # fmt: skip
            gr.HTML(_player(hit), elem_classes="hit-audio")


def _player(hit: dict) -> str:
    """The browser's own player for a hit, with a download link; the file comes from the app's audio route."""
    if not hit.get("audio_url"):
        return "<em>This file is not served here: the library does not list it as indexed on this machine.</em>"
    url, name = html.escape(hit["audio_url"]), html.escape(os.path.basename(hit["file"]))
    return (f'<audio controls preload="metadata" src="{url}"></audio> '
            f'<a href="{url}" download="{name}">download</a>')  # fmt: skip


def _captions_view(parts: list[dict] | None):
    if not parts:
        return
    for part in parts:
        where = f"from {part['start_seconds']:.1f} s: " if len(parts) > 1 else ""
        gr.Markdown(f"{where}**{part['caption']}**", elem_classes="caption")


def build_app(app: SoundSearchApp) -> gr.Blocks:
    # Uploads older than an hour are deleted every hour (and all of them when the app stops).
    with gr.Blocks(title="audio-qformer sound search", delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(
            "# Sound search\nType what you want to hear; the library's files come back ranked, each with a player. "
            f"Model `{app.library.config.get('model')}`."
        )
        with gr.Tab("Search"):
            with gr.Row():
                query = gr.Textbox(label="What do you want to hear?", placeholder="a dog barks while cars pass by",
                                   scale=4, elem_id="query")  # fmt: skip
                k = gr.Slider(1, MAX_RESULTS, value=5, step=1, label="Files", scale=1)
            rerank = gr.Checkbox(label=f"Re-rank the top {app.library.model.config.rerank_top_k} with the matching head")
            run = gr.Button("Search", variant="primary", elem_id="search-button")
            search_hits = gr.JSON(visible=False)
            with gr.Column(elem_id="search-results"):
                gr.render(inputs=search_hits)(_results_view)
            run.click(app.search, [query, k, rerank], search_hits, api_name="search")
            query.submit(app.search, [query, k, rerank], search_hits, api_visibility="private")
        with gr.Tab("Similar"):
            clip = gr.Audio(sources=["upload", "microphone"], type="filepath", label="A clip", elem_id="similar-clip")
            similar_k = gr.Slider(1, MAX_RESULTS, value=5, step=1, label="Files")
            find = gr.Button("Find similar sounds", variant="primary", elem_id="similar-button")
            similar_hits = gr.JSON(visible=False)
            with gr.Column(elem_id="similar-results"):
                gr.render(inputs=similar_hits)(_results_view)
            find.click(app.similar, [clip, similar_k], similar_hits, api_name="similar")
        with gr.Tab("Describe"):
            describe_clip = gr.Audio(sources=["upload", "microphone"], type="filepath", label="A clip",
                                     elem_id="describe-clip")  # fmt: skip
            describe = gr.Button("Describe this sound", variant="primary", elem_id="describe-button")
            parts = gr.JSON(visible=False)
            with gr.Column(elem_id="describe-results"):
                gr.render(inputs=parts)(_captions_view)
            describe.click(app.describe, [describe_clip], parts, api_name="describe")
        with gr.Tab("Classify"):
            classify_clip = gr.Audio(sources=["upload", "microphone"], type="filepath", label="A clip")
            labels = gr.Textbox(label="Labels, comma-separated", placeholder="a dog barking, rain, a car engine")
            classify = gr.Button("Classify", variant="primary")
            ranked = gr.Label(label="Labels, best first")
            classify.click(app.classify, [classify_clip, labels], ranked, api_name="classify")
        with gr.Tab("Library"):
            text, rows, failures = app.summary()
            gr.Markdown(text, elem_id="library-summary")
            gr.Dataframe(rows[:1000], headers=["file", "seconds", "windows", "folder", "caption"],
                         label="Files (first 1000)")  # fmt: skip
            gr.Dataframe(failures, headers=["file", "why it was skipped"], label="Files that could not be read")
    return blocks


def open_library(library_dir: str, model: str | None, sounds: str | None) -> AudioLibrary:
    """The library, created with `model` if new, after embedding what `sounds` holds that it does not."""
    new = not os.path.exists(os.path.join(library_dir, "library.json"))
    if new and not model:
        raise SystemExit(f"app.py: no library at {library_dir}; give --model (and --sounds) to build one.")
    try:  # a new library stores what the app shows (captions, tokens for its re-rank switch); an existing one is as it is
        library = AudioLibrary.open(library_dir, model, create=True, **(BROWSING_LIBRARY if new else {}))
    except ValueError as error:  # its model cannot be loaded here, or is not the library's
        raise SystemExit(f"app.py: {error}") from error
    if sounds:
        report = library.index(sounds)
        print(f"{library_dir}: {report['embedded']} embedded, {report['reused']} already stored, "
              f"{len(report['failed'])} unreadable")  # fmt: skip
    return library


def make_server(search_app: SoundSearchApp, auth=None) -> fastapi.FastAPI:
    """
    The app's HTTP server: the library's audio route (`LibraryAudio`) and the Gradio app at `/`, given no folders to
    serve (see `LibraryAudio` for why), uploads capped at `search_app.max_upload_mb`. Run it with uvicorn. `auth` is
    Gradio's (`("user", "password")`, a list of them, or a function of both): a sign-in page before the app; the audio
    route stays open, but serves a file only by the key that a signed-in search shows.
    """
    server = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    server.add_api_route(f"/{AUDIO_ROUTE}/{{key}}/{{name}}", search_app.audio.response, methods=["GET", "HEAD"])
    return gr.mount_gradio_app(server, build_app(search_app), path="/", allowed_paths=[], show_error=False,
                               ssr_mode=False, footer_links=["api"], max_file_size=f"{search_app.max_upload_mb}mb",
                               auth=auth)  # fmt: skip


def main(argv=None):
    defaults_path = os.path.join(HERE, APP_DEFAULTS)
    defaults = json.load(open(defaults_path)) if os.path.exists(defaults_path) else {}
    parser = argparse.ArgumentParser(description="Search a sound library in the browser.")
    parser.add_argument("--model", default=defaults.get("model"), help="Saved model folder or Hub id (default: the "
                        "library's own, or app_defaults.json's).")  # fmt: skip
    parser.add_argument("--library", help="The library folder (default: app_defaults.json's, beside this file, else "
                        "./audio-library).")  # fmt: skip
    parser.add_argument("--sounds", help="Index this folder first (default: the library's sounds/ folder, if any).")
    parser.add_argument("--host", help="Address to serve on (default 127.0.0.1, or GRADIO_SERVER_NAME).")
    parser.add_argument("--port", type=int, help="Port (default 7860, or GRADIO_SERVER_PORT).")
    parser.add_argument("--max_upload_mb", type=int, default=MAX_UPLOAD_MB, help="Refuse uploads larger than this "
                        f"many MB (default {MAX_UPLOAD_MB}).")  # fmt: skip
    args = parser.parse_args(argv)
    if args.max_upload_mb < 1:
        parser.error(f"--max_upload_mb must be at least 1; got {args.max_upload_mb}.")
    library_dir = args.library or (os.path.join(HERE, defaults["library"]) if "library" in defaults else "audio-library")
    sounds = args.sounds or (os.path.join(library_dir, "sounds") if os.path.isdir(os.path.join(library_dir, "sounds")) else None)
    library = open_library(library_dir, args.model, sounds)
    import uvicorn

    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = args.port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    server = make_server(SoundSearchApp(library, args.max_upload_mb))
    print(f"Serving {library_dir} on http://{host}:{port} (no sign-in: see the README before serving others)")
    uvicorn.run(server, host=host, port=port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
