# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""
The report's Table 1 from the real data in one command: stage 1 (AudioCaps train + val and Clotho development +
validation, 1000 captions of whole clips held out), stage 2 (fine-tuned on Clotho, holding out the same clips), then
both evaluated on Clotho evaluation without and with re-ranking the top 16: Systems 1-4, printed beside the report's.

    python reproduce_report.py --clotho_root data --audiocaps_csv data/audiocaps/train.csv data/audiocaps/val.csv \
        --audiocaps_audio_dir data/AUDIOCAPS --beats_checkpoint BEATs_iter3_plus_AS2M.pt --bert bert-base-uncased \
        --num_processes 4 --output_dir outputs/report [-- MORE train.py OPTIONS]

Each stage runs `accelerate launch --multi_gpu --num_processes N train.py` (plain `python` for one process) with the
report's preset; options after `--` go to both stages. Run it again after any interruption: a finished step
(its `all_results.json`, its evaluation's JSON) is not run again, and a stopped stage resumes from its last
checkpoint. The table is also written to `OUTPUT_DIR/table1.md` and into stage 2's model card.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
# Which stage and ranking each of the report's systems is.
SYSTEMS = {"System 1": ("stage1", False), "System 2": ("stage1", True), "System 3": ("stage2", False),
           "System 4": ("stage2", True)}  # fmt: skip


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clotho_root", required=True, help="Clotho v2.1 (the Zenodo files unpacked, or aac-datasets' root).")
    parser.add_argument("--audiocaps_csv", nargs="+", required=True, help="AudioCaps v1 train.csv and val.csv.")
    parser.add_argument("--audiocaps_audio_dir", nargs="+", required=True,
                        help="The downloaded AudioCaps clips: one folder (searched at any depth) or one per CSV.")
    parser.add_argument("--audiocaps_file_pattern", nargs="+", default=[],
                        help="Your download tool's file names, if not a known one's (see train.py --help).")
    parser.add_argument("--beats_checkpoint", help="BEATs_iter3_plus_AS2M.pt (default: a small random BEATs, for trying the path).")
    parser.add_argument("--bert", help="The Q-Former's BERT (the report: bert-base-uncased; default: the packaged MiniLM).")
    parser.add_argument("--num_processes", type=int, default=1, help="GPUs (processes) per stage (the report: 4).")
    parser.add_argument("--output_dir", default="outputs/report", help="stage1/, stage2/, the evaluations and table1.md.")
    parser.add_argument("--feature_cache_dir", default="cache/features", help="BEATs tokens of every clip (~45 GiB at full size).")
    parser.add_argument("--eval_batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    args.train_options = extra
    return args


def launcher(num_processes: int) -> list[str]:
    if num_processes == 1:
        return [sys.executable]
    # --multi_gpu: without it Accelerate starts one process wherever an accelerate config file exists.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes)]


def run(command: list[str]):
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=HERE)


def train_stage(args, stage: str) -> str:
    """Stage 1 or 2 of the report's recipe, unless it has finished; returns its folder (the saved model)."""
    out = os.path.abspath(os.path.join(args.output_dir, stage))
    if os.path.isfile(os.path.join(out, "all_results.json")):
        print(f"{stage}: done ({out})")
        return out
    command = launcher(args.num_processes) + [
        os.path.join(HERE, "train.py"), "--preset", stage, "--clotho_root", args.clotho_root,
        "--clotho_train_splits", "development", "validation", "--clotho_eval_split", "evaluation",
        "--feature_cache_dir", args.feature_cache_dir, "--output_dir", out, "--resume",
    ]  # fmt: skip
    if stage == "stage1":
        command += ["--audiocaps_csv", *args.audiocaps_csv, "--audiocaps_audio_dir", *args.audiocaps_audio_dir]
        command += ["--audiocaps_file_pattern", *args.audiocaps_file_pattern] if args.audiocaps_file_pattern else []
        command += ["--beats_checkpoint", args.beats_checkpoint] if args.beats_checkpoint else []
        command += ["--bert", args.bert] if args.bert else []
    else:  # the stage-1 model, and its held-out clips (train.py reads validation_clips.json beside it)
        command += ["--init_from", os.path.abspath(os.path.join(args.output_dir, "stage1"))]
    run(command + args.train_options)
    return out


def evaluate_stage(args, stage: str, model_dir: str) -> dict:
    """`evaluate_retrieval.py` on Clotho evaluation (with and without re-ranking), unless its JSON exists."""
    output = os.path.abspath(os.path.join(args.output_dir, f"evaluation_{stage}.json"))
    if not os.path.isfile(output):
        run([sys.executable, os.path.join(HERE, "evaluate_retrieval.py"), "--model", model_dir, "--clotho_root",
             args.clotho_root, "--clotho_split", "evaluation", "--feature_cache_dir", args.feature_cache_dir,
             "--batch_size", str(args.eval_batch_size), "--output_json", output])  # fmt: skip
    with open(output) as handle:
        return json.load(handle)


def systems_of(evaluations: dict[str, dict]) -> dict[str, dict]:
    """Systems 1-4 from the two stages' evaluations: the contrastive ranking, or its re-ranked top 16."""
    systems = {}
    for name, (stage, reranked) in SYSTEMS.items():
        results = evaluations[stage]["results"]
        system = next((s for s in results if s.startswith("ATC + re-rank")), None) if reranked else "ATC"
        if system is not None:
            systems[name] = results[system]
    return systems


def main(argv=None):
    from evaluate_retrieval import format_table_1
    from audio_qformer.hub_pages import add_to_model_card

    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    evaluations = {}
    for stage in ("stage1", "stage2"):
        model_dir = train_stage(args, stage)
        evaluations[stage] = evaluate_stage(args, stage, model_dir)
    table = format_table_1(systems_of(evaluations))
    queries = evaluations["stage2"]["queries"]
    clips = evaluations["stage2"]["clips"]
    heading = f"Clotho evaluation ({clips} clips, {queries} captions), percent; stage 1 = System 1/2, stage 2 = System 3/4:"
    print(f"\n{heading}\n{table}")
    with open(os.path.join(args.output_dir, "table1.md"), "w") as handle:
        handle.write(f"{heading}\n\n{table}\n")
    add_to_model_card(os.path.join(args.output_dir, "stage2"), "Table 1 of the report, reproduced", f"{heading}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
