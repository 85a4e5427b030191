"""The three files that ship to the Hub as remote code: public torch only, no other project module, loadable alone."""

import ast
import os
import shutil
import subprocess
import sys
import textwrap

import torch
from conftest import ROOT, TINY_BEATS, make_waveform
from safetensors.torch import save_file

from configuration_audio_qformer import BeatsConfig


HUB_FILES = ("configuration_audio_qformer.py", "modeling_audio_qformer.py", "processing_audio_qformer.py")
# Saved beside them to serve a model folder as an Inference Endpoint (`AudioQFormerModel.endpoint_files`).
ENDPOINT_FILES = ("handler.py", "audio_io.py")


def project_modules() -> set[str]:
    """Every importable module of this repository: its top-level .py files and its package."""
    return {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")} | {"audio_qformer"}


def test_shipped_files_use_public_torch_and_import_only_each_other():
    own = project_modules()
    # The model and the processor need only the configuration; it needs nothing of the project.
    allowed = {"configuration_audio_qformer.py": set(), "modeling_audio_qformer.py": {"configuration_audio_qformer"},
               "processing_audio_qformer.py": {"configuration_audio_qformer"}, "handler.py": {"audio_io"},
               "audio_io.py": set()}  # fmt: skip
    for filename in HUB_FILES + ENDPOINT_FILES:
        source = open(os.path.join(ROOT, filename)).read()
        for private in ("torch.ops", "torch._C", "mkldnn"):
            assert private not in source, f"{filename} names {private}"
        imported = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert imported & own <= allowed[filename], f"{filename} imports {sorted(imported & own - allowed[filename])}"


def saved_tiny_model(directory):
    """A tiny model and its processor, saved to `directory` (weights, config, tokenizer and the three code files)."""
    from transformers import AutoTokenizer

    from audio_qformer.building import from_components

    from modeling_audio_qformer import AudioQFormerModel

    from audio_qformer.building import default_bert_checkpoint
    from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor

    torch.manual_seed(0)
    model = from_components(BeatsConfig(**TINY_BEATS), num_query_tokens=4).eval()
    processor = AudioQFormerProcessor(BeatsFeatureExtractor(), AutoTokenizer.from_pretrained(default_bert_checkpoint()))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


# Run in a fresh interpreter first: every module of this repository becomes unimportable, as on a user's machine.
REFUSE_PROJECT_MODULES = """
import importlib.abc, sys
BLOCKED = {blocked!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"project module {{name}} is not available here")

sys.meta_path.insert(0, Refuse())
sys.path = [p for p in sys.path if p not in ("", {root!r})]
"""


def run_isolated(code: str, cwd) -> subprocess.CompletedProcess:
    preamble = REFUSE_PROJECT_MODULES.format(blocked=sorted(project_modules()), root=ROOT)
    return subprocess.run([sys.executable, "-c", preamble + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})  # fmt: skip


def test_hub_files_alone_load_through_the_auto_classes(tmp_path):
    """The three files and a saved model in an empty folder, every other project module unimportable."""
    saved, folder = tmp_path / "saved", tmp_path / "hub-repo"
    model, processor = saved_tiny_model(saved)
    folder.mkdir()
    for name in os.listdir(saved):  # the weights, config and tokenizer; the code from the repository itself
        if not name.endswith(".py"):
            shutil.copy(saved / name, folder / name)
    for name in HUB_FILES:
        shutil.copy(os.path.join(ROOT, name), folder / name)

    clip = make_waveform(1.3, seed=2)
    inputs = processor(text=["a tone", "rain on a roof"], audio=clip, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_audio
    save_file({"clip": torch.from_numpy(clip), "logits": expected.contiguous()}, tmp_path / "expected.safetensors")
    result = run_isolated(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoProcessor
        folder = {str(folder)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        inputs = processor(text=["a tone", "rain on a roof"], audio=expected["clip"].numpy(), sampling_rate=16000,
                           return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits_per_audio
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
        print("OK", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "OK []", result.stdout


def test_readme_python_api_example_runs_with_transformers_only(tmp_path):
    """The README's "Python API in ten lines", run as written on a saved model, from another folder."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Python API in ten lines") :]
    example = section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]
    saved = tmp_path / "model"
    model, processor = saved_tiny_model(saved)
    assert '"outputs/demo/model"' in example
    clips = [make_waveform(1.0, seed=1), make_waveform(0.6, seed=2, kind="chirp")]
    save_file({f"clip{i}": torch.from_numpy(c) for i, c in enumerate(clips)}, tmp_path / "clips.safetensors")
    result = run_isolated(
        "from safetensors.torch import load_file\n"
        f"waveforms = [w.numpy() for w in load_file({str(tmp_path / 'clips.safetensors')!r}).values()]\n"
        + example.replace('"outputs/demo/model"', repr(str(saved)))
        + "\nprint(tuple(scores.shape), tuple(itm.shape))\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "(2, 1) (2, 2)", result.stdout
