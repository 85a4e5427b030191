# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""
The model's pages on the Hub: its model card, and the Gradio Space that serves it.

    python -m audio_qformer.hub_pages card MODEL_DIR --model_id you/audio-qformer            # (re)write MODEL_DIR/README.md
    python -m audio_qformer.hub_pages space --model_id you/audio-qformer --space_dir space [--sounds DIR --model MODEL_DIR]
                              [--push you/audio-qformer-search]

The Hub's hosted widget does not run models that need `trust_remote_code`, and `zero-shot-audio-classification` is
not one of its pipeline types, so the card declares `feature-extraction` (as CLAP models do) with no widget, and points
to what does work from a model page: the Auto classes, the transformers pipeline, an Inference Endpoint (`handler.py`,
saved with every model) and the Space, which the Hub links from the model page through the Space's `models:` list.

A Space folder holds `app.py`, the repository modules it imports, `requirements.txt`, `app_defaults.json` (the model
to load) and, with `--sounds`, `library/`: the sounds under `library/sounds/` and their embeddings, computed here, so the
Space opens its library without embedding anything.
"""

import argparse
import ast
import json
import os
import shutil
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
MODEL_TAGS = ["custom_code", "audio", "zero-shot-audio-classification", "text-to-audio-retrieval", "audio-captioning", "beats",
              "q-former"]
# What a Space installs besides the gradio its sdk brings.
SPACE_REQUIREMENTS = [
    "torch>=2.6",
    "transformers>=5.24,<6",
    "huggingface_hub>=1.31",
    "safetensors>=0.8",
    "numpy>=1.26",
    "soundfile>=0.12",
    "soxr>=0.3",
    "tqdm",
]
SPACE_LIBRARY = "library"  # the library folder inside a Space, its sounds under `library/sounds/`
APP_DEFAULTS = "app_defaults.json"
GRADIO_MINIMUM = "6.17.0"  # bundles its fonts: the app loads nothing from a CDN


# --- the model card --------------------------------------------------------------------------------------------------


def model_card(model_id: str, results: dict | None = None, training: dict | None = None, space_id: str | None = None):
    """
    The model card of a saved model (`huggingface_hub.ModelCard`).

    Args:
        model_id: the Hub id the card talks about.
        results: `{set name: {"mAP@10": 0.26, "R@1": 0.16, ...}}` (fractions), shown as a table and as `model-index`.
        training: what `train.py` ran: `preset`, `sources` (data names), `steps`, `learning_rate`, `total_batch_size`.
        space_id: the Space that serves the model, if one was made.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = results or {}
    eval_results = [
        EvalResult(task_type="text-to-audio-retrieval", task_name="Text-to-audio retrieval", dataset_type=name,
                   dataset_name=name, metric_type=metric, metric_name=metric, metric_value=round(100 * value, 2))
        for name, metrics in results.items() for metric, value in metrics.items() if metric.startswith(("R@", "mAP@"))
    ]  # fmt: skip
    data = ModelCardData(
        library_name="transformers", pipeline_tag="feature-extraction", license="apache-2.0", tags=MODEL_TAGS,
        model_name=model_id, eval_results=eval_results or None,
    )  # fmt: skip
    if results:
        rows = "\n".join(
            f"| {name} | {100 * m['mAP@10']:.2f} | {100 * m['R@1']:.2f} | {100 * m['R@5']:.2f} | {100 * m['R@10']:.2f} |"
            for name, m in results.items()
        )
        metrics = f"| set | mAP@10 | R@1 | R@5 | R@10 |\n|---|---|---|---|---|\n{rows}"
    else:
        metrics = "No evaluation was run for this checkpoint."
    if training:
        recipe = (
            f"Trained with `train.py --preset {training['preset']}` on {', '.join(training['sources']) or 'no named data'}: "
            f"{training['steps']} optimizer steps, learning rate {training['learning_rate']}, "
            f"{training['total_batch_size']} pairs per step, on cached BEATs tokens (BEATs frozen)."
        )
    else:
        recipe = "How this checkpoint was trained is not recorded."
    space = (
        f"The Space [{space_id}](https://huggingface.co/spaces/{space_id}) searches a sound library with this model "
        "in the browser (Search, Similar, Classify), and its named API endpoints serve `gradio_client`."
        if space_id
        else "`python -m audio_qformer.hub_pages space --model_id ... --push SPACE_ID` in the model's repository builds a Space for it."
    )
    content = f"""---
{data.to_yaml()}
---

# {model_id}

Text-to-audio retrieval: type "a dog barks while cars pass by" and rank the clips of a sound library. The system of
"Qformer based text audio retrieval" (DCASE 2023 task 6B): a frozen BEATs audio encoder (16 kHz, 8 tokens of 768 per
160 ms) read by a BLIP-2 Q-Former with 32 query tokens, trained with audio-text contrastive (ATC), matching (ATM) and
caption-generation (ATG) losses. A clip becomes 32 vectors of 256, a text one vector; a clip's score for a text is the
cosine of its best query vector, and the matching head can re-rank the top 16.

## How to use

With nothing but transformers (the model's code is in this repository: `trust_remote_code=True` runs it, so read it
before you trust it):

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{model_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{model_id}", trust_remote_code=True)
audio = processor(audio=[waveform_16khz], sampling_rate=16000, return_tensors="pt")
text = processor(text=["a dog barks while cars pass by"], return_tensors="pt")
audio_embeds = model.get_audio_features(**audio).audio_embeds   # (1, 32, 256)
text_embeds = model.get_text_features(**text).text_embeds       # (1, 256)
model.score(audio_embeds, text_embeds)                          # cosine of the best query, (1, 1)
```

Zero-shot classification with the transformers pipeline (the Hub's widget cannot run custom code, so it is not shown
on this page):

```python
from transformers import pipeline

classifier = pipeline("zero-shot-audio-classification", model="{model_id}", trust_remote_code=True)
classifier(waveform_16khz, candidate_labels=["a dog barking", "rain", "a car engine"])
```

Captions, from the caption head trained with ATG (beam search with 3 beams by default, as LAVIS; any `generate` option):

```python
ids = model.generate(**audio)
processor.batch_decode(ids, skip_special_tokens=True)           # ["a dog barks while cars pass by"]
```

### Inference Endpoints

This repository holds `handler.py`, so an Inference Endpoint deployed from it serves the model (its
`requirements.txt` adds the audio decoders). Send audio (wav, flac, ogg or mp3; any rate, any channels, up to 600 s)
as the raw body for its embeddings, or as base64 in JSON with labels to classify it:

```bash
curl $ENDPOINT_URL -H "Authorization: Bearer $HF_TOKEN" -H "Content-Type: audio/wav" --data-binary @clip.wav
# {{"audio_embeds": [[[...32 x 256...]]], "window_starts": [0.0], "duration": 4.2}}
curl $ENDPOINT_URL -H "Authorization: Bearer $HF_TOKEN" -H "Content-Type: application/json" \
    -d '{{"inputs": "'$(base64 -w0 clip.wav)'", "parameters": {{"candidate_labels": "a dog barking, rain"}}}}'
# [{{"label": "a dog barking", "score": 0.91}}, {{"label": "rain", "score": 0.09}}]
```

`parameters.task` chooses the work: `zero-shot-audio-classification` (the default with labels),
`audio-embedding` (the default without; `{{"audio_embeds": windows x 32 x 256, "window_starts": [...], "duration": s}}`), `text-embedding`
(`{{"inputs": {{"text": ["..."]}}}}` → `{{"text_embeds": [...]}}`) and `text-to-audio-ranking` (`{{"inputs": {{"text":
[...], "audio": [base64, ...]}}}}` → per text, the clips best first) and `caption` (→ `[{{"start_seconds",
"caption"}}]`, one per 10.24 s window beyond 30 s). Bad input gets an error that says what is wrong.

### The Space

{space}

## Training

{recipe}

The paper's recipe: stage 1 on AudioCaps + Clotho development (512-token crops of cached BEATs tokens, Adam 1e-4,
1000 warm-up steps, cosine with an 1800-step period, 256 pairs per step over 4 GPUs), stage 2 on Clotho at 1e-5.

## Results

{metrics}

mAP@10 and R@k are text-to-audio retrieval by the contrastive score, one relevant clip per caption (DCASE task 6B). The
paper reports mAP@10 26.47 and R@1 16.02 on Clotho evaluation.

## Limits

- English captions, short everyday sounds: the training data (AudioCaps, Clotho) is what it knows; music, speech
  content and rare sound classes are weak.
- Long files are embedded in 10.24 s windows 5.12 s apart and score as their best window: a query that needs two
  distant events of one file is not matched as a whole.
- Zero-shot classification scores labels against each other (softmax): the scores say which label fits best, not
  whether any does.
"""
    return ModelCard(content)


