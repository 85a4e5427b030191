# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""The main job on the embedded default, offline, in one command (`make demo`):

    1. generate the captioned synthetic sound set (train / validation / held-out library);
    2. `accelerate launch train.py --preset demo`: BEATs features into the cache, then the Q-Former (initialised from
       the packaged MiniLM-L6) trained with ATC + ATM + ATG, showing losses and validation metrics;
    3. `evaluate_retrieval.py --captions` on the held-out library: the report's Table 1 layout (ATC, ATC + re-rank 16)
       and chance, then the same model as a captioner (BLEU-4, the attributes its captions name right, against chance);
    4. the saved model reloaded in a fresh process with `AutoModel.from_pretrained(..., trust_remote_code=True)`;
    5. `audio-qformer index --captions` / `search` on the library, the top files printed with their reference captions
       and the model's own.

Nothing is downloaded: BEATs has the iter3+ layout at a small size with random weights (no official checkpoint here),
the Q-Former starts from MiniLM-L6. A rerun reuses the data, the feature cache and the finished training.

    python demo.py [--work_dir outputs/demo] [--max_train_steps N] [--small]
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.abspath(__file__))
QUERIES = [
    "a high pitched beep pulsing rapidly",
    "low rumbling noise getting louder",
    "a buzzing sound sweeping upwards",
    "white noise fading out",
]
# A fresh interpreter, outside the repository, loads the saved model as a Hub user would; its embedding of a clip is
# compared with the one the CLI stored.
RELOAD_CHECK = """
import json, sys, numpy as np, torch
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("{model}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{model}", trust_remote_code=True)
import soundfile
wave, rate = soundfile.read("{clip}", dtype="float32")
with torch.no_grad():
    audio = model.get_audio_features(**processor(audio=wave, sampling_rate=rate, return_tensors="pt"))
print(json.dumps({{"class": type(model).__module__ + "." + type(model).__name__,
                  "embeds": audio.audio_embeds[0].tolist()}}))
"""


def run(command: list[str], title: str, capture: bool = False, cwd: str = ROOT) -> subprocess.CompletedProcess:
    print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=cwd, env=env, text=True, capture_output=capture)
    if result.returncode:
        if capture:
            print(result.stdout[-3000:], result.stderr[-3000:])
        sys.exit(f"demo: step failed ({title}), exit code {result.returncode}")
    return result


