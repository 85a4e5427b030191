"""
What the app's HTTP server hands out, asked as an attacker would (`http.client`, paths sent as typed): the library's
indexed audio and the clips uploaded to it, nothing else; and the limits on what one request may send.
"""

import http.client
import json
import os
import subprocess
import sys
from urllib.parse import quote

import pytest
import soundfile
from conftest import ROOT, make_waveform
from test_app import free_port, saved_model, wait_for_server  # noqa: F401 (fixtures shared with the app tests)

from audio_qformer.library import AudioLibrary, load_model


gr = pytest.importorskip("gradio")
SECRET = b"SECRET-7f3a: a token that must never leave the machine"


def write_clip(path, seconds, seed):
    soundfile.write(path, make_waveform(seconds, seed=seed), 16000)


@pytest.fixture(scope="module")
def home(saved_model, tmp_path_factory):  # noqa: F811
    """
    A home folder whose `sounds/` is indexed, with secrets beside it, above it, behind symlinks in it, and a
    library import that names files it never indexed.
    """
    home = tmp_path_factory.mktemp("home")
    sounds, outside = home / "sounds", home / "outside"
    sounds.mkdir()
    outside.mkdir()
    for i in range(3):
        write_clip(sounds / f"clip{i}.wav", 1.0 + i, seed=i)
    (sounds / "secret.txt").write_bytes(SECRET)
    (sounds / ".env").write_bytes(SECRET)
    (home / ".env").write_bytes(SECRET)
    write_clip(outside / "private.wav", 2.0, seed=11)  # audio outside the indexed folder
    write_clip(outside / "imported.wav", 2.0, seed=12)
    (sounds / "linked.wav").symlink_to(outside / "private.wav")  # an audio file: indexed, but it leads out
    (sounds / "linked-secret").symlink_to(home / ".env")
    library = AudioLibrary(str(home / "lib"), *load_model(saved_model), saved_model, create=True)
    library.index(str(sounds), show_progress=False)
    assert {os.path.basename(f["path"]) for f in library.stored_files()} == {"clip0.wav", "clip1.wav", "clip2.wav",
                                                                             "linked.wav"}  # fmt: skip
    # An export from elsewhere, imported: its rows name an audio file here and the secret beside the indexed audio.
    exported = library.to_dataset(cache_dir=str(tmp_path_factory.mktemp("export-cache")))
    named = {"clip0.wav": str(outside / "imported.wav"), "clip1.wav": str(sounds / "secret.txt")}
    exported = exported.filter(lambda row: os.path.basename(row["path"]) in named).map(
        lambda row: {"path": named[os.path.basename(row["path"])], "file_key": "f:" + row["file_key"][2:][::-1]}
    )
    AudioLibrary.from_dataset(exported, library.directory)
    library = AudioLibrary.load(library.directory, saved_model)
    assert {os.path.basename(f["path"]) for f in library.stored_files()} >= {"imported.wav", "secret.txt"}
    return home, library


@pytest.fixture(scope="module")
def server(home, saved_model, tmp_path_factory):  # noqa: F811
    _, library = home
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "app.log"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--model", saved_model, "--library",
                                library.directory, "--port", str(port), "--max_upload_mb", "1"],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for_server(f"http://127.0.0.1:{port}/", process)
        yield port
    finally:
        process.terminate()
        process.wait(30)


def get(port, path, headers=None, method="GET", body=None):
    """The server's answer to `path` exactly as written (no client-side normalisation of `..`)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read(), dict(response.getheaders())


def refused_paths(home, library, saved_model):  # noqa: F811
    """Every file the server must not hand out, by what it is."""
    home_dir = home
    return {
        "a secret beside the indexed audio": str(home_dir / "sounds" / "secret.txt"),
        "a dotfile beside the indexed audio": str(home_dir / "sounds" / ".env"),
        "a secret in the parent folder, through ..": f"{home_dir}/sounds/../.env",
        "a secret in the parent folder": str(home_dir / ".env"),
        "a symlink in the indexed folder to a secret": str(home_dir / "sounds" / "linked-secret"),
        "a symlink in the indexed folder to audio outside": str(home_dir / "sounds" / "linked.wav"),
        "the target of that symlink": str(home_dir / "outside" / "private.wav"),
        "the model's config.json": os.path.join(saved_model, "config.json"),
        "the library's library.json": os.path.join(library.directory, "library.json"),
        "the library's files.json": os.path.join(library.directory, "files.json"),
        "audio that only an imported export names": str(home_dir / "outside" / "imported.wav"),
    }


def gradio_urls(path):
    """The ways Gradio's own routes take a file path."""
    return [f"/gradio_api/file={path}", f"/gradio_api/file={quote(path)}", f"/gradio_api/file/{path}", f"/file={path}"]


