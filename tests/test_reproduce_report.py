"""`reproduce_report.py` end to end on small copies of Clotho (aac-datasets' layout) and AudioCaps (v1 CSVs, files as
aac-datasets names them): both stages, the held-out clips carried from stage 1 to stage 2, the evaluations and the
Systems 1-4 table; then run again, doing nothing twice."""

import json
import os

from conftest import FIXTURES
from test_real_layouts import write_audio, write_csv


def make_data(root):
    clotho = root / "CLOTHO_v2.1"
    header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    for split, count in (("development", 8), ("validation", 3), ("evaluation", 4)):
        names = [f"{split} clip, {i}.wav" for i in range(count)]
        for i, name in enumerate(names):
            write_audio(str(clotho / "clotho_audio_files" / split / name), seconds=0.6, seed=hash((split, i)) % 1000)
        write_csv(clotho / "clotho_csv_files" / f"clotho_captions_{split}.csv", header,
                  [[name] + [f"{split} sound {i}, caption {j}" for j in range(5)] for i, name in enumerate(names)])  # fmt: skip
    audiocaps = root / "AUDIOCAPS"
    header = ["audiocap_id", "youtube_id", "start_time", "caption"]
    train = [[10 + i, f"trainvideo{i}", 30, f"audiocaps train clip {i}"] for i in range(6)]
    val = [[100 + 5 * i + j, f"validvideo{i}", 0, f"audiocaps val clip {i}, caption {j}"] for i in range(2) for j in range(5)]
    for split, rows in (("train", train), ("val", val)):
        write_csv(audiocaps / "csv_files_v1" / f"{split}.csv", header, rows)
        for _, ytid, start, _ in rows:
            write_audio(str(audiocaps / "audio_32000Hz" / split / f"{ytid}_{start}.flac"), seconds=0.6, seed=len(ytid) + start)
    return audiocaps


TINY = ["--max_train_steps", "2", "--num_warmup_steps", "1", "--cosine_period_steps", "2", "--per_device_train_batch_size",
        "4", "--total_batch_size", "4", "--eval_steps", "1", "--checkpointing_steps", "1", "--num_validation", "12",
        "--num_query_tokens", "4", "--num_qformer_layers", "1", "--per_device_eval_batch_size", "8"]  # fmt: skip


def test_the_whole_path_prints_systems_1_to_4(tmp_path, capsys):
    import reproduce_report

    audiocaps = make_data(tmp_path / "data")
    out = tmp_path / "report"
    argv = ["--clotho_root", str(tmp_path / "data"), "--audiocaps_csv", str(audiocaps / "csv_files_v1" / "train.csv"),
            str(audiocaps / "csv_files_v1" / "val.csv"), "--audiocaps_audio_dir", str(audiocaps / "audio_32000Hz"),
            "--beats_checkpoint", os.path.join(FIXTURES, "beats_tiny_official.pt"), "--output_dir", str(out),
            "--feature_cache_dir", str(tmp_path / "cache"), "--", *TINY]  # fmt: skip
    assert reproduce_report.main(argv) == 0
    printed = capsys.readouterr().out
    table = (out / "table1.md").read_text()
    assert "Clotho evaluation (4 clips, 20 captions)" in table
    for system, paper in (("Baseline", "22.20 | 13.00 | 34.30 | 48.00"), ("System 1", "25.30 | 14.68 | 40.08 | 54.22"),
                          ("System 4", "25.08 | 14.56 | 38.97 | 53.26")):  # fmt: skip
        assert paper in next(line for line in table.splitlines() if line.startswith(f"| {system} |"))
    for system in ("System 1", "System 2", "System 3", "System 4"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {system} |"))
        assert "–" not in row.split("|")[2]  # measured
    assert table.splitlines()[-1] in printed
    stage1 = set(json.loads((out / "stage1" / "validation_clips.json").read_text())["clips"])
    stage2 = set(json.loads((out / "stage2" / "validation_clips.json").read_text())["clips"])
    # Stage 1 drew whole clips from the pooled AudioCaps and Clotho; stage 2 held out its Clotho ones and no others.
    assert sum(len(c) for c in stage1) and {c.split("/")[0] for c in stage1} <= {"audiocaps", "clotho"}
    assert stage2 and stage2 == {c for c in stage1 if c.startswith("clotho/")}
    assert "## Table 1 of the report, reproduced" in (out / "stage2" / "README.md").read_text()
    # Again: every step is found done.
    assert reproduce_report.main(argv) == 0
    again = capsys.readouterr().out
    assert "stage1: done" in again and "stage2: done" in again and "$ " not in again