def captions_of(directory: str) -> dict[str, str]:
    with open(os.path.join(directory, "metadata.csv"), newline="") as handle:
        return {os.path.join(directory, row["file_name"]): row["caption_1"] for row in csv.DictReader(handle)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/demo", help="Data, cache, model and library go here.")
    parser.add_argument("--max_train_steps", type=int, help="Override the demo preset's training length.")
    parser.add_argument("--small", action="store_true", help="A tiny run for tests: few clips, few steps.")
    args = parser.parse_args(argv)
    python, work = sys.executable, os.path.abspath(args.work_dir)
    data, model_dir, library = (os.path.join(work, name) for name in ("data", "model", "library"))
    started = time.perf_counter()

    sizes = ["--num_train", "24", "--num_validation", "6", "--num_library", "12"] if args.small else []
    run([python, "-m", "audio_qformer.synthetic_sounds", "--output_dir", data, *sizes], "1. Generate the embedded sound set")

    train = [
        python, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        # Accelerate gives each process one CPU thread unless told; one process may use them all.
        "--num_cpu_threads_per_process", str(len(os.sched_getaffinity(0))),
        "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", "--preset", "demo",
        "--train_dir", os.path.join(data, "train"), "--validation_dir", os.path.join(data, "validation"),
        "--feature_cache_dir", os.path.join(work, "cache"), "--output_dir", model_dir,
        "--resume",
    ]  # fmt: skip
    if args.small:
        train += ["--num_qformer_layers", "1", "--num_query_tokens", "4", "--max_train_steps", "4", "--eval_steps", "4",
                  "--checkpointing_steps", "2", "--num_warmup_steps", "1", "--cosine_period_steps", "3"]  # fmt: skip
    elif args.max_train_steps:  # one cosine period over the longer run, not restarts of the preset's period
        from train import PRESETS

        period = args.max_train_steps - PRESETS["demo"]["num_warmup_steps"]
        train += ["--max_train_steps", str(args.max_train_steps), "--cosine_period_steps", str(max(1, period))]
    run(train, "2. Extract BEATs features and train the Q-Former (accelerate launch train.py)")

    table_json = os.path.join(work, "table.json")
    run([python, "evaluate_retrieval.py", "--model", model_dir, "--audiofolder", os.path.join(data, "library"),
         "--feature_cache_dir", os.path.join(work, "cache"), "--output_json", table_json,
         "--relevance_column", "attributes", "--captions"],
        "3. Evaluate on the held-out library (the report's Table 1 layout; then captioning)")  # fmt: skip

    clip = sorted(captions_of(os.path.join(data, "library")))[0]
    check = run([python, "-c", RELOAD_CHECK.format(model=model_dir, clip=clip)],
                "4. Reload the saved model in a fresh process (AutoModel, trust_remote_code=True)", capture=True,
                cwd=work)  # fmt: skip
    reloaded = json.loads(check.stdout.strip().splitlines()[-1])

    library_config = os.path.join(library, "library.json")
    if os.path.exists(library_config) and not json.load(open(library_config)).get("captions"):
        import shutil

        print(f"{library} was indexed before the demo stored captions: indexing it again")
        shutil.rmtree(library)
    run([python, "-m", "audio_qformer.cli", "--library", library, "index", os.path.join(data, "library"), "--model", model_dir,
         "--captions"], "5. Index the library with the CLI (with the model's captions)")  # fmt: skip
    import numpy as np

    from audio_qformer.identity import clip_key

    from audio_qformer.store import ArrayStore

    width = len(np.asarray(reloaded["embeds"]).reshape(-1))
    stored = ArrayStore(library, "embeddings", width).get(clip_key(clip)).astype(np.float32)
    difference = float(np.abs(stored.reshape(-1) - np.asarray(reloaded["embeds"]).reshape(-1)).max())
    print(f"Reloaded as {reloaded['class']}; its embedding of {os.path.basename(clip)} differs from the CLI's stored "
          f"one by at most {difference:.1e} (float16 storage)")  # fmt: skip

    # The contrastive ranking: after 250 demo steps the matching head does not improve on it yet (see the table).
    search = run([python, "-m", "audio_qformer.cli", "--library", library, "search", *QUERIES, "-k", "3", "--json"],
                 "6. Search the library by text (top 3 by the contrastive score)", capture=True)  # fmt: skip
    captions = captions_of(os.path.join(data, "library"))
    for line in search.stdout.strip().splitlines():
        result = json.loads(line)
        print(f"\n  {result['query']!r}")
        for rank, hit in enumerate(result["results"], 1):
            print(f"    {rank}. {os.path.basename(hit['path'])}  cosine {hit['score']:5.3f}  "
                  f"[{captions.get(hit['path'], '?')}]\n         model's caption: {hit['caption']}")  # fmt: skip

    with open(table_json) as handle:
        table = json.load(handle)
    minutes = (time.perf_counter() - started) / 60
    atc = table["results"]["ATC"]
    print(f"\n=== Done in {minutes:.1f} min. Held-out library ({table['clips']} clips, {table['queries']} captions): "
          f"R@1 {100 * atc['R@1']:.1f}% (chance {100 * table['chance']['R@1']:.1f}%), "
          f"mAP@10 {100 * atc['mAP@10']:.1f}% (chance {100 * table['chance']['mAP@10']:.1f}%). Captions: BLEU-4 "
          f"{100 * table['captioning']['BLEU-4']:.1f}; the sound named right in "
          f"{100 * table['captioning']['attributes_named_right']['sound']:.0f}% (chance "
          f"{100 * table['captioning']['attributes_chance']['sound']:.0f}%).")  # fmt: skip
    print(f"""
Next steps
  Search your own sounds:
    audio-qformer --library my-library index /path/to/sounds --model {model_dir}
    audio-qformer --library my-library search "a dog barks while cars pass by" -k 10 --rerank 16
    audio-qformer --library my-library similar /path/to/sounds/example.wav
    audio-qformer caption /path/to/sounds/example.wav --model {model_dir}
  The report's Table 1 (official BEATs checkpoint, bert-base-uncased; AudioCaps + Clotho; docs/paper.md):
    python reproduce_report.py --clotho_root clotho --audiocaps_csv audiocaps/train.csv audiocaps/val.csv \\
        --audiocaps_audio_dir audiocaps/audio --beats_checkpoint BEATs_iter3_plus_AS2M.pt --bert bert-base-uncased \\
        --num_processes 4 --output_dir outputs/report
    (it runs accelerate launch train.py --preset stage1, then --preset stage2, then both evaluations)
  Publish: add --push_to_hub --hub_model_id you/audio-qformer (and --push_space you/audio-qformer-search) to a
  train.py command.

Open the app on this model and library (Search, Similar, Describe, Classify; pip install -e ".[app]" first if gradio
is missing):
    {os.path.relpath(python, ROOT) if python.startswith(ROOT) else python} app.py --model {model_dir} --library {library}""")


if __name__ == "__main__":
    main()
