# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""The report's Table 1 for a model: text-to-audio retrieval, contrastive ranking alone and with the matching head
re-ranking the top 16, on Clotho's evaluation split or any captioned audio folder.

    python evaluate_retrieval.py --model outputs/stage2 --clotho_root clotho --clotho_split evaluation
    python evaluate_retrieval.py --model outputs/demo-model --audiofolder data/synthetic/library --output_json table.json
    python evaluate_retrieval.py --model outputs/stage2 --clotho_root clotho --submission_csv submission.csv
    python evaluate_retrieval.py --model outputs/demo-model --audiofolder data/synthetic/library --captions

Every caption is a query with its clip as the one relevant item; the metrics are those of the DCASE baseline (mAP@10,
R@1, R@5, R@10), computed by the `evaluate` module in `metrics/audio_retrieval`. Beside them, the DCASE 2025
multi-relevant mAP@16 counts every clip a caption fits: with `--relevance_column` (an audiofolder's metadata.csv
column whose equal values mark clips that fit each other's captions, e.g. the synthetic set's `attributes`), else the
caption's own clip only. BEATs tokens go through the same feature cache as training, so a second evaluation of the
same clips skips BEATs.

With `--captions` the same model also captions every clip (its caption head, beam search as LAVIS): BLEU-4 against the
clips' reference captions, and on a set whose metadata.csv has the synthetic `attributes` column, the share of captions
that name each attribute right against the chance of captions given to random clips of the set.
"""

import argparse
import csv
import json
import os
import time

import torch

from audio_qformer.library import load_model
from audio_qformer.data import add_hub_arguments, load_audiofolder, load_clotho, load_hub_datasets, with_cache_keys
from audio_qformer.captioning import attribute_accuracy, bleu4, caption_token_arrays, shuffled_chance
from audio_qformer.features import build_cache
from audio_qformer.ranking_metrics import chance_metrics
from audio_qformer.retrieval import evaluate_text_to_audio


METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "audio_retrieval")
COLUMNS = ("mAP@10", "R@1", "R@5", "R@10")
# The report's Table 1 (Clotho evaluation, percent): the DCASE 2023 baseline and its four systems (stage 1 = trained on
# AudioCaps and Clotho, stage 2 = then fine-tuned on Clotho; with or without re-ranking the top 16).
PAPER_TABLE_1 = {
    "Baseline": {"mAP@10": 22.2, "R@1": 13.0, "R@5": 34.3, "R@10": 48.0},
    "System 1": {"mAP@10": 25.30, "R@1": 14.68, "R@5": 40.08, "R@10": 54.22},
    "System 2": {"mAP@10": 26.18, "R@1": 15.44, "R@5": 40.61, "R@10": 55.14},
    "System 3": {"mAP@10": 26.47, "R@1": 16.02, "R@5": 40.19, "R@10": 54.39},
    "System 4": {"mAP@10": 25.08, "R@1": 14.56, "R@5": 38.97, "R@10": 53.26},
}


def cutoff_metrics(metric, rankings: list[list[str]], references: list[str], clips: int) -> dict[str, float]:
    """
    R@1, R@5, R@10 and mAP@10 (`COLUMNS`) from the `evaluate` metric, also for a set of fewer than 10 clips, where a
    ranking holds every clip: R@k for k past the clip count is 1 (the clip is always ranked) and mAP@10 is mAP@clips
    (no rank beyond the last clip).
    """
    recall_at = [k for k in (1, 5, 10) if k <= clips]
    measured = metric.compute(predictions=rankings, references=references, recall_at=recall_at, map_at=min(10, clips))
    return {"mAP@10": float(measured[f"mAP@{min(10, clips)}"]),
            **{f"R@{k}": float(measured[f"R@{k}"]) if k <= clips else 1.0 for k in (1, 5, 10)}}  # fmt: skip


def format_table_1(systems: dict[str, dict]) -> str:
    """A Markdown table of `systems` (`{"System 1": {"mAP@10": 0.25, ...}}`, fractions) beside the report's Table 1."""
    lines = ["| system | mAP@10 | R@1 | R@5 | R@10 | the report: mAP@10 | R@1 | R@5 | R@10 |", "|---" * 9 + "|"]
    for name, paper in PAPER_TABLE_1.items():
        ours = systems.get(name)
        measured = [f"{100 * ours[c]:.2f}" for c in COLUMNS] if ours else ["–"] * 4
        lines.append(f"| {name} | " + " | ".join(measured + [f"{paper[c]:.2f}" for c in COLUMNS]) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A saved model folder or Hub id.")
    source = parser.add_argument_group("evaluation set (one)")
    source.add_argument("--clotho_root", help="Clotho v2.1 in its official layout.")
    source.add_argument("--clotho_split", default="evaluation")
    source.add_argument("--audiofolder", help="A folder of audio with metadata.csv (file_name, caption columns).")
    add_hub_arguments(source, split="test")
    source.add_argument("--audio_cache_dir", default="cache/audio",
                        help="Where a --hub_dataset's audio is written, once per clip.")
    parser.add_argument("--relevance_column",
                        help="With --audiofolder: a metadata.csv column whose equal values mark clips that fit each "
                             "other's captions (the synthetic set's 'attributes'), for the multi-relevant mAP@16.")
    parser.add_argument("--rerank_top_k", type=int, default=None,
                        help="Candidates the matching head re-ranks (default: the model's config.rerank_top_k, 16; 0: off).")
    parser.add_argument("--feature_cache_dir", default="cache/features")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_json", help="Write the table (and the run's settings) here.")
    parser.add_argument("--submission_csv",
                        help="Also write the DCASE language-based audio retrieval submission: one row per caption, "
                             "`caption,fname_1,...,fname_10` (file names, best first).")
    parser.add_argument("--submission_system", choices=["atc", "rerank"],
                        help="The ranking the submission holds (default: the re-ranked one when --rerank_top_k > 0).")
    parser.add_argument("--captions", action="store_true",
                        help="Also caption every clip: BLEU-4, and the attributes named right on the synthetic set.")
    args = parser.parse_args(argv)
    if sum(bool(s) for s in (args.clotho_root, args.audiofolder, args.hub_dataset)) != 1:
        parser.error("give exactly one of --clotho_root, --audiofolder, --hub_dataset")
    if args.relevance_column and not args.audiofolder:
        parser.error("--relevance_column reads an audiofolder's metadata.csv: give --audiofolder")
    return args


def load_evaluation_set(args):
    if args.clotho_root:
        return ("clotho_" + args.clotho_split,) + load_clotho(args.clotho_root, args.clotho_split)
    if args.audiofolder:
        return (os.path.basename(os.path.normpath(args.audiofolder)),) + load_audiofolder(args.audiofolder)
    if len(args.hub_dataset) != 1:
        raise ValueError("Evaluate on one --hub_dataset at a time.")
    dataset, skipped = load_hub_datasets(args, args.audio_cache_dir)[0]
    return (args.hub_dataset[0],) + (dataset, skipped)


def relevant_clips(rows, groups: dict[str, str] | None = None) -> list[list[str]]:
    """
    The clips each caption fits: its own, and with `groups` (audio path -> group) every clip of its own clip's group.
    """
    if groups is None:
        return [[audio_id] for audio_id in rows["audio_id"]]
    members: dict[str, list[str]] = {}
    for path, audio_id in sorted(set(zip(rows["audio_path"], rows["audio_id"]))):
        members.setdefault(groups[path], []).append(audio_id)
    return [members[groups[path]] for path in rows["audio_path"]]


def read_metadata_column(directory: str, column: str, option: str = "--relevance_column") -> dict[str, str]:
    """Audio path -> the value of `column` in the folder's metadata.csv (`option` is what asked for it, for the error)."""
    csv_path = os.path.join(directory, "metadata.csv")
    with open(csv_path, newline="") as handle:
        table = list(csv.DictReader(handle))
    if not table or column not in table[0]:
        raise ValueError(f"{csv_path}: no column {column!r} for {option}; found {list(table[0]) if table else []}.")
    return {os.path.join(directory, row["file_name"]): row[column] for row in table}


SYNTHETIC_ATTRIBUTES_COLUMN = "attributes"  # `synthetic_sounds.py` writes each clip's attributes there, as JSON


def evaluate_captions(model, processor, rows, clip_tokens, attributes_of: dict[str, str] | None, batch_size: int):
    """
    Caption each clip of the evaluation rows once (from its cached BEATs tokens, `clip_tokens(audio_id)`) and score
    the captions: BLEU-4 against the clip's captions in the rows, and with `attributes_of` (audio path -> JSON
    attributes) the attributes named right against chance. Returns the numbers and every clip's caption.
    """
    references: dict[str, list[str]] = {}
    for audio_id, caption in zip(rows["audio_id"], rows["caption"]):
        references.setdefault(audio_id, []).append(caption)
    clips = list(references)
    started = time.perf_counter()
    predicted = caption_token_arrays(model, processor, [clip_tokens(clip) for clip in clips], batch_size)
    seconds = time.perf_counter() - started
    report = {"clips": len(clips), "BLEU-4": bleu4(predicted, [references[clip] for clip in clips]),
              "clips_per_second": len(clips) / seconds,
              "generation": {name: getattr(model.generation_config, name)
                             for name in ("num_beams", "min_length", "max_length", "do_sample", "top_p")},
              "captions": [{"audio_id": clip, "caption": text, "references": references[clip]}
                           for clip, text in zip(clips, predicted)]}  # fmt: skip
    if attributes_of is not None:
        path_of = dict(zip(rows["audio_id"], rows["audio_path"]))
        truth = [json.loads(attributes_of[path_of[clip]]) for clip in clips]
        report["attributes_named_right"] = attribute_accuracy(predicted, truth)
        report["attributes_chance"] = shuffled_chance(truth)
    return report


def format_caption_report(name: str, report: dict, examples: int = 5) -> str:
    settings = report["generation"]
    decoding = "sampling" if settings["do_sample"] else "greedy" if settings["num_beams"] == 1 else "beam search"
    decoding += f", {settings['num_beams']} beams" * (settings["num_beams"] > 1)
    decoding += f", {settings['min_length']}-{settings['max_length']} tokens"
    lines = [f"Captioning on {name}: {report['clips']} clips ({decoding}), {report['clips_per_second']:.1f} clips/s "
             f"from cached BEATs tokens; BLEU-4 {100 * report['BLEU-4']:.2f}"]  # fmt: skip
    if "attributes_named_right" in report:
        lines += ["| attribute | named right | chance (captions of random clips) |", "|---|---:|---:|"]
        for attribute, share in report["attributes_named_right"].items():
            lines.append(f"| {attribute} | {100 * share:.1f} | {100 * report['attributes_chance'][attribute]:.1f} |")
    for clip in report["captions"][:examples]:
        lines.append(f"  {os.path.basename(clip['audio_id'])}: {clip['caption']!r}\n    reference: {clip['references'][0]!r}")
    return "\n".join(lines)


SUBMISSION_DEPTH = 10  # DCASE task 6B: ten file names per caption


def write_submission(path: str, captions: list[str], ranked_files: list[list[str]]):
    """The DCASE retrieval submission CSV: a header `caption,fname_1..fname_10`, then each caption's best ten files."""
    if any(len(files) < SUBMISSION_DEPTH for files in ranked_files):
        raise ValueError(f"A DCASE submission lists {SUBMISSION_DEPTH} files per caption; this set has fewer clips.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["caption"] + [f"fname_{i}" for i in range(1, SUBMISSION_DEPTH + 1)])
        writer.writerows([caption, *files[:SUBMISSION_DEPTH]] for caption, files in zip(captions, ranked_files))


def format_table(name: str, results: dict, chance: dict, clips: int, queries: int) -> str:
    """The Table 1 layout in percent: one row per system, chance level last; a column the systems add comes last."""
    columns = COLUMNS + tuple(c for c in next(iter(results.values())) if c not in COLUMNS)
    widths = [max(6, len(c)) for c in columns]
    lines = [f"Text-to-audio retrieval on {name}: {clips} clips, {queries} captions (percent)",
             f"| {'system':<28} | " + " | ".join(f"{c:>{w}}" for c, w in zip(columns, widths)) + " |",
             f"|{'-' * 30}|" + "|".join("-" * (w + 2) for w in widths) + "|"]  # fmt: skip
    for system, metrics in {**results, "chance": chance}.items():
        values = [f"{100 * metrics[c]:{w}.2f}" if metrics.get(c) is not None else f"{'':>{w}}"
                  for c, w in zip(columns, widths)]  # fmt: skip
        lines.append(f"| {system:<28} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv=None):
    import evaluate

    args = parse_args(argv)
    started = time.perf_counter()
    model, processor = load_model(args.model, args.device)
    if args.rerank_top_k is None:
        args.rerank_top_k = model.config.rerank_top_k
    if args.submission_system == "rerank" and not args.rerank_top_k:
        raise ValueError("--submission_system rerank needs --rerank_top_k > 0.")
    name, rows, skipped = load_evaluation_set(args)
    rows = with_cache_keys(rows)
    clips = [{"key": r["key"], "audio_path": r["audio_path"], "audio_bytes": r["audio_bytes"]}
             for r in rows.select_columns(["key", "audio_path", "audio_bytes"])]  # fmt: skip
    cache, failures, _ = build_cache(args.feature_cache_dir, clips, model.audio_model, processor.feature_extractor)
    for failure in skipped + failures:
        print(f"skipped {failure.get('audio')}: {failure.get('reason')}")
    rows = rows.filter(lambda row: row["key"] in cache, desc="Dropping unreadable clips")
    key_of = dict(zip(rows["audio_id"], rows["key"]))

    own_metrics, rankings = evaluate_text_to_audio(
        model, processor, rows["caption"], rows["audio_id"], lambda clip: cache.get(key_of[clip]),
        args.batch_size, args.rerank_top_k, show_progress=True,
    )  # fmt: skip
    metric = evaluate.load(METRIC_PATH)
    results = {system: cutoff_metrics(metric, ranked, list(rows["audio_id"]), len(key_of))
               for system, ranked in rankings.items()}  # fmt: skip
    # The DCASE 2025 measure, counting every clip a caption fits (cut at the library's size when under 16 clips).
    groups = read_metadata_column(args.audiofolder, args.relevance_column) if args.relevance_column else None
    relevant = relevant_clips(rows, groups)
    multi_metric, map_at = evaluate.load(METRIC_PATH, "multi_relevant"), min(16, len(key_of))
    for system, ranked in rankings.items():
        value = multi_metric.compute(predictions=[r[:map_at] for r in ranked], references=relevant, map_at=map_at)
        results[system][f"mAP@{map_at} multi-relevant"] = float(value[f"mAP@{map_at}"])
    chance = chance_metrics(len(key_of))
    print(format_table(name, results, chance, len(key_of), len(rows)))
    ambiguous = sum(len(r) > 1 for r in relevant)
    print(f"Captions that fit more than one clip: {ambiguous} of {len(rows)} "
          + (f"(equal '{args.relevance_column}' values)" if groups else "(no --relevance_column: own clip only)"))
    audio_to_text = own_metrics["audio-to-text (ATC)"]
    print("Audio-to-text (each clip a query, its captions relevant): "
          + ", ".join(f"{k} {100 * v:.2f}" for k, v in audio_to_text.items()))  # fmt: skip
    if args.clotho_root and args.clotho_split == "evaluation":
        print("The report's Table 1 on the same split: "
              + "; ".join(f"{s}: mAP@10 {m['mAP@10']}, R@1 {m['R@1']}" for s, m in PAPER_TABLE_1.items() if s in
                          ("Baseline", "System 3")))  # fmt: skip
    if args.submission_csv:
        rerank_system = f"ATC + re-rank top {args.rerank_top_k}"
        system = "ATC" if args.submission_system == "atc" or rerank_system not in rankings else rerank_system
        file_of = {audio_id: os.path.basename(path) if path else audio_id.rsplit("/", 1)[-1]
                   for audio_id, path in zip(rows["audio_id"], rows["audio_path"])}  # fmt: skip
        write_submission(args.submission_csv, list(rows["caption"]),
                         [[file_of[clip] for clip in ranked] for ranked in rankings[system]])  # fmt: skip
        print(f"DCASE submission ({system}): {args.submission_csv}")
    captioning = None
    if args.captions:
        attributes_of = None
        if args.audiofolder:
            try:
                attributes_of = read_metadata_column(args.audiofolder, SYNTHETIC_ATTRIBUTES_COLUMN, "--captions")
            except ValueError:
                pass  # not the synthetic set: BLEU-4 only
        captioning = evaluate_captions(model, processor, rows, lambda clip: cache.get(key_of[clip]), attributes_of,
                                       args.batch_size)  # fmt: skip
        print(format_caption_report(name, captioning))
    seconds = time.perf_counter() - started
    print(f"Done in {seconds:.1f} s.")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as handle:
            json.dump({"model": args.model, "evaluation_set": name, "clips": len(key_of), "queries": len(rows),
                       "rerank_top_k": args.rerank_top_k, "results": results, "chance": chance,
                       "audio_to_text": audio_to_text, "captions_fitting_several_clips": ambiguous,
                       "skipped": len(skipped) + len(failures), "seconds": round(seconds, 1),
                       "captioning": captioning}, handle, indent=2)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
