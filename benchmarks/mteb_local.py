"""mteb's evaluator against the project's own on an audiofolder (the demo's held-out library by default).

    python benchmarks/mteb_local.py --model outputs/demo/model --audiofolder outputs/demo/data/library

Runs `audio_qformer.mteb_encoder.local_tasks` (text -> audio, audio -> text and, where `metadata.csv` has the
synthetic set's `attributes`, zero-shot classification of the kind of sound) through `mteb.evaluate`, and
`evaluate_retrieval.py` on the same folder, and prints both side by side.
"""

import argparse
import csv
import json
import os
import sys
import tempfile


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SOUND_LABELS = {"tone": "a tone", "buzz": "a buzz", "noise": "a noise"}  # the synthetic set's kinds of sound


def main(argv=None):
    import evaluate_retrieval
    from transformers import pipeline

    from audio_io import load_audio
    from audio_qformer.mteb_encoder import evaluate, local_tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(ROOT, "outputs/demo/model"))
    parser.add_argument("--audiofolder", default=os.path.join(ROOT, "outputs/demo/data/library"))
    args = parser.parse_args(argv)
    with open(os.path.join(args.audiofolder, "metadata.csv")) as handle:
        table = list(csv.DictReader(handle))
    labels = ({row["file_name"]: SOUND_LABELS[json.loads(row["attributes"])["sound"]] for row in table}
              if table and "attributes" in table[0] else None)  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        tasks = local_tasks(args.audiofolder, labels, name="Library")
        scores = {r.task_name: r.scores["test"][0] for r in evaluate(args.model, tasks, os.path.join(work, "mteb"))}
        own = evaluate_retrieval.main(["--model", args.model, "--audiofolder", args.audiofolder, "--rerank_top_k", "0",
                                       "--feature_cache_dir", os.path.join(work, "cache"),
                                       "--output_json", os.path.join(work, "own.json")])  # fmt: skip
        with open(os.path.join(work, "own.json")) as handle:
            audio_to_text = json.load(handle)["audio_to_text"]
    rows = [("text -> audio R@1", scores["LibraryT2A"]["recall_at_1"], own["ATC"]["R@1"]),
            ("text -> audio mAP@10", scores["LibraryT2A"]["map_at_10"], own["ATC"]["mAP@10"]),
            ("audio -> text R@1 (a caption of the clip first)", scores["LibraryA2T"]["hit_rate_at_1"], audio_to_text["R@1"]),
            ("audio -> text R@5", scores["LibraryA2T"]["hit_rate_at_5"], audio_to_text["R@5"])]  # fmt: skip
    if labels:
        classifier = pipeline("zero-shot-audio-classification", model=args.model, trust_remote_code=True)
        names = sorted(set(labels.values()))
        right = [classifier(load_audio(os.path.join(args.audiofolder, f)), candidate_labels=names,
                            hypothesis_template="{}")[0]["label"] == label for f, label in labels.items()]  # fmt: skip
        rows.append(("zero-shot accuracy (kind of sound)", scores["LibraryZeroShot"]["accuracy"], sum(right) / len(right)))
    print("\n| measure | mteb | the project's own |\n|---|---|---|")
    for name, ours_mteb, ours in rows:
        print(f"| {name} | {100 * ours_mteb:.2f} | {100 * ours:.2f} |")


if __name__ == "__main__":
    main()
