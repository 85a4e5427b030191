"""Helpers shared by the speed benchmarks: machine description, interleaved timing, an older revision of a module.

Timings on a shared machine are noisy, so every benchmark times its sides in one process, alternating them (the order
rotates every repeat) and reports the median of each side, and the ratios of those medians.
"""

import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each library's instruction-set cap: run as on a CPU with AVX2 and no more (torch's own kernels, oneDNN, MKL, fbgemm).
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device=None) -> dict:
    """CPU model, cores, library versions, torch threads and the load average when called; the GPU's name if `device`
    is a CUDA device."""
    import numpy as np
    import torch

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    # Thread settings from the environment (numpy's OpenBLAS reads OPENBLAS_NUM_THREADS, torch OMP_NUM_THREADS).
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if name in os.environ:
            info[name] = os.environ[name]
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = [round(value, 2) for value in os.getloadavg()]
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_machine(info: dict) -> None:
    print(
        f"machine: {info['cpu']}, {info['cpus_available']} of {info['logical_cpus']} CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads, {info['torch_cpu_capability']}), numpy {info['numpy']}, "
        f"load average {info.get('load_average_1_5_15min')}"
        + "".join(f", {name}={info[name]}" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if name in info)
    )
    if "gpu" in info:
        print(f"GPU: {info['gpu']}")


def interleaved_timing(
    sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """
    Wall-clock seconds of every call of every side, the sides alternating: each repeat runs every side once, in an
    order rotated by one each repeat, so that a burst of load from other processes hits all sides alike.
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    seconds = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            sides[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(header: list[str], rows: list[list]) -> None:
    """A plain Markdown table (pastes into RESULTS.md as is)."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    for index, row in enumerate(cells):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


def import_module_at_revision(revision: str, filename: str, module_name: str):
    """
    Import `filename` (a top-level module of this repository) as it was at git `revision`, under `module_name`.

    The file is written to a temporary directory and imported from there; its own imports of the other top-level
    modules (`configuration_audio_qformer`, ...) resolve to the current ones.
    """
    source = subprocess.run(
        ["git", "-C", ROOT, "show", f"{revision}:{filename}"], check=True, capture_output=True, text=True
    ).stdout
    directory = tempfile.mkdtemp(prefix="baseline-")
    path = os.path.join(directory, f"{module_name}.py")
    with open(path, "w") as handle:
        handle.write(source)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
