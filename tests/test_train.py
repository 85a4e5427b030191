"""train.py end to end on a tiny generated set: two processes with accumulation, kill and resume, the saved model."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY_BEATS

from configuration_audio_qformer import BeatsConfig
from modeling_audio_qformer import BeatsModel


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from audio_qformer.synthetic_sounds import generate

    root = tmp_path_factory.mktemp("train")
    generate(str(root / "data"), num_train=12, num_validation=4, num_library=4, captions_per_clip=2, seed=1)
    torch.manual_seed(0)
    BeatsModel(BeatsConfig(**TINY_BEATS)).save_pretrained(root / "beats")
    return root


def train_command(setup, output_dir, *extra):
    return [
        "train.py", "--preset", "demo", "--train_dir", str(setup / "data" / "train"),
        "--validation_dir", str(setup / "data" / "validation"), "--beats_checkpoint", str(setup / "beats"),
        "--feature_cache_dir", str(setup / "cache"), "--output_dir", str(output_dir), "--num_qformer_layers", "1",
        "--num_query_tokens", "4", "--max_text_length", "16", "--num_warmup_steps", "1", "--cosine_period_steps", "4",
        *extra,
    ]  # fmt: skip


def run(command, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, **kwargs)


def read_log(output_dir):
    """The last logged record of each step (a resumed run may repeat a step that was logged but not checkpointed)."""
    records = {}
    with open(os.path.join(output_dir, "train_log.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            records[record["step"]] = record
    return records


LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def test_two_processes_train_with_the_gradient_of_one_process():
    """ATC + ATG gradients of a batch split over two processes equal one process's, for both contrastive settings."""
    result = run([*LAUNCH_TWO, os.path.join(ROOT, "tests", "two_process_gradients.py")])
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["with_grad=False"] < 1e-5 and report["with_grad=True"] < 1e-5, report
    assert report["settings differ by"] > 1e-3, report  # the option changes the gradient


@pytest.mark.parametrize("gradient_option", [[], ["--atc_gather_with_grad"]], ids=["lavis", "gather_with_grad"])
def test_two_processes_with_accumulation(tiny_setup, tmp_path, gradient_option):
    output_dir = tmp_path / "two"
    result = run([
        *LAUNCH_TWO,
        *train_command(tiny_setup, output_dir, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                       "--max_train_steps", "3", "--eval_steps", "3", "--checkpointing_steps", "1", *gradient_option),
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "processes = 2, accumulation = 2, total = 8" in result.stdout
    log = read_log(output_dir)
    assert sorted(log) == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log.values())
    assert sorted(n for n in os.listdir(output_dir) if n.startswith("step_")) == ["step_2", "step_3"]  # limit 2
    results = json.load(open(output_dir / "all_results.json"))
    assert results["steps"] == 3 and results["best_step"] == 3 and 0 <= results["best"]["validation"]["R@10"] <= 1
    # The kept model loads through AutoModel (remote code), and the card carries the metrics.
    from transformers import AutoModel

    model = AutoModel.from_pretrained(output_dir, trust_remote_code=True)
    assert model.config.num_query_tokens == 4
    assert model.config.atc_gather_with_grad == bool(gradient_option)
    assert model.config.train_max_text_length == 16  # --max_text_length, recorded where the collate reads it
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import filter_repo_objects

    from train import MODEL_UPLOAD_IGNORE

    card = ModelCard.load(output_dir / "README.md")
    assert card.data.pipeline_tag == "feature-extraction" and "widget" not in card.data.to_dict()
    assert card.data.eval_results[0].task_type == "text-to-audio-retrieval"
    # What --push_to_hub uploads: the model, its code, the endpoint handler, the card; no checkpoints or logs.
    uploaded = set(filter_repo_objects(
        [str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file()], ignore_patterns=MODEL_UPLOAD_IGNORE
    ))  # fmt: skip
    assert {"README.md", "config.json", "model.safetensors", "modeling_audio_qformer.py", "handler.py", "audio_io.py",
            "requirements.txt", "processor_config.json", "tokenizer.json"} <= uploaded  # fmt: skip
    assert not any(name.startswith("step_") or name == "train_log.jsonl" for name in uploaded)


def test_killed_run_resumes_with_the_same_losses(tiny_setup, tmp_path):
    common = ["--per_device_train_batch_size", "4", "--max_train_steps", "5", "--eval_steps", "100",
              "--checkpointing_steps", "1", "--checkpoints_total_limit", "10"]  # fmt: skip
    straight = tmp_path / "straight"
    result = run([sys.executable, *train_command(tiny_setup, straight, *common)])
    assert result.returncode == 0, result.stderr[-3000:]
    expected = read_log(straight)

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    process = subprocess.Popen([sys.executable, *train_command(tiny_setup, killed, *common)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.isdir(killed / "step_2"):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.isdir(killed / "step_2"), "the run ended before it could be killed"
    done = max(int(n[5:]) for n in os.listdir(killed) if n.startswith("step_"))
    assert done < 5, "the run finished before it was killed"
    result = run([sys.executable, *train_command(tiny_setup, killed, *common, "--resume")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stdout
    resumed = read_log(killed)
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4, 5]
    for step in expected:
        for name in ("loss", "loss_atc", "loss_atm", "loss_atg", "lr", "temperature"):
            assert resumed[step][name] == pytest.approx(expected[step][name], rel=1e-5, abs=1e-6), (step, name)


def test_gradient_checkpointing_and_mixed_precision_options(tiny_setup, tmp_path):
    """`--gradient_checkpointing` trains with the same losses; `--mixed_precision bf16` trains with finite ones."""
    common = ["--per_device_train_batch_size", "4", "--max_train_steps", "2", "--eval_steps", "100",
              "--checkpointing_steps", "100"]  # fmt: skip
    logs = {}
    for name, extra in (("plain", []), ("checkpointing", ["--gradient_checkpointing"]),
                        ("bf16", ["--mixed_precision", "bf16"])):  # fmt: skip
        result = run([sys.executable, *train_command(tiny_setup, tmp_path / name, *common, *extra)])
        assert result.returncode == 0, result.stderr[-3000:]
        logs[name] = read_log(tmp_path / name)
    for step in (1, 2):
        for term in ("loss", "loss_atc", "loss_atm", "loss_atg"):
            assert logs["checkpointing"][step][term] == pytest.approx(logs["plain"][step][term], rel=1e-5), (step, term)
            assert torch.isfinite(torch.tensor(logs["bf16"][step][term]))
    # autocast changes the numbers a little, not the scale
    assert logs["bf16"][1]["loss"] == pytest.approx(logs["plain"][1]["loss"], rel=0.05)


def test_gpu_check_dry_run(tmp_path):
    """The GPU check's steps run (CPU, tiny sizes), so the script is ready when a GPU is."""
    output = tmp_path / "check.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry_run", "--json",
                             str(output)], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    checks = [row[0] for row in rows]
    assert checks[:2] == ["BEATs float32", "BEATs bfloat16"] and "min token cosine" in rows[1][3]
    assert sum(check.startswith("train step") for check in checks) == 3
    assert all(row[3] == "losses finite" for row in rows if row[0].startswith("train step"))
    assert [row[3] for row in rows if row[0].startswith("Clotho")] == ["ok", "ok"]
    assert rows[-1][0] == "2-GPU accelerate launch" and rows[-1][3].startswith("skipped")
