# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Audio captioning with the Q-Former's caption head: captions of clips (from BEATs tokens or waveforms), and how well
they describe them (BLEU-4 against reference captions; on the synthetic set, the share that names each attribute right).
"""

from collections import Counter

import numpy as np
import torch

from audio_io import AudioLoadError, caption_spans, load_audio
from audio_qformer.retrieval import pad_tokens


@torch.no_grad()
def caption_token_arrays(model, processor, arrays: list, batch_size: int = 16, **generate_kwargs) -> list[str]:
    """Captions of clips given as BEATs token arrays `(tokens_i, hidden)` (e.g. a feature cache's), in batches."""
    device = next(model.parameters()).device
    captions = []
    for start in range(0, len(arrays), batch_size):
        states, mask = pad_tokens(arrays[start : start + batch_size])
        ids = model.generate(audio_hidden_states=states.to(device), audio_attention_mask=mask.to(device),
                             **generate_kwargs)  # fmt: skip
        captions += processor.batch_decode(ids, skip_special_tokens=True)
    return [caption.strip() for caption in captions]


@torch.no_grad()
def caption_waveforms(model, processor, waveforms: list[np.ndarray], batch_size: int = 8, **generate_kwargs) -> list[str]:
    """Captions of 16 kHz mono waveforms (each read whole: cut long recordings into windows first)."""
    device = next(model.parameters()).device
    rate = processor.feature_extractor.sampling_rate
    captions = []
    for start in range(0, len(waveforms), batch_size):
        inputs = processor(audio=waveforms[start : start + batch_size], sampling_rate=rate, return_tensors="pt")
        ids = model.generate(input_features=inputs["input_features"].to(device),
                             feature_attention_mask=inputs["feature_attention_mask"].to(device), **generate_kwargs)  # fmt: skip
        captions += processor.batch_decode(ids, skip_special_tokens=True)
    return [caption.strip() for caption in captions]


def caption_files(
    model, processor, paths: list[str], batch_size: int = 8, show_progress: bool = False, **generate_kwargs
) -> list[dict]:
    """
    Captions of audio files: `{"file", "captions": [{"start_seconds", "caption"}]}` each, one caption for a clip up to
    `audio_io.CAPTION_WHOLE_SECONDS` long, one per window for longer ones; `{"file", "error"}` for an unreadable file.
    Files are read `batch_size` at a time.
    """
    from tqdm.auto import tqdm

    rate = processor.feature_extractor.sampling_rate
    results = []
    for first_file in tqdm(range(0, len(paths), batch_size), desc="Captioning", unit="batch", disable=not show_progress):
        parts = []  # (result, start seconds, samples)
        for path in paths[first_file : first_file + batch_size]:
            try:
                waveform = load_audio(path, sampling_rate=rate)
            except AudioLoadError as error:
                results.append({"file": path, "error": error.reason})
                continue
            results.append({"file": path, "captions": []})
            parts += [(results[-1], start, samples) for start, samples in caption_parts(waveform, rate)]
        captions = caption_waveforms(model, processor, [samples for _, _, samples in parts], batch_size, **generate_kwargs)
        for (result, start, _), caption in zip(parts, captions):
            result["captions"].append({"start_seconds": start, "caption": caption})
    return results


def caption_parts(waveform: np.ndarray, sampling_rate: int) -> list[tuple[float, np.ndarray]]:
    """`(start seconds, samples)` of what to caption in a clip: all of it up to 30 s, else each of its windows."""
    return [(round(first / sampling_rate, 2), waveform[first:end])
            for first, end in caption_spans(len(waveform), sampling_rate)]  # fmt: skip


def bleu4(captions: list[str], references: list[list[str]]) -> float:
    """
    Corpus BLEU-4 (0-1) of `captions` against each clip's reference captions: sacreBLEU's, with its default `13a`
    tokenisation and lowercased text, offline (the COCO caption toolkit that DCASE reports needs Java). Clips with
    fewer references repeat their first one, which changes no n-gram count.
    """
    import sacrebleu

    if not captions or len(captions) != len(references) or any(not refs for refs in references):
        raise ValueError("bleu4 needs one list of at least one reference per caption.")
    depth = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(depth)]
    return sacrebleu.corpus_bleu(captions, streams, lowercase=True).score / 100


def _applies(name: str, attributes: dict) -> bool:
    return name != "motion" or attributes["sound"] != "noise"  # noise has no pitch to move


def attribute_accuracy(captions: list[str], attributes: list[dict]) -> dict[str, float]:
    """
    On the synthetic set: for each attribute, the share of captions that name its right value and no other
    (`synthetic_sounds.named_attributes`); `motion` over tones and buzzes only; `all` when every one is right.
    """
    from audio_qformer.synthetic_sounds import named_attributes  # the demo's data generator: a repository module, not installed

    if len(captions) != len(attributes) or not captions:
        raise ValueError("attribute_accuracy needs one attribute set per caption.")
    right, counted, all_right = Counter(), Counter(), 0
    for caption, truth in zip(captions, attributes):
        named = named_attributes(caption)
        correct = [named[name] == value for name, value in truth.items() if _applies(name, truth)]
        for name, value in truth.items():
            if _applies(name, truth):
                counted[name] += 1
                right[name] += named[name] == value
        all_right += all(correct)
    return {**{name: right[name] / counted[name] for name in counted}, "all": all_right / len(captions)}


def shuffled_chance(attributes: list[dict]) -> dict[str, float]:
    """
    The expected `attribute_accuracy` of captions that are right for a clip of the set drawn at random (a fluent model
    that ignores the audio): per attribute, the sum of the squared shares of its values.
    """
    chance, joint = {}, Counter(tuple(sorted(a.items())) for a in attributes)
    for name in attributes[0]:
        values = Counter(a[name] for a in attributes if _applies(name, a))
        total = sum(values.values())
        chance[name] = sum((count / total) ** 2 for count in values.values())
    chance["all"] = sum((count / len(attributes)) ** 2 for count in joint.values())
    return chance


__all__ = [
    "attribute_accuracy", "bleu4", "caption_files", "caption_parts", "caption_token_arrays", "caption_waveforms",
    "shuffled_chance",
]  # fmt: skip
