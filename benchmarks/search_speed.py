"""Search speed: exact search (torch) against `ApproximateAudioIndex` (FAISS IVF-PQ + exact re-scoring).

    python benchmarks/search_speed.py [--sizes 10000 100000 1000000] [--json out.json] [--workdir DIR]

For each library size it reports, per query: the latency of text encoding plus search (p50/p99), the memory a clip
costs in each structure, the index's recall@10 against exact search and its build time; then prints one table
with the machine (CPU, cores, load average, torch/faiss versions) and writes the numbers as JSON.

The libraries are synthetic (`vector_search.clustered_embeddings`: topic centres, clips around them, correlated query
vectors; see its docstring for why not isotropic noise), float16 `.npy` files memory-mapped from `--workdir`,
generated once and reused, like the saved indexes. Queries are `noisy_queries`: one query vector of a random clip
plus as much noise again (cosine ~0.71). `--isotropic_sizes` repeats the measurement on uniformly random vectors,
the worst case for any approximate index.

Text encoding is timed on the real model architecture (`audio_qformer.building.from_components` with the packaged
MiniLM-L6 Q-Former, 32 query tokens, 256-d embeddings; a tiny random BEATs, which the text path never runs) on one
caption per query, separately, and added to each query's search time: the library is synthetic, so the vector
searched is the synthetic query, not the caption's embedding. The machine is shared: every latency loop is repeated
(`--repeats`) and the median of the per-repeat percentiles is reported, with the load average before and after.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audio_qformer.synthetic_embeddings import clustered_embeddings, isotropic_embeddings, noisy_queries  # noqa: E402
from audio_qformer.vector_search import ApproximateAudioIndex, candidate_clips, exact_search  # noqa: E402


NUM_QUERY_TOKENS, EMBED_DIM, K = 32, 256, 10
SOUNDS = ["a dog", "rain", "a car engine", "birds", "a door", "footsteps", "a crowd", "wind", "a bell", "water"]
ACTIONS = [
    "barks loudly", "falls on a tin roof", "idles and then revs", "chirp in the morning", "creaks open slowly",
    "echo in a hallway", "cheers in a stadium", "howls through trees", "rings twice", "drips into a bucket",
]  # fmt: skip
PLACES = ["in the distance", "close to the microphone", "while people talk", "at night", "in a small room"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 1000000], help="Library sizes (clips).")
    parser.add_argument("--isotropic_sizes", type=int, nargs="*", default=[], help="Sizes also run on isotropic noise.")
    parser.add_argument("--json", help="Write the results to this JSON file.")
    parser.add_argument("--workdir", default="/tmp/audio_qformer_search", help="Where libraries and indexes are kept.")
    parser.add_argument("--num_queries", type=int, default=200, help="Queries for recall and the latency loops.")
    parser.add_argument("--exact_seconds", type=float, default=60.0, help="Time budget of the exact latency loop.")
    parser.add_argument("--repeats", type=int, default=3, help="Latency loops per measurement (median is reported).")
    parser.add_argument("--threads", type=int, default=1, help="torch/FAISS threads while searching (see RESULTS).")
    parser.add_argument("--build_threads", type=int, default=os.cpu_count(), help="Threads while building an index.")
    parser.add_argument("--nprobe", type=int, default=None, help="Override the index's nprobe.")
    parser.add_argument("--token_candidates", type=int, default=None, help="Override the index's token_candidates.")
    parser.add_argument("--rescore_clips", type=int, default=None, help="Override the index's rescore_clips.")
    parser.add_argument("--sweep", action="store_true", help="Also measure recall/latency over a grid of settings.")
    parser.add_argument("--hnsw_size", type=int, default=0, help="Also build FAISS HNSW over this many clips' vectors.")
    parser.add_argument("--rebuild", action="store_true", help="Build indexes again instead of loading saved ones.")
    parser.add_argument("--bert", default=None, help="BERT checkpoint of the Q-Former (default: packaged MiniLM-L6).")
    args = parser.parse_args()
    for flag in ("num_queries", "repeats", "threads", "build_threads"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if any(size < K for size in args.sizes + args.isotropic_sizes):
        raise ValueError(f"--sizes must be at least {K} clips, got {args.sizes + args.isotropic_sizes}.")
    return args


# --- measurement helpers ---------------------------------------------------------------------------------------------


def machine_info(args) -> dict:
    import faiss

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "search_threads": args.threads,
        "build_threads": args.build_threads,
        "load_average_start": list(os.getloadavg()),
    }


def set_threads(count: int):
    import faiss

    torch.set_num_threads(count)
    faiss.omp_set_num_threads(count)


def rss_anon_bytes() -> int:
    """Anonymous resident memory of this process (excludes page-cache pages of memory-mapped files)."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def latency_ms(samples: list[list[float]]) -> dict:
    """p50/p99 in ms of per-query seconds, per repeat, then the median over repeats (the machine is shared)."""
    p50 = [np.percentile(run, 50) * 1000 for run in samples]
    p99 = [np.percentile(run, 99) * 1000 for run in samples]
    return {"p50_ms": float(np.median(p50)), "p99_ms": float(np.median(p99)), "queries": len(samples[0]),
            "repeats": len(samples)}  # fmt: skip


