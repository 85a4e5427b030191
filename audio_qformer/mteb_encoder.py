# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""
The model as an mteb encoder, so that mteb's own evaluator (the MTEB leaderboard's audio benchmarks, MAEB) runs it.

    from audio_qformer.mteb_encoder import load_encoder
    encoder = load_encoder("you/audio-qformer")          # a saved folder or Hub id, through the Auto classes
    mteb.evaluate(encoder, mteb.get_tasks(tasks=["ClothoT2ARetrieval.v2", "ESC50_Zeroshot"]))

or `audio-qformer mteb --model M --tasks ...`, which writes the result files in the layout of mteb's results
repository. A text becomes one vector; a clip its 32 query vectors per 10.24 s window (windows 5.12 s apart, as a
sound library cuts it), so its embedding is `(vectors, 256)`; clips of a batch are stacked to the longest, the
shorter ones padded by repeating one of their own vectors (never zeros, which would score 0 rather than be ignored).
`similarity` is the model's own score, the best cosine over a clip's vectors (`AudioQFormerModel.score`), in both
directions and for zero-shot classification: mteb's built-in `MaxSim` is ColBERT's (a sum over the query's vectors),
equal to it for text -> audio only. Audio reaches `encode` decoded (`{"array", "sampling_rate"}`, the dataset's own
rate) and is resampled here with `audio_io.resampled` (soxr), so neither torchaudio nor mteb's audio collator is
needed. mteb's Clotho tasks are not DCASE's protocol (they re-split the joined captions), so their numbers are not
the report's Table 1 (`evaluate_retrieval.py --clotho_root` is).
"""

import json
import os

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta

from audio_io import HOP_SECONDS, WINDOW_SECONDS, resampled
from audio_qformer.embedding import LibraryEncoder
from audio_qformer.retrieval import embed_texts


# The mteb tasks built on the datasets train.py can train on: a model trained on them is not zero-shot there.
TASKS_OF_SOURCE = {
    "Clotho": {"ClothoT2ARetrieval", "ClothoA2TRetrieval", "ClothoT2ARetrieval.v2", "ClothoA2TRetrieval.v2"},
    "AudioCaps": {"AudioCapsT2ARetrieval", "AudioCapsA2TRetrieval"},
}


class AudioQFormerEncoder(AbsEncoder):
    """An `AudioQFormerModel` and its processor (loaded with `trust_remote_code=True`) behind mteb's encoder API."""

    def __init__(self, model, processor, batch_size: int = 8):
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size
        # Clips are cut and embedded as a sound library does it (its windows, its BEATs copy on the CPU).
        self.audio = LibraryEncoder(self.model, processor, {"window_seconds": WINDOW_SECONDS, "hop_seconds": HOP_SECONDS})

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        features = inputs.dataset.features
        if "audio" in features:  # a batch of clips (mteb drops the columns of the other modality)
            clips = [self._clip_vectors(audio) for batch in inputs for audio in batch["audio"]]
            return stack_vectors(clips)
        if "text" in features:  # as the project's evaluation reads a query (`retrieval.embed_texts`)
            texts = [text for batch in inputs for text in batch["text"]]
            return embed_texts(self.model, self.processor, texts, batch_size=64).numpy()
        raise ValueError(f"{task_metadata.name}: a batch with neither text nor audio ({list(features)}).")

    def _clip_vectors(self, audio: dict) -> np.ndarray:
        """One clip's query vectors over all its windows, `(windows x queries, dim)`."""
        waveform = resampled(audio["array"], int(audio["sampling_rate"]))
        embeds, _ = self.audio.embed_waveforms(self.audio.windows(waveform)[1], self.batch_size)
        return embeds.flatten(0, 1).numpy()

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """
        `[n1, n2]` scores, the model's score of each pair: texts `(n, dim)` against clips `(n, vectors, dim)` in
        either order, or clips against clips (their best pair of vectors), or texts against texts (cosine).
        """
        a, b = _as_vectors(embeddings1), _as_vectors(embeddings2)
        # (n1, v1, dim) x (n2, v2, dim) -> the best pair of vectors of each pair of items
        return torch.einsum("avd,bwd->abvw", a, b).flatten(2).amax(-1)

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        a, b = _as_vectors(embeddings1), _as_vectors(embeddings2)
        return torch.einsum("nvd,nwd->nvw", a, b).flatten(1).amax(-1)


def _as_vectors(embeddings) -> torch.Tensor:
    """Items as `(n, vectors, dim)` float32: a text is one vector."""
    tensor = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    return tensor[:, None, :] if tensor.dim() == 2 else tensor


def stack_vectors(clips: list[np.ndarray]) -> np.ndarray:
    """Clips of different numbers of vectors as one `(clips, most vectors, dim)` array, padded with a real vector."""
    longest = max(len(vectors) for vectors in clips)
    return np.stack([np.concatenate([v, np.repeat(v[:1], longest - len(v), axis=0)]) for v in clips])


def training_datasets(model_dir: str | None) -> set[str]:
    """The mteb tasks a saved model was trained on, from the `sources` its `all_results.json` names (train.py's)."""
    path = os.path.join(model_dir, "all_results.json") if model_dir and os.path.isdir(model_dir) else None
    if path is None or not os.path.isfile(path):
        return set()
    with open(path) as handle:
        sources = json.load(handle).get("sources") or []
    # A Hub copy counts as its dataset (`CLAPv2/Clotho` is Clotho).
    return {task for source in sources for name, tasks in TASKS_OF_SOURCE.items() if name.lower() in source.lower()
            for task in tasks}  # fmt: skip


def load_encoder(name_or_path: str, revision: str | None = None, device: str | None = None, batch_size: int = 8,
                 training_data: set[str] | None = None, **kwargs) -> AudioQFormerEncoder:  # fmt: skip
    """
    The encoder of a saved model folder or Hub id, loaded through transformers' Auto classes, with its `ModelMeta`
    (`mteb_model_meta`): `training_data` names the mteb tasks it was trained on (default: from the folder's
    `all_results.json`).
    """
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(name_or_path, revision=revision, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(name_or_path, revision=revision, trust_remote_code=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = AudioQFormerEncoder(model.to(device), processor, batch_size)
    encoder.mteb_model_meta = model_meta(name_or_path, model, revision, training_data)
    return encoder


def model_meta(name_or_path: str, model, revision: str | None = None, training_data: set[str] | None = None) -> ModelMeta:
    """The `ModelMeta` mteb records with the results. A local folder is named `local/<folder name>`."""
    local = os.path.isdir(name_or_path)
    name = f"local/{os.path.basename(os.path.normpath(name_or_path))}" if local else name_or_path
    return ModelMeta(
        loader=load_encoder, name=name, revision=revision or ("local" if local else "main"), release_date=None,
        languages=["eng-Latn"], n_parameters=sum(p.numel() for p in model.parameters()), memory_usage_mb=None,
        max_tokens=float(model.config.eval_max_text_length), embed_dim=model.config.embed_dim, license="apache-2.0",
        open_weights=True, public_training_code=None, public_training_data=None, framework=["PyTorch"],
        similarity_fn_name=None, use_instructions=False, modalities=["audio", "text"], model_type=["late-interaction"],
        training_datasets=training_data if training_data is not None else training_datasets(name_or_path if local else None),
        reference=None if local else f"https://huggingface.co/{name_or_path}",
    )  # fmt: skip


def local_tasks(folder: str, labels: dict[str, str] | None = None, name: str | None = None) -> list:
    """
    mteb tasks over an audiofolder (`metadata.csv`: `file_name` and caption columns), in mteb's own formats: text ->
    audio retrieval (each caption a query, its clip relevant), audio -> text (each clip a query, its captions
    relevant) and, with `labels` (file name -> label text), zero-shot classification among the labels. The audio
    is read at the files' own rate (the encoder resamples it).
    """
    import soundfile
    from datasets import Dataset, DatasetDict
    from mteb.abstasks import AbsTaskZeroShotClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    from audio_qformer.data import load_audiofolder

    rows, _ = load_audiofolder(folder)
    files = list(dict.fromkeys(rows["audio_path"]))
    clip_of = {path: f"a{i}" for i, path in enumerate(files)}

    def audio(path):
        waveform, rate = soundfile.read(path, dtype="float32")
        return {"array": waveform, "sampling_rate": rate}

    clips = Dataset.from_list([{"id": clip_of[path], "audio": audio(path)} for path in files])
    captions = Dataset.from_list([{"id": f"c{i}", "text": caption} for i, caption in enumerate(rows["caption"])])
    caption_clip = [clip_of[path] for path in rows["audio_path"]]
    name = name or os.path.basename(os.path.normpath(folder))

    def meta(task, category, kind, main_score, langs=("eng-Latn",)):
        return TaskMetadata(name=f"{name}{task}", description=f"{task} on {folder}",
                            dataset={"path": f"local/{name}", "revision": "local"}, type=kind, category=category,
                            modalities=["audio", "text"], eval_splits=["test"], eval_langs=list(langs),
                            main_score=main_score)  # fmt: skip

    def retrieval_split(corpus, queries, qrels):
        return {"default": {"test": {"corpus": corpus, "queries": queries, "relevant_docs": qrels, "top_ranked": None}}}

    class TextToAudio(AbsTaskRetrieval):
        metadata = meta("T2A", "t2a", "Any2AnyRetrieval", "map_at_10")

        def load_data(self, **kwargs):
            qrels = {f"c{i}": {clip: 1} for i, clip in enumerate(caption_clip)}
            self.dataset, self.data_loaded = retrieval_split(clips, captions, qrels), True

    class AudioToText(AbsTaskRetrieval):
        metadata = meta("A2T", "a2t", "Any2AnyRetrieval", "hit_rate_at_1")

        def load_data(self, **kwargs):
            qrels = {}
            for i, clip in enumerate(caption_clip):
                qrels.setdefault(clip, {})[f"c{i}"] = 1
            self.dataset, self.data_loaded = retrieval_split(captions, clips, qrels), True

    tasks = [TextToAudio(), AudioToText()]
    if labels:
        candidates = sorted(set(labels.values()))

        class ZeroShot(AbsTaskZeroShotClassification):
            metadata = meta("ZeroShot", "a2t", "AudioZeroshotClassification", "accuracy", ("zxx-Zxxx",))
            input_column_name, label_column_name = "audio", "label"

            def load_data(self, **kwargs):
                labelled = [{"audio": audio(path), "label": candidates.index(labels[os.path.relpath(path, folder)])}
                            for path in files]  # fmt: skip
                self.dataset, self.data_loaded = DatasetDict({"test": Dataset.from_list(labelled)}), True

            def get_candidate_labels(self):
                return candidates

        tasks.append(ZeroShot())
    return tasks


def evaluate(name_or_path: str, tasks: list, output_dir: str, **loading) -> list:
    """mteb's evaluation of the model on `tasks` (names or task objects); result files under `output_dir/results/`."""
    import mteb
    from mteb.cache import ResultCache

    encoder = load_encoder(name_or_path, **loading)
    tasks = mteb.get_tasks(tasks=tasks) if all(isinstance(task, str) for task in tasks) else tasks
    results = mteb.evaluate(encoder, tasks, cache=ResultCache(output_dir), overwrite_strategy="always")
    return results.task_results


__all__ = ["AudioQFormerEncoder", "TASKS_OF_SOURCE", "evaluate", "load_encoder", "local_tasks", "model_meta",
           "stack_vectors", "training_datasets"]
