"""A sound library under faults: one process of a 2-process `index` launch killed, a disk that fills up during `index`,
and `search` while `index` is appending. Each ends with a library equal to an uninterrupted one."""

import builtins
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
from conftest import ROOT, make_waveform
from test_search import KilledProcessOne, saved_model, sounds  # noqa: F401 (the fixtures, shared)

from audio_qformer.library import AudioLibrary, LibraryDiskFullError, load_model
from audio_qformer.cli import main


ENV = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "audio_qformer.cli"]


@pytest.fixture(scope="module")
def many_sounds(tmp_path_factory):
    """24 clips of 1 to 3.8 s: enough batches that a run can be stopped half-way."""
    folder = tmp_path_factory.mktemp("many")
    for i in range(24):
        soundfile.write(folder / f"clip{i:02d}.wav", make_waveform(1.0 + (i % 5) * 0.7, seed=i), 16000)
    return folder


def stored_lines(path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def assert_equal_libraries(library: AudioLibrary, reference: AudioLibrary, atol: float = 0.0):
    """Same files, windows and embeddings (within `atol`), every window's tokens, one shard, no duplicates, no gaps."""
    assert library.stored_files() == reference.stored_files()
    assert sorted(library.embeddings.keys()) == sorted(reference.embeddings.keys())
    for key in reference.embeddings.keys():
        np.testing.assert_allclose(library.embeddings.get(key).astype(np.float32),
                                   reference.embeddings.get(key).astype(np.float32), atol=atol)  # fmt: skip
        assert library.embeddings.metadata(key) == reference.embeddings.metadata(key)
        if library.config["keep_tokens"]:
            assert all(f"{key}#{i}" in library.tokens for i in range(len(library.embeddings.metadata(key)["starts"])))
    rows = sorted(library.embeddings.location(key) for key in library.embeddings.keys())
    assert {shard for shard, _, _ in rows} == {0}
    assert [offset for _, offset, _ in rows] == list(np.cumsum([0] + [length for _, _, length in rows[:-1]]))
    assert library.embeddings.shard_array(0).shape[0] == sum(length for _, _, length in rows)
    leftovers = [n for _, _, names in os.walk(library.directory) for n in names if n.endswith((".partial", ".tmp"))]
    assert leftovers == []


# --- a process of a launch killed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("killed", [1, 0])
def test_a_launch_with_one_process_killed_is_completed_by_the_next_run(killed, saved_model, many_sounds, tmp_path,
                                                                       capsys):  # fmt: skip
    """
    SIGKILL one process of `accelerate launch --num_processes 2 ... index` (process 1, or the main process, which holds
    the lock) once it has stored a file. The launcher's agent then stops the survivor (SIGTERM) and exits non-zero at
    once: nobody waits at a barrier for the dead process. A plain rerun embeds only the files neither process stored
    and moves the launch's shards into one.
    """
    psutil = pytest.importorskip("psutil")  # installed with accelerate
    library_dir = tmp_path / "lib"
    command = [*LAUNCH_TWO, "--library", str(library_dir), "index", str(many_sounds), "--model", saved_model,
               "--keep_tokens", "--batch_size", "1"]  # fmt: skip
    launch = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, worker = time.time() + 120, None
        while worker is None and launch.poll() is None and time.time() < deadline:  # the agent's child of that RANK
            for child in psutil.Process(launch.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == str(killed):
                        worker = child
                except psutil.Error:  # not started yet, or gone
                    pass
            time.sleep(0.05)
        assert worker is not None, f"process {killed} of the launch did not start"
        its_shard = library_dir / "embeddings" / f"shard-{killed}.jsonl"
        while stored_lines(its_shard) < 1 and launch.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        worker.send_signal(signal.SIGKILL)
        killed_at = time.time()
        output, _ = launch.communicate(timeout=60)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert time.time() - killed_at < 30  # the survivor did not hang
    assert launch.returncode != 0 and "Signal 9 (SIGKILL) received by PID" in output, output[-3000:]
    assert 1 <= stored_lines(its_shard) < 12  # killed during its share of 12 files

    model, processor = load_model(saved_model)
    stored = len(AudioLibrary(str(library_dir), model, processor).embeddings)  # both processes' shards
    assert main(["--library", str(library_dir), "index", str(many_sounds)]) == 0
    assert f"{24 - stored} embedded, {stored} already indexed" in capsys.readouterr().out
    one = AudioLibrary(str(tmp_path / "one"), model, processor, saved_model, create=True)
    one.index(str(many_sounds), batch_size=1, show_progress=False)
    resumed = AudioLibrary(str(library_dir), model, processor)
    assert_equal_libraries(resumed, one, atol=2e-3)  # the launch's processes ran with other thread counts
    assert [h.path for h in resumed.search(["a tone"], k=24)[0]] == [h.path for h in one.search(["a tone"], k=24)[0]]


# --- a full disk -----------------------------------------------------------------------------------------------------


class SimulatedDisk:
    """
    Files opened for writing under `root` share `free` bytes, as on a nearly full disk: a write that does not fit
    writes what does, then raises `OSError(ENOSPC)`, as write(2) does. Python's file objects write through C code that
    cannot be patched, so `builtins.open` is the lowest layer patched (the library and the cache call it). With
    `only`, just files whose name ends so are on the full disk.
    """

    real_open = builtins.open

    def __init__(self, root: str, free: int, only: str | None = None):
        self.root, self.free, self.only = os.path.abspath(root), free, only

    def open(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            path = os.path.abspath(file)
            if path.startswith(self.root + os.sep) and (self.only is None or path.endswith(self.only)):
                return FileOnSimulatedDisk(self, handle)
        return handle


class FileOnSimulatedDisk:
    def __init__(self, disk: SimulatedDisk, handle):
        self.disk, self.handle = disk, handle

    def write(self, data):
        fits = min(len(data), self.disk.free)
        self.handle.write(data[:fits])
        self.disk.free -= fits
        if fits < len(data):
            self.handle.flush()  # what fitted is on the disk, as after a short write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


@pytest.mark.parametrize("room", ["half of a block", "one index line and a half"])
def test_appending_again_after_a_full_disk_stores_each_entry_once_where_its_index_says(room, tmp_path, monkeypatch):
    """A write that failed half-way and the same items appended again once there is room: what was cut is cut off
    rather than appended after, and an entry written whole is not stored twice."""
    from audio_qformer.store import ArrayStore

    cache = ArrayStore(str(tmp_path), "store", 4)
    blocks = [(f"k{i}", np.full((i + 1, 4), i, np.float16), {"n": i}) for i in range(3)]
    cache.append(blocks[:1])
    k1_line = len(json.dumps({"n": 1, "key": "k1", "offset": 1, "length": 2})) + 1
    free = {"half of a block": (2 + 3 // 2) * 8,  # k1's rows (2 x 4 float16), half of k2's: no index line
            "one index line and a half": (2 + 3) * 8 + k1_line + 10}[room]  # all rows, k1's line, part of k2's
    monkeypatch.setattr(builtins, "open", SimulatedDisk(str(tmp_path), free).open)
    with pytest.raises(OSError, match="No space left"):
        cache.append(blocks[1:])
    monkeypatch.setattr(builtins, "open", SimulatedDisk.real_open)
    assert ArrayStore(str(tmp_path), "store", 4).keys() == ["k0", "k1"][: 1 + (room != "half of a block")]
    cache.append(blocks[1:])
    reopened = ArrayStore(str(tmp_path), "store", 4)
    for view in (cache, reopened):
        assert view.keys() == ["k0", "k1", "k2"] and view.shard_array(0).shape == (6, 4)  # 1 + 2 + 3 rows, none twice
        for key, block, extra in blocks:
            assert np.array_equal(view.get(key), block) and view.metadata(key) == extra


@pytest.fixture(params=["simulated", "tmpfs"])
def nearly_full_disk(request, tmp_path, monkeypatch):
    """
    A folder for a library and `fill(free_bytes)` / `free()`, which leave that little space on its disk and give it
    back: a simulated disk (`SimulatedDisk`; always), or a real tmpfs of 1 MiB filled by a file (needs mount rights).
    """
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "simulated":

        def fill(free_bytes):
            monkeypatch.setattr(builtins, "open", SimulatedDisk(str(folder), free_bytes).open)

        def free():
            monkeypatch.setattr(builtins, "open", SimulatedDisk.real_open)

        yield folder, fill, free
        return
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                                 text=True)  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no `mount` command here: the simulated disk stands in for a full tmpfs")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    filler = folder / "filler"

    def fill(free_bytes):
        stats = os.statvfs(folder)
        with open(filler, "wb") as handle:
            handle.write(b"\0" * (stats.f_bavail * stats.f_frsize - free_bytes))

    try:
        yield folder, fill, lambda: filler.unlink()
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_stops_index_with_a_clear_error_and_a_rerun_completes_it(nearly_full_disk, saved_model, sounds,
                                                                            many_sounds, tmp_path, capsys):  # fmt: skip
    """
    The disk fills up during `index`: exit code 2 with a message naming the library and the full disk; the library
    searches as before (no half-written entry shows), and a rerun once space is freed ends equal to an uninterrupted
    run.
    """
    folder, fill, free = nearly_full_disk
    library_dir = folder / "lib"
    index = ["--library", str(library_dir), "index", str(many_sounds), "--batch_size", "2"]
    assert main(["--library", str(library_dir), "index", str(sounds), "--model", saved_model, "--keep_tokens"]) == 0
    model, processor = load_model(saved_model)
    before = [(h.path, h.score) for h in AudioLibrary(str(library_dir), model, processor).search(["a tone"], k=30)[0]]
    assert len(before) == 6
    capsys.readouterr()

    fill(60_000)  # room for about a third of the new files' tokens and embeddings
    assert main(index) == 2
    error = capsys.readouterr().err
    assert (f"\naudio-qformer: error: The disk holding the library {library_dir} is full (No space left on device): "
            "free some space there, then run `audio-qformer index` again") in error
    library = AudioLibrary(str(library_dir), model, processor)
    assert [(h.path, h.score) for h in library.search(["a tone"], k=30)[0]] == before
    whole = AudioLibrary(str(tmp_path / "whole"), model, processor, saved_model, create=True)
    whole.index(str(sounds), show_progress=False)
    whole.index(str(many_sounds), batch_size=2, show_progress=False)
    new = len(library.embeddings) - 6
    assert 0 < new < 24, new  # stopped half-way
    for key in library.embeddings.keys():  # what the stopped run stored is whole
        np.testing.assert_array_equal(library.embeddings.get(key), whole.embeddings.get(key))

    free()
    assert main(index) == 0
    assert f"{24 - new} embedded, {new} already indexed" in capsys.readouterr().out
    assert_equal_libraries(AudioLibrary(str(library_dir), model, processor), whole)


def test_a_full_disk_while_writing_the_library_files_keeps_them_whole(saved_model, sounds, many_sounds, tmp_path,
                                                                      monkeypatch, capsys):  # fmt: skip
    """`library.json` and `files.json` are replaced through a `.partial` copy: a full disk leaves the old one whole and
    no `.partial` behind."""
    library_dir = tmp_path / "lib"
    model, processor = load_model(saved_model)
    monkeypatch.setattr(builtins, "open", SimulatedDisk(str(tmp_path), 0).open)
    with pytest.raises(LibraryDiskFullError, match=f"The disk holding the library {library_dir} is full") as full:
        AudioLibrary(str(library_dir), model, processor, saved_model, create=True)
    assert full.value.errno == errno.ENOSPC and os.listdir(library_dir) == []  # no library.json, whole or half
    monkeypatch.setattr(builtins, "open", SimulatedDisk.real_open)
    assert main(["--library", str(library_dir), "index", str(sounds), "--model", saved_model]) == 0
    file_list = (library_dir / "files.json").read_bytes()

    monkeypatch.setattr(builtins, "open", SimulatedDisk(str(library_dir), 100, only="files.json.partial").open)
    assert main(["--library", str(library_dir), "index", str(many_sounds)]) == 2  # every file stored, not listed
    assert "is full" in capsys.readouterr().err
    assert (library_dir / "files.json").read_bytes() == file_list
    assert not [n for n in os.listdir(library_dir) if n.endswith(".partial")]
    assert len(AudioLibrary(str(library_dir), model, processor).search(["a tone"], k=30)[0]) == 6
    monkeypatch.setattr(builtins, "open", SimulatedDisk.real_open)
    assert main(["--library", str(library_dir), "index", str(many_sounds)]) == 0
    assert "0 embedded, 24 already indexed" in capsys.readouterr().out
    assert len(AudioLibrary(str(library_dir), model, processor).search(["a tone"], k=30)[0]) == 30


# --- searching while indexing ----------------------------------------------------------------------------------------


def test_search_while_index_appends_sees_complete_files_only(saved_model, sounds, many_sounds, tmp_path):
    """
    `search` (a library opened again for each query, as each `audio-qformer search` does, and one opened before) while
    an `index` run in another process appends: never an error, and the hits are files the library listed, each with
    the score it has once the run is over (a library equal to an uninterrupted one, see above).
    """
    model, processor = load_model(saved_model)
    library_dir = str(tmp_path / "lib")
    AudioLibrary(library_dir, model, processor, saved_model, create=True).index(str(sounds), show_progress=False)
    opened_before = AudioLibrary(library_dir, model, processor)

    command = [sys.executable, "-m", "audio_qformer.cli", "--library", library_dir, "index", str(many_sounds),
               "--batch_size", "1"]  # fmt: skip
    run = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    appended = tmp_path / "lib" / "embeddings" / "shard-0.jsonl"
    at_start, during, seen = stored_lines(appended), 0, []
    while run.poll() is None:
        if stored_lines(appended) == at_start:  # still starting: leave it the CPU
            time.sleep(0.05)
            continue
        for library in (AudioLibrary(library_dir, model, processor), opened_before):
            seen.append([(hit.path, hit.score) for hit in library.search(["a tone"], k=30)[0]])
        during += at_start < stored_lines(appended) < 6 + 24 and run.poll() is None
        time.sleep(0.05)  # leave the run some of the CPU
    assert run.wait() == 0, run.stdout.read().decode()[-2000:]
    assert during >= 1  # some searches ran while the run was appending
    assert {len(hits) for hits in seen} <= {6, 30}  # the files listed before the run, or after it
    final = {hit.path: hit.score for hit in AudioLibrary(library_dir, model, processor).search(["a tone"], k=30)[0]}
    assert len(final) == 30
    for hits in seen:  # each hit a complete file: scored as in the finished library
        assert all(score == pytest.approx(final[path], abs=1e-4) for path, score in hits)


def test_a_library_opened_while_a_run_finishes_lists_only_files_it_found_stored(saved_model, sounds, many_sounds,
                                                                                 tmp_path, monkeypatch):  # fmt: skip
    """
    The race behind `AudioLibrary.__init__` reading `files.json` first: a killed launch left process 1's files in shard
    1; a search opens the library just as the rerun moves them into shard 0 and lists them. Read in the other order,
    the entries (still in shard 1) and then the new list, search would refuse the library as unfinished.
    """
    import accelerate.utils

    from audio_qformer import library as audio_library
    from audio_qformer.store import ArrayStore

    model, processor = load_model(saved_model)
    library_dir = str(tmp_path / "lib")
    library = AudioLibrary(library_dir, model, processor, saved_model, create=True)
    library.index(str(sounds), show_progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: objects)
        with pytest.raises(KeyboardInterrupt):
            library.index(str(many_sounds), show_progress=False, state=KilledProcessOne())
    assert {library.embeddings.location(key)[0] for key in library.embeddings.keys()} == {0, 1}

    rerun = AudioLibrary(library_dir, model, processor)

    class RerunFinishesMeanwhile(ArrayStore):  # the rerun consolidates and lists the files once the search has
        finished = False  # read the stored embeddings

        def __init__(self, root, name, hidden_size):
            super().__init__(root, name, hidden_size)
            if name == "embeddings" and not RerunFinishesMeanwhile.finished:
                RerunFinishesMeanwhile.finished = True
                rerun.index(str(many_sounds), show_progress=False)

    monkeypatch.setattr(audio_library, "ArrayStore", RerunFinishesMeanwhile)
    searching = AudioLibrary(library_dir, model, processor)
    assert RerunFinishesMeanwhile.finished
    assert len(searching.search(["a tone"], k=30)[0]) == 6  # the library as it was listed when opened
    assert len(AudioLibrary(library_dir, model, processor).search(["a tone"], k=30)[0]) == 30