def time_each(function, items, repeats: int) -> list[list[float]]:
    """Seconds of `function(item)` for every item, `repeats` times; one untimed warm-up call first."""
    function(items[0])
    runs = []
    for _ in range(repeats):
        run = []
        for item in items:
            start = time.perf_counter()
            function(item)
            run.append(time.perf_counter() - start)
        runs.append(run)
    return runs


def add_runs(first: list[list[float]], second: list[list[float]]) -> list[list[float]]:
    """Per-query sums of two timings of the same queries (text encoding + search), repeat by repeat."""
    return [[a + b for a, b in zip(x, y)] for x, y in zip(first, second)]


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean share of the exact top-k that the approximate top-k contains."""
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found.tolist(), exact.tolist())]))


# --- inputs ----------------------------------------------------------------------------------------------------------


def library(workdir: str, kind: str, size: int) -> tuple[np.ndarray, float | None]:
    """The synthetic library as a float16 memmap, generated into `workdir` on first use (seconds, or None)."""
    path = os.path.join(workdir, f"{kind}_{size}.npy")
    seconds = None
    if not os.path.exists(path):
        generate = clustered_embeddings if kind == "clustered" else isotropic_embeddings
        shape = (size, NUM_QUERY_TOKENS, EMBED_DIM)
        out = np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=np.float16, shape=shape)
        start = time.perf_counter()
        generate(size, out=out)
        out.flush()
        del out
        os.replace(path + ".tmp", path)
        seconds = time.perf_counter() - start
    return np.load(path, mmap_mode="r", allow_pickle=False), seconds


def captions(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        f"{SOUNDS[rng.integers(len(SOUNDS))]} {ACTIONS[rng.integers(len(ACTIONS))]} {PLACES[rng.integers(len(PLACES))]}"
        for _ in range(count)
    ]


def text_encoder(bert: str | None):
    """`encode(caption)`: the processor plus `get_text_features` of the model architecture, MiniLM-L6 by default."""
    from transformers import AutoTokenizer

    from configuration_audio_qformer import BeatsConfig
    from audio_qformer.building import default_bert_checkpoint, from_components
    from modeling_audio_qformer import AudioQFormerModel
    from processing_audio_qformer import AudioQFormerProcessor, BeatsFeatureExtractor
    from audio_qformer.retrieval import tokenize_texts

    tiny_beats = BeatsConfig(embed_dim=24, encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                             encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4)  # fmt: skip
    model = from_components(
        tiny_beats, bert, num_query_tokens=NUM_QUERY_TOKENS, embed_dim=EMBED_DIM
    ).eval()
    processor = AudioQFormerProcessor(BeatsFeatureExtractor(), AutoTokenizer.from_pretrained(bert or default_bert_checkpoint()))

    @torch.no_grad()
    def encode(caption: str) -> torch.Tensor:
        tokens = tokenize_texts(processor, model, [caption])
        return model.get_text_features(**tokens).text_embeds

    return encode


# --- one library -----------------------------------------------------------------------------------------------------


def search_settings(args) -> dict:
    settings = {"nprobe": args.nprobe, "token_candidates": args.token_candidates, "rescore_clips": args.rescore_clips}
    return {name: value for name, value in settings.items() if value is not None}


def load_or_build_index(args, audio, directory: str) -> tuple[ApproximateAudioIndex, dict]:
    """The saved index in `directory`, or a new one built with `--build_threads` and saved there."""
    before = rss_anon_bytes()
    if os.path.exists(os.path.join(directory, "config.json")) and not args.rebuild:
        index = ApproximateAudioIndex.load(directory)
        info = dict(index.metadata.get("build", {}), loaded=True)
    else:
        set_threads(args.build_threads)
        start = time.perf_counter()
        index = ApproximateAudioIndex.build(audio)
        info = {"build_seconds": time.perf_counter() - start, "nlist": int(index.faiss_index.nlist)}
        index.metadata["build"] = info
        index.save(directory, copy_embeddings=False)  # the index refers to the library's .npy: no 16 GB copy
        info = dict(info, loaded=False)
    info["rss_anon_delta_bytes"] = rss_anon_bytes() - before
    info["index_file_bytes"] = os.path.getsize(os.path.join(directory, "index.faiss"))
    return index, info


def sweep(index, queries, exact_indices, args) -> list[dict]:
    """Recall@10 and single-query p50 over a grid of search settings (fewer queries: one repeat of 50)."""
    rows = []
    grid = [(nprobe, 1024, rescore) for nprobe in (16, 32, 64) for rescore in (128, 256, 512, 1024)]
    for nprobe, token_candidates, rescore_clips in grid + [(32, 256, 512), (32, 4096, 512)]:
        settings = dict(nprobe=nprobe, token_candidates=token_candidates, rescore_clips=rescore_clips)
        found = index.search(queries, K, **settings)[1]
        runs = time_each(lambda q: index.search(q[None], K, **settings), queries[:50], 1)
        rows.append(dict(settings, recall_at_10=recall_at_k(found, exact_indices), **latency_ms(runs)))
        print(f"    sweep {rows[-1]}", flush=True)
    return rows


def hnsw_comparison(args, size: int) -> dict:
    """
    A graph index over the same token vectors, for the design choice: HNSW (M=32, 8-bit vectors, efConstruction 40)
    with the same grouping and exact re-scoring of up to 512 clips, on a small library. Reports build time, RAM per
    clip (FAISS' serialised size) and, per number of token neighbours (= efSearch), recall@10 and single-query p50.
    """
    import faiss

    audio, _ = library(args.workdir, "clustered", size)
    queries = torch.from_numpy(noisy_queries(audio, args.num_queries, seed=1)[0])
    exact_indices = exact_search(queries, audio, K)[1]
    set_threads(args.build_threads)
    start = time.perf_counter()
    graph = faiss.index_factory(EMBED_DIM, "HNSW32,SQ8", faiss.METRIC_INNER_PRODUCT)
    graph.train(np.ascontiguousarray(np.asarray(audio[: min(size, 8192)], dtype=np.float32).reshape(-1, EMBED_DIM)))
    for begin in range(0, size, 4096):
        vectors = np.asarray(audio[begin : begin + 4096], dtype=np.float32).reshape(-1, EMBED_DIM)
        graph.add(np.ascontiguousarray(vectors))
    result = {"clips": size, "factory": "HNSW32,SQ8", "build_seconds": time.perf_counter() - start,
              "ram_bytes_per_clip": faiss.serialize_index(graph).nbytes / size, "settings": []}  # fmt: skip
    set_threads(args.threads)
    hnsw = faiss.downcast_index(graph).hnsw
    for candidates in (128, 256, 512):
        hnsw.efSearch = candidates  # at least the number of neighbours asked for

        def search(query):
            approximate, token_ids = graph.search(np.ascontiguousarray(query[None].numpy()), candidates)
            clips = candidate_clips(approximate[0], token_ids[0], NUM_QUERY_TOKENS, 512)
            best = clips[exact_search(query[None], audio[clips], K)[1][0].numpy()]
            return np.pad(best, (0, K - len(best)), constant_values=-1)  # fewer than K clips found

        found = torch.from_numpy(np.stack([search(query) for query in queries]))
        runs = time_each(search, queries[:50], 1)
        row = {"token_candidates": candidates, "efSearch": candidates, "rescore_clips": 512,
               "recall_at_10": recall_at_k(found, exact_indices), **latency_ms(runs)}  # fmt: skip
        result["settings"].append(row)
    print(json.dumps(result, indent=1), flush=True)
    return result


def run_size(args, kind: str, size: int, encode) -> dict:
    print(f"*** {kind} library of {size} clips", flush=True)
    set_threads(args.threads)
    audio, generate_seconds = library(args.workdir, kind, size)
    queries, _ = noisy_queries(audio, args.num_queries, seed=1)
    queries = torch.from_numpy(queries)
    result = {"kind": kind, "clips": size, "generate_seconds": generate_seconds}

    # Ground truth, and exact search's batched throughput.
    start = time.perf_counter()
    exact_scores, exact_indices = exact_search(queries, audio, K)
    result["exact_batch_seconds_per_query"] = (time.perf_counter() - start) / len(queries)

    # Text encoding, one caption per query.
    texts = captions(len(queries))
    text_runs = time_each(encode, texts, args.repeats)
    result["text_encoding"] = latency_ms(text_runs)

    # Exact search, one query at a time, as many queries as fit in --exact_seconds (at least 3).
    start = time.perf_counter()
    exact_search(queries[:1], audio, K)
    per_query = time.perf_counter() - start
    count = int(min(len(queries), max(3, args.exact_seconds / max(per_query, 1e-6) / args.repeats)))
    exact_runs = time_each(lambda q: exact_search(q[None], audio, K), queries[:count], args.repeats)
    result["exact"] = {
        "search": latency_ms(exact_runs),
        "text_plus_search": latency_ms(add_runs(text_runs, exact_runs)),
        "bytes_per_clip": NUM_QUERY_TOKENS * EMBED_DIM * audio.dtype.itemsize,
        "storage": "float16 .npy memmap (page cache)",
    }

    # The approximate index.
    index, build = load_or_build_index(args, audio, os.path.join(args.workdir, f"index_{kind}_{size}"))
    set_threads(args.threads)
    settings = search_settings(args)
    found_scores, found = index.search(queries, K, **settings)
    same = found == exact_indices
    index_runs = time_each(lambda q: index.search(q[None], K, **settings), queries, args.repeats)
    result["index"] = {
        "settings": {"nprobe": index.nprobe, "token_candidates": index.token_candidates,
                     "rescore_clips": index.rescore_clips, **settings},  # fmt: skip
        "factory": index.metadata.get("index_factory"),
        "recall_at_10": recall_at_k(found, exact_indices),
        "scores_equal_exact_where_same_clip": bool(torch.equal(found_scores[same], exact_scores[same])),
        "search": latency_ms(index_runs),
        "text_plus_search": latency_ms(add_runs(text_runs, index_runs)),
        "ram_bytes_per_clip": index.index_nbytes() / size,
        "index_file_bytes_per_clip": build["index_file_bytes"] / size,
        "rss_anon_delta_bytes_per_clip": build["rss_anon_delta_bytes"] / size,
        "disk_bytes_per_clip": index.store_nbytes() / size,
        "build": build,
    }
    if args.sweep:
        result["index"]["sweep"] = sweep(index, queries, exact_indices, args)
    result["rss_anon_bytes"] = rss_anon_bytes()
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del index
    print(json.dumps(result, indent=1), flush=True)
    return result


# --- report ----------------------------------------------------------------------------------------------------------


def table(results: list[dict], machine: dict) -> str:
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; torch {machine['torch']}, "
        f"faiss {machine['faiss']}, numpy {machine['numpy']}; search threads {machine['search_threads']}, build "
        f"threads {machine['build_threads']}; load average {machine['load_average_start'][0]:.1f} at start, "
        f"{machine['load_average_end'][0]:.1f} at end (shared machine: latencies are medians of repeats).",
        "",
        "| library | clips | method | text+search p50 / p99 (ms) | search p50 / p99 (ms) | recall@10 | RAM B/clip "
        "| disk B/clip | build (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        text = r["text_encoding"]
        exact, index = r["exact"], r["index"]
        lines.append(
            f"| {r['kind']} | {r['clips']:,} | exact (torch, {exact['search']['queries']} q) | "
            f"{exact['text_plus_search']['p50_ms']:.1f} / {exact['text_plus_search']['p99_ms']:.1f} | "
            f"{exact['search']['p50_ms']:.1f} / {exact['search']['p99_ms']:.1f} | 1 | {exact['bytes_per_clip']:,} "
            f"(page cache) | {exact['bytes_per_clip']:,} | - |"
        )
        build = index["build"].get("build_seconds")
        build = f"{build:.0f}" if build is not None else "?"
        lines.append(
            f"| {r['kind']} | {r['clips']:,} | index {index['factory']} {index['settings']} | "
            f"{index['text_plus_search']['p50_ms']:.1f} / {index['text_plus_search']['p99_ms']:.1f} | "
            f"{index['search']['p50_ms']:.1f} / {index['search']['p99_ms']:.1f} | {index['recall_at_10']:.4f} | "
            f"{index['ram_bytes_per_clip']:,.0f} | {index['disk_bytes_per_clip']:,.0f} | {build} |"
        )
    lines.append("")
    lines.append("Text encoding alone (MiniLM-L6 Q-Former, one caption): " + ", ".join(
        f"{r['clips']:,}: p50 {r['text_encoding']['p50_ms']:.1f} ms / p99 {r['text_encoding']['p99_ms']:.1f} ms"
        for r in results))  # fmt: skip
    return "\n".join(lines)


def main():
    args = parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    machine = machine_info(args)
    set_threads(args.threads)
    encode = text_encoder(args.bert)
    runs = [("clustered", size) for size in args.sizes] + [("isotropic", size) for size in args.isotropic_sizes]
    results = [run_size(args, kind, size, encode) for kind, size in runs]
    hnsw = hnsw_comparison(args, args.hnsw_size) if args.hnsw_size else None
    machine["load_average_end"] = list(os.getloadavg())
    report = table(results, machine)
    print(report)
    if args.json:
        with open(args.json, "w") as file:
            output = {"machine": machine, "args": vars(args), "results": results, "hnsw": hnsw, "table": report}
            json.dump(output, file, indent=2)


if __name__ == "__main__":
    main()
