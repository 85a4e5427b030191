# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""
The sound-search app: a Gradio Blocks interface over a sound library (`audio_library.AudioLibrary`), run locally or as
the model's Hugging Face Space.

    python app.py --model DIR_OR_HUB_ID --library LIBRARY_DIR [--sounds DIR] [--port 7860] [--host 127.0.0.1]

Tabs: Search (a text → the best files, each with a player, its score, where its best window starts and its caption when
the library stores captions), Similar (an uploaded or recorded clip → files that sound like it), Describe (a clip → the
model's caption of it, window by window beyond 30 s), Classify (a clip and comma-separated labels → ranked labels) and
Library (what is indexed, and the files that could not be read). The named API endpoints `/search`, `/similar`,
`/describe` and `/classify` serve `gradio_client`. Offline-safe: no analytics, no share link, no server-side rendering; gradio 6.17 and
newer bundle their fonts.

Run with no arguments (as a Space runs it), `app_defaults.json` beside this file names the model and the library folder
(`hub_pages.py space` writes it). Sounds under the library's `sounds/` folder that are not embedded yet are embedded
before the app serves (a progress bar in the log); stored ones never again.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from audio_io import AudioLoadError, load_audio  # noqa: E402
from audio_library import BROWSING_LIBRARY, AudioLibrary, SearchHit, load_model  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
APP_DEFAULTS = "app_defaults.json"
MAX_CLIP_SECONDS = 600  # an uploaded clip to compare or classify
SILENCE_PEAK = 1e-4  # a clip whose loudest sample is below -80 dBFS has nothing to compare
MAX_RESULTS = 50
# transformers' zero-shot audio classification pipeline's template, as the endpoint handler uses it.
HYPOTHESIS_TEMPLATE = "This is a sound of {}."


class SoundSearchApp:
    """The app's work, apart from its layout: each method is one API endpoint and returns plain JSON values."""

    def __init__(self, library: AudioLibrary):
        self.library = library

    def search(self, query: str, k: int = 10, rerank: bool = False) -> list[dict]:
        if not query or not query.strip():
            raise gr.Error("Type what you want to hear, e.g. 'a dog barks while cars pass by'.")
        depth = self.library.model.config.rerank_top_k if rerank else 0
        hits = self.library.search([query.strip()], k=self._k(k), rerank=depth)[0]
        return [_as_json(hit) for hit in hits]

    def similar(self, audio_path: str | None, k: int = 10) -> list[dict]:
        self._clip(audio_path)
        return [_as_json(hit) for hit in self.library.similar(audio_path, k=self._k(k))]

    def describe(self, audio_path: str | None) -> list[dict]:
        """The model's caption of a clip: `[{"start_seconds", "caption"}]`, one part per window beyond 30 s."""
        from captioning import caption_parts, caption_waveforms

        parts = caption_parts(self._clip(audio_path), self.library.sampling_rate)
        captions = caption_waveforms(self.library.model, self.library.processor, [samples for _, samples in parts])
        return [{"start_seconds": start, "caption": caption} for (start, _), caption in zip(parts, captions)]

    @torch.no_grad()
    def classify(self, audio_path: str | None, labels: str) -> dict[str, float]:
        names = [label.strip() for label in (labels or "").split(",") if label.strip()]
        if not names:
            raise gr.Error("Give at least one label, e.g. 'a dog barking, rain, a car engine'.")
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
            f"Files that could not be read: {len(failures)}."
        )
        return text, rows, failures

    def _k(self, k) -> int:
        return max(1, min(int(k or 10), MAX_RESULTS))

    def _clip(self, audio_path: str | None) -> np.ndarray:
        if not audio_path:
            raise gr.Error("Upload or record a clip first.")
        try:
            waveform = load_audio(audio_path, sampling_rate=self.library.sampling_rate, max_seconds=MAX_CLIP_SECONDS + 1)
        except AudioLoadError as error:
            raise gr.Error(f"That file is not audio this app can read: {error.reason}") from error
        if len(waveform) > MAX_CLIP_SECONDS * self.library.sampling_rate:
            raise gr.Error(f"The clip is longer than {MAX_CLIP_SECONDS // 60} minutes: upload a shorter one.")
        if float(np.abs(waveform).max()) < SILENCE_PEAK:
            raise gr.Error("The clip is silent (nothing above -80 dBFS): there is nothing to compare.")
        return waveform


def _as_json(hit: SearchHit) -> dict:
    # "file", not "path": gradio takes any dict with a "path" for a file to upload or download.
    fields = asdict(hit)
    return {"file": fields.pop("path"), **fields}


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
            gr.Audio(hit["file"], show_label=False, interactive=False, elem_classes="hit-audio")


def _captions_view(parts: list[dict] | None):
    if not parts:
        return
    for part in parts:
        where = f"from {part['start_seconds']:.1f} s: " if len(parts) > 1 else ""
        gr.Markdown(f"{where}**{part['caption']}**", elem_classes="caption")


def build_app(app: SoundSearchApp) -> gr.Blocks:
    with gr.Blocks(title="audio-qformer sound search") as blocks:
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


def library_roots(library: AudioLibrary) -> list[str]:
    """The folders the app may serve audio from: every indexed folder."""
    return sorted({os.path.abspath(os.path.join(library.directory, root)) for root in library.files})


def open_library(library_dir: str, model: str | None, sounds: str | None) -> AudioLibrary:
    """The library, created with `model` if new, after embedding what `sounds` holds that it does not."""
    if os.path.exists(os.path.join(library_dir, "library.json")):
        try:
            library = AudioLibrary.load(library_dir, model)
        except ValueError as error:  # its model cannot be loaded here, or is not the library's
            raise SystemExit(f"app.py: {error}") from error
    elif model:
        loaded, processor = load_model(model)
        library = AudioLibrary(library_dir, loaded, processor, model, create=True, **BROWSING_LIBRARY)
    else:
        raise SystemExit(f"app.py: no library at {library_dir}; give --model (and --sounds) to build one.")
    if sounds:
        report = library.index(sounds)
        print(f"{library_dir}: {report['embedded']} embedded, {report['reused']} already stored, "
              f"{len(report['failed'])} unreadable")  # fmt: skip
    return library


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
    args = parser.parse_args(argv)
    library_dir = args.library or (os.path.join(HERE, defaults["library"]) if "library" in defaults else "audio-library")
    sounds = args.sounds or (os.path.join(library_dir, "sounds") if os.path.isdir(os.path.join(library_dir, "sounds")) else None)
    library = open_library(library_dir, args.model, sounds)
    blocks = build_app(SoundSearchApp(library))
    blocks.queue().launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
                          allowed_paths=library_roots(library), footer_links=["api"])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
