# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""
The Inference Endpoints handler: a saved model folder (or its Hub repository) served as an HTTP endpoint.

The Hugging Face inference toolkit puts the model folder on `sys.path`, builds `EndpointHandler(path)` once and calls it
per request with `data["inputs"]` (the raw body as bytes when a client posts `audio/*`, else the JSON's `inputs`) and
`data["parameters"]` (the JSON's `parameters`, may be absent). What `__call__` returns is sent back as JSON.

    inputs                              parameters                              returns
    audio                               candidate_labels: list or "a, b, c"      [{"label", "score"}, ...] best first
    audio                               (task: "audio-embedding")                {"audio_embeds": windows x 32 x 256,
                                                                                  "window_starts": [s], "duration": s}
    {"text": [...]}                     (task: "text-embedding")                 {"text_embeds": texts x 256}
    {"text": [...], "audio": [a, ...]}  (task: "text-to-audio-ranking"), top_k  per text: [{"audio": i, "score",
                                                                                  "start_seconds"}, ...] best first
    audio                               task: "caption" (+ generate options:     [{"start_seconds", "caption"}, ...]
                                        num_beams, max_length, min_length,
                                        do_sample, top_p)

Audio is raw bytes or base64 text (a `data:audio/...;base64,` prefix is allowed): wav, flac, ogg or mp3 at any
sampling rate and channel count, decoded and resampled to 16 kHz mono as the search CLI does (`audio_io.load_audio`),
at most `MAX_AUDIO_SECONDS` long. Clips longer than a window (10.24 s) are embedded in windows 5.12 s apart, and a clip
scores as its best window, as in a search library; a clip within one window classifies exactly as
`pipeline("zero-shot-audio-classification")` does. A caption describes a clip up to 30 s whole, a longer one window by
window (`audio_io.caption_spans`), with the model's caption head (beam search unless the parameters say otherwise).
Bad input raises `ValueError` saying what is wrong.
"""

import base64
import binascii
import sys

import torch
from transformers import AutoModel, AutoProcessor


# What one request may send (the app, `app.py`, has the same limits).
MAX_AUDIO_SECONDS = 600
MAX_TEXT_CHARACTERS = 1000  # a text or label; the model reads at most its `eval_max_text_length` tokens
MAX_LABELS = 100
# transformers' zero-shot audio classification pipeline's default template.
HYPOTHESIS_TEMPLATE = "This is a sound of {}."
TASKS = ("zero-shot-audio-classification", "audio-embedding", "text-embedding", "text-to-audio-ranking", "caption")
# The `generate` options a caption request may set: their types and, for numbers, the range allowed.
CAPTION_OPTIONS = {"num_beams": (int, 1, 10), "max_length": (int, 2, 100), "min_length": (int, 0, 100),
                   "do_sample": (bool, None, None), "top_p": (float, 0.0, 1.0)}  # fmt: skip


class EndpointHandler:
    def __init__(self, path: str = ""):
        if path not in sys.path:  # the toolkit adds it; a direct call may not have
            sys.path.insert(0, path)
        from audio_io import HOP_SECONDS, WINDOW_SECONDS  # shipped beside this file

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModel.from_pretrained(path, trust_remote_code=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        self.sampling_rate = self.processor.feature_extractor.sampling_rate
        self.window = round(WINDOW_SECONDS * self.sampling_rate)
        self.hop = round(HOP_SECONDS * self.sampling_rate)

    @torch.no_grad()
    def __call__(self, data: dict):
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('The request needs "inputs" (audio bytes, base64 audio, or {"text": [...]}).')
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f'"parameters" must be a JSON object, got {type(parameters).__name__}.')
        if data["inputs"] in (b"", "", None, {}, []):
            raise ValueError('"inputs" is empty: send audio bytes, base64 audio, or {"text": [...]}.')
        audios, texts = self._split_inputs(data["inputs"])
        task = parameters.get("task") or self._default_task(audios, texts, parameters)
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")

        if task == "text-embedding":
            return {"text_embeds": self._text_embeds(self._need_texts(texts, task)).tolist()}
        waveforms = [self._decode(audio, i, len(audios)) for i, audio in enumerate(self._need_audio(audios, task))]
        if task == "audio-embedding":
            embedded = [self._audio_embeds(waveform) for waveform in waveforms]
            results = [
                {"audio_embeds": embeds.tolist(), "window_starts": [s / self.sampling_rate for s in starts],
                 "duration": len(waveform) / self.sampling_rate}
                for (embeds, starts), waveform in zip(embedded, waveforms)
            ]  # fmt: skip
            return results[0] if len(results) == 1 else results
        if task == "zero-shot-audio-classification":
            labels = self._labels(parameters)
            results = [self._classify(waveform, labels) for waveform in waveforms]
            return results[0] if len(results) == 1 else results
        if task == "caption":
            options = self._caption_options(parameters)
            results = [self._caption(waveform, options) for waveform in waveforms]
            return results[0] if len(results) == 1 else results
        return self._rank(self._need_texts(texts, task), waveforms, parameters.get("top_k"))

    # --- requests ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _split_inputs(inputs) -> tuple[list, list[str]]:
        if isinstance(inputs, dict):
            unknown = set(inputs) - {"audio", "text"}
            if unknown:
                raise ValueError(f'"inputs" may hold "audio" and "text"; unknown key(s): {", ".join(sorted(unknown))}.')
            audios, texts = inputs.get("audio", []), inputs.get("text", [])
            audios = [audios] if isinstance(audios, (str, bytes, bytearray)) else list(audios)
            texts = [texts] if isinstance(texts, str) else list(texts)
            if not all(isinstance(text, str) for text in texts):
                raise ValueError('"inputs.text" must be a string or a list of strings.')
            return audios, texts
        if isinstance(inputs, (str, bytes, bytearray)):
            return [inputs], []
        raise ValueError(f'"inputs" must be audio (bytes or base64) or an object; got {type(inputs).__name__}.')

    @staticmethod
    def _default_task(audios, texts, parameters) -> str:
        if texts and audios:
            return "text-to-audio-ranking"
        if texts:
            return "text-embedding"
        # Audio alone (e.g. a raw `audio/*` body, which carries no parameters): its embeddings, the `feature-extraction`
        # the model card declares.
        return "audio-embedding" if parameters.get("candidate_labels") is None else "zero-shot-audio-classification"

    @staticmethod
    def _need_texts(texts, task):
        if not texts or any(not text.strip() for text in texts):
            raise ValueError(f'Task {task} needs non-empty texts in "inputs.text".')
        if any(len(text) > MAX_TEXT_CHARACTERS for text in texts):
            raise ValueError(f'"inputs.text": a text is longer than the endpoint\'s limit of {MAX_TEXT_CHARACTERS} characters.')
        return texts

    @staticmethod
    def _need_audio(audios, task):
        if not audios:
            raise ValueError(f"Task {task} needs audio in \"inputs\" (bytes, base64, or inputs.audio).")
        return audios

    @staticmethod
    def _labels(parameters) -> list[str]:
        labels = parameters.get("candidate_labels")
        if isinstance(labels, str):
            labels = labels.split(",")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise ValueError("parameters.candidate_labels must be a list of strings or a comma-separated string.")
        labels = [label.strip() for label in labels if label.strip()]
        if not labels:
            raise ValueError("parameters.candidate_labels is empty: give at least one label.")
        if len(labels) > MAX_LABELS or any(len(label) > MAX_TEXT_CHARACTERS for label in labels):
            raise ValueError(f"parameters.candidate_labels: at most {MAX_LABELS} labels of {MAX_TEXT_CHARACTERS} "
                             f"characters each; got {len(labels)}, the longest {max(map(len, labels))}.")  # fmt: skip
        return labels

    @staticmethod
    def _caption_options(parameters) -> dict:
        options = {name: parameters[name] for name in CAPTION_OPTIONS if name in parameters}
        for name, value in options.items():
            kind, low, high = CAPTION_OPTIONS[name]
            # bool is an int to Python; an int is a fine float
            if not (type(value) is kind or (kind is float and type(value) is int)):
                raise ValueError(f"parameters.{name} must be {kind.__name__}, got {value!r}.")
            if low is not None and not low <= value <= high:
                raise ValueError(f"parameters.{name} must be {low} to {high}, got {value!r}.")
        if options.get("min_length", 0) > options.get("max_length", 30):
            raise ValueError(f"parameters.min_length ({options['min_length']}) exceeds max_length.")
        return options

    def _decode(self, audio, index: int, count: int):
        from audio_io import AudioLoadError, load_audio

        name = "audio" if count == 1 else f"audio {index}"
        if isinstance(audio, str):
            text = audio.split(",", 1)[1] if audio.startswith("data:") else audio
            try:
                audio = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as error:
                raise ValueError(f"{name}: not valid base64 ({error}).") from error
        if not isinstance(audio, (bytes, bytearray)):
            raise ValueError(f"{name}: expected bytes or base64 text, got {type(audio).__name__}.")
        if not audio:
            raise ValueError(f"{name}: empty (0 bytes).")
        try:
            # Decode a little past the limit: enough to tell an over-long clip without decoding all of it.
            waveform = load_audio(data=bytes(audio), sampling_rate=self.sampling_rate, max_seconds=MAX_AUDIO_SECONDS + 1)
        except AudioLoadError as error:
            raise ValueError(f"{name}: not audio in a readable format (wav, flac, ogg, mp3): {error.reason}") from error
        if len(waveform) > MAX_AUDIO_SECONDS * self.sampling_rate:
            raise ValueError(f"{name}: longer than the endpoint's limit of {MAX_AUDIO_SECONDS} s.")
        return waveform

    # --- the model ---------------------------------------------------------------------------------------------------

    def _text_embeds(self, texts: list[str], as_pipeline: bool = False) -> torch.Tensor:
        if as_pipeline:  # the pipeline's own tokenization, for equal scores
            tokens = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
        else:  # as search reads a query: cut at the model's evaluation length
            tokens = self.processor(text=texts, max_length=self.model.config.eval_max_text_length, return_tensors="pt")
        tokens = tokens.to(self.device)
        return self.model.get_text_features(**tokens).text_embeds.float().cpu()

    def _audio_embeds(self, waveform) -> tuple[torch.Tensor, list[int]]:
        """The clip's windows' audio embeddings `(windows, queries, dim)` and their first samples."""
        from audio_io import window_starts

        starts = window_starts(len(waveform), self.window, self.hop)
        windows = [waveform[start : start + self.window] for start in starts]
        features = self.processor.feature_extractor(windows, sampling_rate=self.sampling_rate, return_tensors="pt")
        audio = self.model.get_audio_features(**features.to(self.device))
        return audio.audio_embeds.float().cpu(), starts

    def _classify(self, waveform, labels: list[str]) -> list[dict]:
        audio_embeds, _ = self._audio_embeds(waveform)
        text_embeds = self._text_embeds([HYPOTHESIS_TEMPLATE.format(label) for label in labels], as_pipeline=True)
        scores = self.model.zero_shot_logits(audio_embeds, text_embeds).softmax(-1).tolist()
        return sorted(({"label": label, "score": score} for label, score in zip(labels, scores)),
                      key=lambda result: -result["score"])  # fmt: skip

    def _caption(self, waveform, options: dict) -> list[dict]:
        from audio_io import caption_spans

        spans = caption_spans(len(waveform), self.sampling_rate)
        features = self.processor.feature_extractor(
            [waveform[first:end] for first, end in spans], sampling_rate=self.sampling_rate, return_tensors="pt"
        )
        ids = self.model.generate(**features.to(self.device), **options)
        captions = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [{"start_seconds": first / self.sampling_rate, "caption": caption.strip()}
                for (first, _), caption in zip(spans, captions)]  # fmt: skip

    def _rank(self, texts: list[str], waveforms, top_k=None) -> list[list[dict]]:
        text_embeds = self._text_embeds(texts)
        best, where = [], []
        for waveform in waveforms:
            audio_embeds, starts = self._audio_embeds(waveform)
            scores = self.model.score(audio_embeds, text_embeds)  # (windows, texts)
            value, window = scores.max(0)
            best.append(value)
            where.append([starts[i] / self.sampling_rate for i in window.tolist()])
        scores = torch.stack(best, 1)  # (texts, audios)
        k = len(waveforms) if top_k is None else max(1, min(int(top_k), len(waveforms)))
        values, order = scores.topk(k, dim=1)
        return [
            [{"audio": a, "score": s, "start_seconds": where[a][t]} for a, s in zip(order[t].tolist(), values[t].tolist())]
            for t in range(len(texts))
        ]