def test_the_server_hands_out_nothing_but_the_library_audio(home, server, saved_model):  # noqa: F811
    from gradio_client import Client

    home_dir, library = home
    answers = {}
    for what, path in refused_paths(home_dir, library, saved_model).items():
        for url in gradio_urls(path):
            status, body, _ = get(server, url)
            answers[what, url] = status
            assert status in (403, 404), (what, url, status)
            assert SECRET not in body and b"RIFF" not in body, (what, url)
    # The app's own audio route, by key: the files the library lists but must not serve, and made-up keys.
    hits = Client(f"http://127.0.0.1:{server}/", verbose=False).predict("a rising whistle", 50, False, api_name="/search")
    by_name = {os.path.basename(hit["file"]): hit for hit in hits}
    assert set(by_name) == {"clip0.wav", "clip1.wav", "clip2.wav", "linked.wav", "imported.wav", "secret.txt"}
    keys = {name: key for key in library.live_keys() for name in [os.path.basename(library.path_of(key))]}
    for name in ("linked.wav", "imported.wav", "secret.txt"):
        assert by_name[name]["audio_url"] is None, name
        for url in (f"/library-audio/{quote(keys[name], safe='')}/{name}", f"/library-audio/{keys[name]}/{name}"):
            status, body, _ = get(server, url)
            assert status == 404 and SECRET not in body and b"RIFF" not in body, (name, url, status)
    for url in ("/library-audio/f:" + "0" * 32 + "/clip0.wav", "/library-audio/../../.env",
                f"/library-audio/{keys['clip0.wav']}/..%2F..%2F.env", f"/library-audio/{keys['clip0.wav']}/clip1.wav",
                f"/library-audio/{quote(str(home_dir / '.env'), safe='')}/.env"):  # fmt: skip
        status, body, _ = get(server, url)
        assert status in (403, 404) and SECRET not in body and b"RIFF" not in body, (url, status)
    # What it does serve: each indexed clip, whole and by byte range (players seek with ranges).
    for name in ("clip0.wav", "clip1.wav", "clip2.wav"):
        status, body, headers = get(server, "/" + by_name[name]["audio_url"])
        assert status == 200 and body == (home_dir / "sounds" / name).read_bytes(), name
        assert headers["content-type"] in ("audio/wav", "audio/x-wav") and headers["x-content-type-options"] == "nosniff"
    status, body, headers = get(server, "/" + by_name["clip2.wav"]["audio_url"], {"Range": "bytes=100-199"})
    assert status == 206 and body == (home_dir / "sounds" / "clip2.wav").read_bytes()[100:200]
    # A changed file is not the one embedded: refused until it is indexed again.
    changed = home_dir / "sounds" / "clip0.wav"
    original, stat = changed.read_bytes(), os.stat(changed)
    try:
        write_clip(changed, 1.5, seed=99)
        assert get(server, "/" + by_name["clip0.wav"]["audio_url"])[0] == 404
    finally:
        changed.write_bytes(original)
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert get(server, "/" + by_name["clip0.wav"]["audio_url"])[0] == 200
    print("\n".join(f"{status}  {what}: {url}" for (what, url), status in answers.items()))


def upload(port, name: str, data: bytes):
    boundary = "----audio-qformer-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
    return get(port, "/gradio_api/upload", {"Content-Type": f"multipart/form-data; boundary={boundary}"}, "POST", body)


def test_uploads_are_served_back_and_bounded(home, server):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    home_dir, _ = home
    clip = (home_dir / "sounds" / "clip1.wav").read_bytes()
    status, body, _ = upload(server, "mine.wav", clip)
    assert status == 200
    [uploaded] = json.loads(body)
    status, body, _ = get(server, f"/gradio_api/file={uploaded}")
    assert status == 200 and body == clip  # an upload plays back in its player
    # Over the size limit (--max_upload_mb 1): refused by the server before anything is stored.
    status, body, _ = upload(server, "big.wav", b"\0" * (1024 * 1024 + 10))
    assert status == 413, (status, body[:200])
    client = Client(f"http://127.0.0.1:{server}/", verbose=False)
    cases = [
        (("rain " * 201, 3, False, "/search"), "longer than 1000 characters"),
        ((handle_file(str(home_dir / "sounds" / "clip1.wav")), ", ".join(["rain"] * 101), "/classify"),
         "at most 100 labels of 1000 characters each; got 101"),
        ((handle_file(str(home_dir / "sounds" / "clip1.wav")), "rain" * 300, "/classify"), "got 1, the longest 1200"),
        ((handle_file(str(home_dir / "sounds" / "clip1.wav")), "rain" * 30000, "/classify"), "at most 100 labels"),
    ]  # fmt: skip
    for (*inputs, endpoint), message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*inputs, api_name=endpoint)
    # The limits are in the Library tab's text, which the page's config carries.
    status, body, _ = get(server, "/config")
    assert status == 200 and b"uploads up to 1 MB, clips up to 10 minutes" in body
