# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""The `audio-qformer` command: index a folder of sounds into a library (`audio_library.AudioLibrary`), then search it.

    audio-qformer --library LIB index DIR --model MODEL [--fast_cpu]   # resumable; later runs embed new files only
    accelerate launch [--multi_gpu] --num_processes N -m audio_search --library LIB index DIR --model MODEL
    audio-qformer --library LIB search "a dog barks" [-k 10] [--rerank 16] [--json]
    audio-qformer --library LIB similar FILE [-k 10] [--json]

`--library` (default `./audio-library`) and `--device` come before the command.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from audio_io import HOP_SECONDS, WINDOW_SECONDS
from audio_library import LIBRARY_CONFIG, AudioLibrary, LibraryBusyError, SearchHit, load_model


# --- command line --------------------------------------------------------------------------------------------------


def _print_hits(query: str, hits: list[SearchHit], as_json: bool):
    if as_json:
        print(json.dumps({"query": query, "results": [asdict(hit) for hit in hits]}, ensure_ascii=False))
        return
    print(f"\n{query}")
    reranked = any(hit.match_logit is not None for hit in hits)
    header = f"{'rank':>4}  {'score':>7}  {'cosine':>7}  " + (f"{'match':>7}  " if reranked else "") + "file"
    print(header)
    for rank, hit in enumerate(hits, 1):
        match = (f"{hit.match_logit:7.3f}  " if hit.match_logit is not None else f"{'':7}  ") if reranked else ""
        where = f"  (from {hit.start_seconds:.1f} s)" if hit.start_seconds else ""
        print(f"{rank:>4}  {hit.score:7.3f}  {hit.cosine:7.3f}  {match}{hit.path}{where}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="audio-qformer", description="Index a sound library and search it by text.")
    parser.add_argument("--library", default="audio-library", help="The library folder (default: ./audio-library).")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1, ... or auto (default): under `accelerate launch` each process's own "
                             "device, else CUDA when present, else the CPU.")
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="Embed every audio file under DIR (only new or changed files).")
    index.add_argument("directory", metavar="DIR")
    index.add_argument("--model", help="Saved model folder or Hub id (required for a new library).")
    index.add_argument("--batch_size", type=int, default=8, help="Windows per forward pass.")
    index.add_argument("--no_tokens", action="store_true", help="Do not store BEATs tokens (re-ranking decodes audio).")
    index.add_argument("--window_seconds", type=float, default=WINDOW_SECONDS)
    index.add_argument("--hop_seconds", type=float, default=HOP_SECONDS)
    index.add_argument("--fast_cpu", action="store_true",
                       help="New library: embed with BEATs' fast CPU copy (~exact): bfloat16 where the CPU has "
                            "bfloat16 units, int8 elsewhere with AVX2; the exact path (with a warning) where neither "
                            "measures faster.")
    index.add_argument("--vector_index", action="store_true",
                       help="Also build (or update) the approximate FAISS index, for `search --approximate`.")
    search = commands.add_parser("search", help="Rank the library's files for a text.")
    search.add_argument("text", nargs="+", help="One or more queries.")
    similar = commands.add_parser("similar", help="Rank the library's files by similarity to an audio file.")
    similar.add_argument("file", metavar="FILE")
    for sub in (search, similar):
        sub.add_argument("-k", type=int, default=10, help="How many files to list.")
        sub.add_argument("--json", action="store_true", help="One JSON object per query instead of a table.")
    search.add_argument("--rerank", type=int, nargs="?", const=-1, default=0, metavar="K",
                        help="Re-rank the top K with the matching head (a bare --rerank: the model's rerank_top_k, 16).")
    search.add_argument("--approximate", action="store_true", help="Search with the vector index (large libraries).")
    args = parser.parse_args(argv)

    try:
        if args.command == "index":
            # One process, or each of those `accelerate launch` starts: they share the new files (AudioLibrary.index).
            from accelerate import PartialState

            # Without CUDA, processes that `accelerate launch --multi_gpu` started talk over gloo (cpu=True), as in train.py.
            state = PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
            device = state.device if args.device == "auto" else args.device
            config_path = os.path.join(args.library, LIBRARY_CONFIG)
            if args.fast_cpu and os.path.exists(config_path):
                with open(config_path) as handle:
                    if not json.load(handle).get("fast_cpu_encoder"):
                        parser.error(f"{args.library} embeds with the exact encoder; --fast_cpu applies to new libraries")
            if not args.model and not os.path.exists(config_path):
                parser.error("a new library needs --model (a saved model folder or Hub id)")
            with state.main_process_first():  # the main process creates a new library; the others then open it
                if os.path.exists(config_path):
                    library = AudioLibrary.load(args.library, args.model, device)
                else:
                    model, processor = load_model(args.model, device)
                    library = AudioLibrary(args.library, model, processor, args.model, create=True,
                                           keep_tokens=not args.no_tokens, window_seconds=args.window_seconds,
                                           hop_seconds=args.hop_seconds, fast_cpu_encoder=args.fast_cpu)  # fmt: skip
            report = library.index(args.directory, args.batch_size, show_progress=state.is_main_process, state=state)
            who = f"process {state.process_index} of {state.num_processes}: " if state.num_processes > 1 else ""
            print(f"{args.library}: {who}{report['files']} audio files under {args.directory}: {report['embedded']} "
                  f"embedded, {report['reused']} already indexed, {len(report['failed'])} unreadable", flush=True)  # fmt: skip
            for failure in report["failed"]:
                print(f"  skipped {failure['audio']}: {failure['reason']}")
            if args.vector_index and state.is_main_process:
                print(f"Vector index: {len(library.vector_index(build=True))} windows")
        else:
            device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
            library = AudioLibrary.load(args.library, device=device)
            if args.command == "search":
                rerank = library.model.config.rerank_top_k if args.rerank == -1 else args.rerank
                found = library.search(args.text, args.k, rerank, approximate=args.approximate)
                for query, hits in zip(args.text, found):
                    _print_hits(query, hits, args.json)
            else:
                _print_hits(args.file, library.similar(args.file, args.k), args.json)
    except (FileNotFoundError, NotADirectoryError, ValueError, LibraryBusyError) as error:
        print(f"audio-qformer: error: {error}", file=sys.stderr)
        return 2
    return 0


def console_main():
    sys.exit(main())


if __name__ == "__main__":
    console_main()
