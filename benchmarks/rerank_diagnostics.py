"""Why the matching head's re-rank helps or not, on a model trained by `demo.py` (or `train.py` on the synthetic set).

    python benchmarks/rerank_diagnostics.py --work_dir outputs/demo [--json out.json]

Prints three things:
1. the matching loss along training (`train_log.jsonl`) against the loss of a head that ignores its input and
   predicts the label frequency (one positive and two hard negatives per caption: 0.6365);
2. on the held-out library, for each caption whose clip is among its 16 best by the contrastive cosine: how often
   the match logit puts that clip first among the 16 (the re-rank's R@1 within the top 16) against how often the
   cosine does, and the area under the ROC curve of each score for telling the clip from the other 15;
3. on the training set, how often a hard negative drawn as training draws them (batches of 16, softmax of the
   model's similarities, `sample_hard_negatives`) is in fact a true match: a clip or caption with the same
   attributes as the positive, so labelled "no match" wrongly; and the same share for a uniform draw.
"""

import argparse
import csv
import json
import math
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audio_qformer.library import load_model  # noqa: E402
from audio_qformer.data import load_audiofolder, with_cache_keys  # noqa: E402
from audio_qformer.features import build_cache  # noqa: E402
from modeling_audio_qformer import max_over_queries, sample_hard_negatives  # noqa: E402
from audio_qformer.ranking_metrics import rank_items  # noqa: E402
from audio_qformer.retrieval import embed_cached_audio, embed_texts, group_by_clip, rerank_with_matching_head, tokenize_texts  # noqa: E402


CONSTANT_PREDICTOR_LOSS = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)  # labels: 1 positive, 2 negatives


def embedded_set(model, processor, directory: str, cache_dir: str) -> dict:
    """A folder's captions and clips with their tokens, embeddings and attributes."""
    rows = with_cache_keys(load_audiofolder(directory)[0])
    clips = [{"key": r["key"], "audio_path": r["audio_path"], "audio_bytes": None} for r in rows]
    cache, _, _ = build_cache(cache_dir, clips, model.audio_model, processor.feature_extractor, show_progress=False)
    key_of = dict(zip(rows["audio_id"], rows["key"]))
    clip_ids, targets = group_by_clip(list(rows["audio_id"]))
    tokens = [cache.get(key_of[clip]) for clip in clip_ids]
    with open(os.path.join(directory, "metadata.csv"), newline="") as handle:
        attributes_of = {os.path.join(directory, r["file_name"]): r["attributes"] for r in csv.DictReader(handle)}
    path_of = dict(zip(rows["audio_id"], rows["audio_path"]))
    return {
        "captions": list(rows["caption"]), "targets": targets, "tokens": tokens,
        "attributes": [attributes_of[path_of[clip]] for clip in clip_ids],
        "audio_embeds": embed_cached_audio(model, tokens), "text_embeds": embed_texts(model, processor, list(rows["caption"])),
    }  # fmt: skip


def auc(positive: float, negatives: torch.Tensor) -> float:
    """Probability that the positive outscores a negative (ties count half)."""
    return ((positive > negatives).float() + 0.5 * (positive == negatives).float()).mean().item()


def held_out_separation(model, processor, library: dict, top_k: int = 16) -> dict:
    similarity = max_over_queries(library["audio_embeds"], library["text_embeds"]).t()
    candidates = rank_items(similarity, top_k)
    tokens = tokenize_texts(processor, model, library["captions"])
    # Zero cosines: the re-rank's scores are then the match logits alone.
    reordered, logits = rerank_with_matching_head(
        model, candidates, torch.zeros(candidates.shape), tokens["input_ids"], tokens["attention_mask"],
        lambda ids: [library["tokens"][i] for i in ids],
    )  # fmt: skip
    match_logits = torch.empty(candidates.shape)
    for q in range(candidates.shape[0]):
        position = {int(item): i for i, item in enumerate(candidates[q])}
        for item, logit in zip(reordered[q].tolist(), logits[q].tolist()):
            match_logits[q, position[item]] = logit
    cosines = similarity.gather(1, candidates)
    found = candidates == library["targets"][:, None]
    queries = found.any(dim=1).nonzero().squeeze(1)
    stats = {"queries": len(library["captions"]), "clip_in_top": len(queries)}
    for name, scores in (("cosine", cosines), ("match logit", match_logits)):
        firsts, aucs = 0, []
        for q in queries.tolist():
            column = int(found[q].nonzero())
            firsts += int(scores[q].argmax()) == column
            aucs.append(auc(scores[q, column].item(), torch.cat([scores[q, :column], scores[q, column + 1 :]])))
        stats[name] = {"first_among_top": firsts / len(queries), "auc": sum(aucs) / len(aucs)}
    return stats


def hard_negative_labels(model, train: dict, batch_size: int = 16, seed: int = 0) -> dict:
    """Share of drawn hard negatives with the positive's attributes, in batches drawn as training draws them."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train["captions"]), generator=generator)
    wrong = {"softmax": 0, "uniform": 0}
    drawn = 0
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = order[start : start + batch_size]
        clips = train["targets"][rows]
        attributes = [train["attributes"][c] for c in clips.tolist()]
        similarity = max_over_queries(train["audio_embeds"][clips], train["text_embeds"][rows]) / model.temperature.item()
        positives = clips[:, None] == clips[None, :]
        for draw in ("softmax", "uniform"):
            scores = similarity if draw == "softmax" else torch.zeros_like(similarity)
            for matrix in (scores, scores.t()):  # a negative caption per clip, a negative clip per caption
                indices, has = sample_hard_negatives(matrix.detach(), positives, generator)
                wrong[draw] += sum(attributes[i] == attributes[j] for i, j in zip(range(batch_size), indices.tolist()) if has[i])
                drawn += int(has.sum()) if draw == "softmax" else 0
    return {"drawn": drawn, **{f"{draw} true-match share": count / drawn for draw, count in wrong.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/demo", help="demo.py's folder (data/, cache/, model/).")
    parser.add_argument("--json", help="Also write the figures here.")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model_dir, data, cache = (os.path.join(args.work_dir, n) for n in ("model", "data", "cache"))
    model, processor = load_model(model_dir)

    log = [json.loads(line) for line in open(os.path.join(model_dir, "train_log.jsonl"))]
    curve = {r["step"]: round(r["loss_atm"], 4) for r in log if r["step"] == 1 or r["step"] % 25 == 0}
    print(f"Matching loss by step (a constant predictor scores {CONSTANT_PREDICTOR_LOSS:.4f}): {curve}")

    library = held_out_separation(model, processor, embedded_set(model, processor, os.path.join(data, "library"), cache))
    print(f"Held-out library: {library['clip_in_top']} of {library['queries']} captions have their clip in the top 16")
    for name in ("cosine", "match logit"):
        s = library[name]
        print(f"  {name:<12} puts it first {100 * s['first_among_top']:.1f}%, AUC against the other 15 {s['auc']:.3f}")

    labels = hard_negative_labels(model, embedded_set(model, processor, os.path.join(data, "train"), cache))
    print(f"Training hard negatives ({labels['drawn']} drawn): true matches {100 * labels['softmax true-match share']:.1f}% "
          f"(uniform draw: {100 * labels['uniform true-match share']:.1f}%)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"matching_loss": curve, "constant_predictor": CONSTANT_PREDICTOR_LOSS, "held_out": library,
                       "hard_negatives": labels}, handle, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
