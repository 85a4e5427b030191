"""Load on the app: concurrent `gradio_client` clients searching a 2,000-file library through `/search`.

    python benchmarks/app_load.py --model outputs/demo/model [--files 2000] [--clients 8] [--searches 25]

Builds (once, under `--work_dir`) a library of `--files` synthetic clips (`synthetic_sounds.render`, 1-4 s each, random
attributes) embedded with `--model`, starts `app.py` on it in its own process, then runs `--clients` threads, each
with its own `gradio_client.Client`, each sending `--searches` text queries (synthetic captions) one after another.
Prints the machine, the errors (must be 0), the latency of one search as a client sees it (p50, p99, max: queueing
included, since the app serves one search at a time) and the searches per second. Without `--model`, a model with
the demo's architecture and random weights is saved and used (latency does not depend on the weights).
"""

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from bench_utils import machine_info, print_machine  # noqa: E402


def random_model(directory: str) -> str:
    """The demo preset's architecture (small random BEATs, MiniLM Q-Former, 16 queries), saved once."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    import torch
    from transformers import AutoTokenizer

    from configuration_audio_qformer import BeatsConfig
    from audio_qformer.building import default_bert_checkpoint, from_components
    from modeling_audio_qformer import AudioQFormerModel
    from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor
    from train import DEMO_BEATS, PRESETS

    torch.manual_seed(0)
    demo = PRESETS["demo"]
    model = from_components(BeatsConfig(**DEMO_BEATS), num_query_tokens=demo["num_query_tokens"],
                                              num_qformer_layers=demo["num_qformer_layers"])  # fmt: skip
    model.save_pretrained(directory)
    AudioQFormerProcessor(BeatsFeatureExtractor(), AutoTokenizer.from_pretrained(default_bert_checkpoint())).save_pretrained(directory)
    return directory


def make_sounds(directory: str, count: int, seed: int = 0) -> list[str]:
    """`count` clips of random attributes and lengths, and one caption of each (the queries)."""
    import soundfile

    from audio_qformer.synthetic_sounds import SAMPLING_RATE, all_attribute_sets, captions_for, render

    rng = np.random.default_rng(seed)
    sets = all_attribute_sets()
    os.makedirs(directory, exist_ok=True)
    captions = []
    for i in range(count):
        attributes = sets[int(rng.integers(len(sets)))]
        path = os.path.join(directory, f"clip_{i:05d}.wav")
        if not os.path.exists(path):
            soundfile.write(path, render(attributes, float(rng.uniform(1, 4)), rng), SAMPLING_RATE)
        captions.append(captions_for(attributes, 1, rng)[0])
    return captions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="A saved model (default: the demo architecture with random weights).")
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--searches", type=int, default=25, help="Searches per client.")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--work_dir", default="outputs/app_load")
    args = parser.parse_args()

    work = os.path.abspath(args.work_dir)
    model = args.model or random_model(os.path.join(work, "model"))
    started = time.perf_counter()
    captions = make_sounds(os.path.join(work, f"sounds-{args.files}"), args.files)
    model_tag = hashlib.blake2b(os.path.abspath(model).encode(), digest_size=4).hexdigest()  # one library per model
    library = os.path.join(work, f"library-{args.files}-{model_tag}")
    port = free_port()
    log_path = os.path.join(work, "app.log")
    app = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "app.py"), "--model", model, "--library", library, "--sounds",
         os.path.join(work, f"sounds-{args.files}"), "--port", str(port)],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:  # indexing first (a progress bar in app.log), then the server
            if app.poll() is not None:
                sys.exit(f"app.py exited with {app.returncode}; see {log_path}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(1)
        print(f"Library of {args.files} files ready and served in {time.perf_counter() - started:.0f} s ({library})")
        from gradio_client import Client

        latencies, errors, lock = [], [], threading.Lock()
        rng = np.random.default_rng(1)
        queries = [[captions[int(i)] for i in rng.integers(len(captions), size=args.searches)] for _ in range(args.clients)]
        Client(url, verbose=False).predict(captions[0], args.k, False, api_name="/search")  # warm-up

        def client_loop(own_queries):
            client = Client(url, verbose=False)
            for query in own_queries:
                start = time.perf_counter()
                try:
                    hits = client.predict(query, args.k, False, api_name="/search")
                    if len(hits) != args.k:
                        raise ValueError(f"{len(hits)} hits")
                    ok = True
                except Exception as error:  # counted, not fatal: the figure is how many fail
                    ok = False
                    with lock:
                        errors.append(f"{type(error).__name__}: {error}")
                with lock:
                    latencies.append((time.perf_counter() - start, ok))

        threads = [threading.Thread(target=client_loop, args=(q,)) for q in queries]
        wall = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - wall
    finally:
        app.terminate()
        app.wait(30)

    seconds = np.array([t for t, ok in latencies if ok]) * 1000
    print_machine(machine_info())
    print(f"{args.clients} clients x {args.searches} searches (k={args.k}) against {args.files} files, model {model}")
    print("| errors | p50 ms | p99 ms | max ms | searches/s |\n|---|---|---|---|---|")
    print(f"| {len(errors)} of {len(latencies)} | {np.percentile(seconds, 50):.0f} | {np.percentile(seconds, 99):.0f} | "
          f"{seconds.max():.0f} | {len(latencies) / wall:.1f} |")  # fmt: skip
    for error in errors[:5]:
        print("  error:", error)


if __name__ == "__main__":
    main()
