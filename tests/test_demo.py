"""The front door: `demo.py` end to end at tiny sizes (generate, train through accelerate, evaluate, reload, search)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_demo_end_to_end_small(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    work = tmp_path / "demo"
    result = subprocess.run([sys.executable, "demo.py", "--small", "--work_dir", str(work)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in ("1. Generate", "2. Extract BEATs features and train", "3. Evaluate", "4. Reload", "5. Index", "6. Search"):
        assert step in out
    # The Table 1 layout with both systems and chance, and the JSON beside it.
    assert "| ATC " in out and "| ATC + re-rank top 16" in out and "| chance" in out
    assert "Captioning on library: 12 clips" in out and "| sound |" in out and out.count("model's caption: ") == 12
    table = json.loads((work / "table.json").read_text())
    assert table["clips"] == 12 and table["queries"] == 36
    assert set(table["results"]) == {"ATC", "ATC + re-rank top 16"}
    # The fresh-process reload gives the CLI's stored embedding (float16 storage).
    line = next(line for line in out.splitlines() if line.startswith("Reloaded as"))
    assert float(line.split("at most ")[1].split()[0]) < 5e-3
    # Each query lists three files with their captions, and the closing commands are there.
    assert out.count("    1. clip_") == 4 and out.count("    3. clip_") == 4
    assert "audio-qformer --library my-library search" in out and "--preset stage1" in out
    # It ends with the one command that opens the app on the demo's model and library.
    command = out.strip().splitlines()[-1].split()
    assert command[1:] == ["app.py", "--model", str(work / "model"), "--library", str(work / "library")]
    assert os.path.samefile(command[0] if os.path.isabs(command[0]) else os.path.join(ROOT, command[0]), sys.executable)

    # A rerun reuses the data, the cache and the finished training.
    again = subprocess.run([sys.executable, "demo.py", "--small", "--work_dir", str(work)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 embedded, 12 already indexed" in again.stdout
    steps = [json.loads(line)["step"] for line in (work / "model" / "train_log.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and "Done: 4 steps" in again.stdout  # the finished training is not stepped again
    assert json.loads((work / "table.json").read_text())["results"] == table["results"]