def write_model_card(folder: str, model_id: str, results=None, training=None, space_id=None) -> str:
    """Write `folder/README.md`; returns its path."""
    path = os.path.join(folder, "README.md")
    model_card(model_id, results, training, space_id).save(path)
    return path


def add_to_model_card(folder: str, heading: str, text: str) -> str:
    """Add the section `## heading` (or replace it) at the end of `folder/README.md`; returns its path."""
    from huggingface_hub import ModelCard

    path = os.path.join(folder, "README.md")
    card = ModelCard.load(path)
    marker = f"\n## {heading}\n"
    body = card.text.split(marker)[0].rstrip("\n")
    card.text = f"{body}\n{marker}\n{text}\n"
    card.save(path)
    return path


# --- the Space -------------------------------------------------------------------------------------------------------


def local_imports(entry: str, root: str = ROOT) -> list[str]:
    """
    The repository's files that the module `entry` imports, directly or not, itself included, as paths relative to
    `root`, sorted: flat modules (`audio_io.py`) and the package's (`audio_qformer/library.py`, with its `__init__.py`).
    """
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        path = name.replace(".", "/") + ".py"
        if path in seen or not os.path.isfile(os.path.join(root, path)):
            continue
        seen.add(path)
        if "." in name:
            todo.append(name.rsplit(".", 1)[0] + ".__init__")
        with open(os.path.join(root, path), encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return sorted(seen)


def gradio_version() -> str:
    """The gradio the Space runs: the one installed here (where the app was tested), else the oldest that fits."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:
        return GRADIO_MINIMUM


def write_space_folder(space_dir: str, model_id: str, sounds: str | None = None, model: str | None = None,
                       title: str = "audio-qformer sound search") -> list[str]:  # fmt: skip
    """
    Write a Gradio Space for `model_id` into `space_dir`: `app.py` and the modules it imports, `requirements.txt`,
    `app_defaults.json` and the README whose front matter lists the model. With `sounds`, the folder's audio is copied
    to `library/sounds/` and embedded into `library/` with `model` (a local copy of `model_id`'s weights, default
    `model_id`). Returns the written files, relative to `space_dir`, sorted.
    """
    from huggingface_hub import SpaceCard, SpaceCardData

    os.makedirs(space_dir, exist_ok=True)
    for name in local_imports("app"):
        os.makedirs(os.path.dirname(os.path.join(space_dir, name)), exist_ok=True)
        shutil.copyfile(os.path.join(ROOT, name), os.path.join(space_dir, name))
    with open(os.path.join(space_dir, "requirements.txt"), "w") as handle:
        handle.write("\n".join(SPACE_REQUIREMENTS) + "\n")
    with open(os.path.join(space_dir, APP_DEFAULTS), "w") as handle:
        json.dump({"model": model_id, "library": SPACE_LIBRARY}, handle, indent=1)
    data = SpaceCardData(title=title, sdk="gradio", sdk_version=gradio_version(), app_file="app.py",
                         models=[model_id], license="apache-2.0", tags=["audio", "text-to-audio-retrieval"])  # fmt: skip
    card = f"""---
{data.to_yaml()}
---

# {title}

Search a sound library by text with [{model_id}](https://huggingface.co/{model_id}): type what you hear, get the
best-matching files ranked, with a player and the model's caption each. Also: find files that sound like an uploaded
clip (Similar), caption a clip (Describe), and rank labels for a clip (Classify). The named API endpoints `/search`,
`/similar`, `/describe` and `/classify` serve `gradio_client`.

The library is the folder `{SPACE_LIBRARY}/`: its sounds under `{SPACE_LIBRARY}/sounds/` and their stored embeddings.
Add sounds by indexing them where you have the model and pushing the folder again (`python -m audio_qformer.hub_pages space ...
--sounds DIR`); sounds committed to `{SPACE_LIBRARY}/sounds/` without embeddings are embedded when the Space starts
(a progress bar in its logs), and again after each restart until their embeddings are committed.
"""
    SpaceCard(card).save(os.path.join(space_dir, "README.md"))
    if sounds:
        from audio_qformer.library import BROWSING_LIBRARY, AudioLibrary, load_model

        library_dir = os.path.join(space_dir, SPACE_LIBRARY)
        target = os.path.join(library_dir, "sounds")
        shutil.copytree(sounds, target, dirs_exist_ok=True)
        # The Space's library records the Hub id, though its weights come from a local copy here.
        new = not os.path.exists(os.path.join(library_dir, "library.json"))
        library = AudioLibrary(library_dir, *load_model(model or model_id), model_id, create=True,
                               **(BROWSING_LIBRARY if new else {}))  # fmt: skip
        library.index(target)
    written = []
    for folder, _, names in os.walk(space_dir):
        written += [os.path.relpath(os.path.join(folder, name), space_dir) for name in names]
    return sorted(written)


def push_space(space_dir: str, space_id: str) -> str:
    """Create (or update) the Gradio Space `space_id` from `space_dir`; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = api.create_repo(space_id, repo_type="space", space_sdk="gradio", exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=space_dir, commit_message="audio-qformer Space",
                      ignore_patterns=["**/__pycache__/**", "**/*.partial"])  # fmt: skip
    return f"https://huggingface.co/spaces/{repo_id}"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the model card or the Space of a saved model.")
    commands = parser.add_subparsers(dest="command", required=True)
    card = commands.add_parser("card", help="(Re)write MODEL_DIR/README.md.")
    card.add_argument("model_dir")
    card.add_argument("--model_id", help="Hub id the card names (default: the folder's name).")
    card.add_argument("--space_id", help="The Space that serves the model.")
    space = commands.add_parser("space", help="Write a Gradio Space folder for a model, and optionally push it.")
    space.add_argument("--model_id", required=True, help="The model's Hub id, which the Space loads.")
    space.add_argument("--space_dir", required=True)
    space.add_argument("--sounds", help="A folder of audio to embed into the Space's library.")
    space.add_argument("--model", help="Local folder of the same model, to embed --sounds with (default: --model_id).")
    space.add_argument("--push", metavar="SPACE_ID", help="Create or update this Space from the folder.")
    args = parser.parse_args(argv)
    if args.command == "card":
        results_path = os.path.join(args.model_dir, "all_results.json")
        results = json.load(open(results_path)).get("best") or {} if os.path.exists(results_path) else {}
        model_id = args.model_id or os.path.basename(os.path.normpath(args.model_dir))
        print(write_model_card(args.model_dir, model_id, results, space_id=args.space_id))
        return 0
    files = write_space_folder(args.space_dir, args.model_id, args.sounds, args.model)
    print(f"{args.space_dir}: {len(files)} files")
    if args.push:
        print(push_space(args.space_dir, args.push))
    return 0


if __name__ == "__main__":
    sys.exit(main())
