# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""The `audio-qformer` command: index a folder of sounds into a library (`audio_qformer.library.AudioLibrary`), then search it.

    audio-qformer --library LIB index DIR --model MODEL [--fast_cpu]   # resumable; later runs embed new files only
    accelerate launch --multi_gpu --num_processes N -m audio_qformer.cli --library LIB index DIR --model MODEL  # CPU too
    audio-qformer --library LIB search "a dog barks" [-k 10] [--rerank 16] [--json]
    audio-qformer --library LIB similar FILE [-k 10] [--json]
    audio-qformer --library LIB index --hub_dataset ID_OR_FOLDER [--hub_split train] [--hub_audio_column audio] --model M
    audio-qformer --library LIB export OUT_DIR [--push_to_hub DATASET_ID]   # Parquet, one row per window
    audio-qformer --library LIB import DATASET [--model M]                  # an export (folder or Hub id), no embedding
    audio-qformer caption FILE_OR_DIR... --model MODEL [--json] [--submission_csv PATH]   # no library needed
    audio-qformer mteb --model MODEL --tasks ClothoT2ARetrieval.v2 ESC50_Zeroshot [--output_dir DIR]  # mteb's evaluator

`index --captions` also stores the model's caption of each file, which `search` and `similar` then show.

`--library` (default `./audio-library`) and `--device` come before the command.
"""

import argparse
import csv
import datetime
import json
import os
import sys
from dataclasses import asdict

import torch

from audio_io import HOP_SECONDS, WINDOW_SECONDS
from audio_qformer.library import (LIBRARY_CONFIG, AudioLibrary, LibraryBusyError, LibraryDiskFullError,
                                   LibrarySettingError, SearchHit, load_model, model_reference, open_dataset)  # fmt: skip


# A process of an index launch that has embedded its share waits at a barrier for the others, which can take hours
# (shares are equal in files, not in hours of audio): far beyond torch's default process-group timeout (30 min with
# gloo, 10 min with NCCL), which would fail a healthy run. A dead peer is noticed at once all the same: its closed
# connection fails the barrier, and the launcher stops the other processes.
INDEX_BARRIER_TIMEOUT = datetime.timedelta(days=7)


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
        if hit.caption:
            print(f"{'':6}{hit.caption}")


def _device(name: str) -> str:
    """`--device` outside a launch: `auto` is CUDA when present, else the CPU; a device this machine lacks is refused."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: not a device ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (torch {torch.__version__}); use cpu or auto.")
    return name


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {number}")
    return number


def caption_command(args, parser) -> int:
    """The `caption` command: captions of files (or every audio file under folders), without a library."""
    from audio_io import audio_files
    from audio_qformer.captioning import caption_files

    name = args.model
    if name is None:
        config_path = os.path.join(args.library, LIBRARY_CONFIG)
        if not os.path.exists(config_path):
            parser.error("caption needs --model (or a --library whose model to use)")
        with open(config_path) as handle:
            name = json.load(handle)["model"]
        if not name:
            parser.error(f"{args.library} does not record its model: give --model")
    paths = []
    for item in args.files:
        if os.path.isdir(item):
            paths += audio_files(item)
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    if not paths:
        raise ValueError(f"No audio files in {', '.join(args.files)}.")
    device = _device(args.device)
    try:
        model, processor = load_model(name, device)
    except (OSError, ValueError) as error:  # e.g. the library's model folder moved
        raise ValueError(f"The model {name} cannot be loaded here ({error}); give it with --model.") from error
    results = caption_files(model, processor, paths, args.batch_size, show_progress=not args.json)
    for result in results:
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        elif "error" in result:
            print(f"{result['file']}: unreadable ({result['error']})")
        else:
            for part in result["captions"]:
                where = f" ({part['start_seconds']:.1f} s)" if len(result["captions"]) > 1 else ""
                print(f"{result['file']}{where}: {part['caption']}")
    if args.submission_csv:  # DCASE task 6A's file: one caption per file, by file name
        os.makedirs(os.path.dirname(os.path.abspath(args.submission_csv)), exist_ok=True)
        with open(args.submission_csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "caption_predicted"])
            writer.writerows([os.path.basename(r["file"]), r["captions"][0]["caption"]] for r in results if "captions" in r)
        print(f"Captioning submission: {args.submission_csv}", file=sys.stderr)
    unreadable = [r["file"] for r in results if "error" in r]
    return 1 if unreadable and len(unreadable) == len(results) else 0


# How the library's settings are given on the command line (`index`), for its messages.
SETTING_FLAGS = {"window_seconds": "--window_seconds", "hop_seconds": "--hop_seconds", "fast_cpu_encoder": "--fast_cpu",
                 "beats_dtype": "--beats_dtype", "keep_tokens": "--keep_tokens", "captions": "--captions"}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audio-qformer", description="Index a sound library and search it by text.")
    parser.add_argument("--library", default="audio-library", help="The library folder (default: ./audio-library).")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1, ... or auto (default): under `accelerate launch` each process's own "
                             "device, else CUDA when present, else the CPU.")
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="Embed every audio file under DIR (only new or changed files).")
    index.add_argument("directory", metavar="DIR", nargs="?", help="A folder of audio (or give --hub_dataset).")
    index.add_argument("--hub_dataset", metavar="ID_OR_FOLDER",
                       help="Index a dataset's audio instead: a Hub id, or a folder save_to_disk or load_dataset reads.")
    index.add_argument("--hub_split", default="train", help="Split of --hub_dataset (default: train).")
    index.add_argument("--hub_audio_column", "--audio_column", dest="hub_audio_column", default="audio",
                       help="Audio column of --hub_dataset (an Audio column or file paths; default: audio).")
    index.add_argument("--model", help="Saved model folder or Hub id (required for a new library).")
    index.add_argument("--batch_size", type=_positive, default=8, help="Windows per forward pass (default: 8).")
    index.add_argument("--keep_tokens", action="store_true",
                       help="New library: also store each window's BEATs tokens (about 46 times the embeddings' disk), "
                            "so that --rerank needs no decoding and no BEATs.")
    index.add_argument("--no_tokens", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    index.add_argument("--window_seconds", type=float,
                       help=f"New library: seconds of audio per embedded window (default: {WINDOW_SECONDS}, BEATs' 512 "
                            "fbank frames' worth); longer files are cut into windows.")  # fmt: skip
    index.add_argument("--hop_seconds", type=float,
                       help=f"New library: seconds between the starts of a file's windows (default: {HOP_SECONDS}).")
    index.add_argument("--fast_cpu", action="store_true",
                       help="New library: embed with BEATs' fast CPU copy (~exact): bfloat16 or int8 products, "
                            "whichever this CPU runs faster (bfloat16 needs bfloat16 units, int8 AVX2); the exact path "
                            "(with a warning) where neither measures faster.")
    index.add_argument("--release_memory", action="store_true",
                       help="On the CPU, let the C allocator hand freed memory back to the system at once (glibc's "
                            "default). Without it index keeps freed memory for reuse (beats_cpu.keep_freed_memory), "
                            "which makes BEATs faster; memory freed is then held until the process ends.")
    index.add_argument("--vector_index", action="store_true",
                       help="Also build (or update) the approximate FAISS index, for `search --approximate`.")
    index.add_argument("--beats_dtype", choices=["float32", "bfloat16"],
                       help="New library: BEATs in bfloat16 on any device (and on a GPU the Q-Former under autocast); "
                            "default float32. On the CPU, --fast_cpu picks the fastest precision instead.")
    index.add_argument("--captions", action="store_true",
                       help="New library: also store the model's caption of each file (of its first window when it "
                            "is longer than one), shown by search and similar.")
    export = commands.add_parser("export", help="Write the library as a Parquet dataset, one row per window.")
    export.add_argument("output_dir", metavar="OUT_DIR", help="Folder for data/train-00000-of-00001.parquet.")
    export.add_argument("--push_to_hub", metavar="DATASET_ID", help="Also push the dataset to this Hub repository.")
    export.add_argument("--private", action="store_true", help="Make a new Hub repository private.")
    load = commands.add_parser("import", help="Open an exported library (folder or Hub id) as --library, embedding nothing.")
    load.add_argument("dataset", metavar="DATASET", help="The folder `export` wrote (or its data/), or a Hub id.")
    load.add_argument("--model", help="The model that embedded it (default: the dataset's `model` column).")
    load.add_argument("--hub_split", default="train", help="Split of DATASET (default: train).")
    search = commands.add_parser("search", help="Rank the library's files for a text.")
    search.add_argument("text", nargs="+", help="One or more queries.")
    similar = commands.add_parser("similar", help="Rank the library's files by similarity to an audio file.")
    similar.add_argument("file", metavar="FILE")
    for sub in (search, similar, export):
        sub.add_argument("--model", help="Where the library's model is, if not where the library recorded it.")
    for sub in (search, similar):
        sub.add_argument("-k", type=_positive, default=10, help="How many files to list.")
        sub.add_argument("--json", action="store_true", help="One JSON object per query instead of a table.")
    search.add_argument("--rerank", type=int, nargs="?", const=-1, default=0, metavar="K",
                        help="Re-rank the top K with the matching head (a bare --rerank: the model's rerank_top_k, "
                             "16); they come first, by score, and the hits after them in cosine order.")
    search.add_argument("--approximate", action="store_true", help="Search with the vector index (large libraries).")
    caption = commands.add_parser("caption", help="Caption audio files with the model (no library needed).")
    caption.add_argument("files", nargs="+", metavar="FILE_OR_DIR")
    caption.add_argument("--model", help="Saved model folder or Hub id (default: the --library's model).")
    caption.add_argument("--batch_size", type=int, default=8, help="Files per batch.")
    caption.add_argument("--json", action="store_true", help="One JSON object per file.")
    caption.add_argument("--submission_csv", metavar="PATH",
                         help="Also write the DCASE audio captioning submission: file_name,caption_predicted.")
    evaluation = commands.add_parser("mteb", help="Evaluate a model with mteb's own evaluator on MTEB / MAEB tasks.")
    evaluation.add_argument("--model", required=True, help="Saved model folder or Hub id.")
    evaluation.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                            help="mteb task names, e.g. ClothoT2ARetrieval.v2 ESC50_Zeroshot.")
    evaluation.add_argument("--output_dir", default="mteb-results",
                            help="Where mteb writes results/<model>/<revision>/<task>.json, the results repository's layout.")
    evaluation.add_argument("--revision", help="The model's Hub revision (default: main).")
    evaluation.add_argument("--batch_size", type=_positive, default=8, help="Windows per forward pass (default: 8).")
    for command, run in (("index", index_command), ("export", export_command), ("import", import_command),
                         ("search", search_command), ("similar", similar_command), ("caption", caption_command),
                         ("mteb", mteb_command)):
        commands.choices[command].set_defaults(func=run)
    return parser


def index_command(args, parser) -> int:
    """Embed a folder's (or a dataset's) audio into the library, creating it with `--model` if new."""
    if args.directory is None and args.hub_dataset is None:
        parser.error("index needs a folder DIR or --hub_dataset")
    if args.directory is not None and args.hub_dataset is not None:
        parser.error("index takes a folder DIR or --hub_dataset, not both")
    if args.fast_cpu and args.beats_dtype == "bfloat16":
        parser.error("give --fast_cpu or --beats_dtype bfloat16, not both")
    # One process, or each of those `accelerate launch` starts: they share the new files (AudioLibrary.index).
    from accelerate import PartialState

    # Without CUDA, processes that `accelerate launch --multi_gpu` started talk over gloo (cpu=True), as in train.py.
    state = PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
                         timeout=INDEX_BARRIER_TIMEOUT)  # fmt: skip
    device = state.device if args.device == "auto" else _device(args.device)
    if torch.device(device).type == "cpu" and not args.release_memory:
        from audio_qformer.beats_cpu import keep_freed_memory

        keep_freed_memory()  # BEATs' blocks of 48-94 MB per layer reused, not mapped afresh every batch
    exists = os.path.exists(os.path.join(args.library, LIBRARY_CONFIG))
    if not args.model and not exists:
        parser.error("a new library needs --model (a saved model folder or Hub id)")
    if args.directory is not None and not os.path.isdir(args.directory):
        raise NotADirectoryError(f"{os.path.abspath(args.directory)}: not a folder")
    # Before a new library is made: a source that cannot be read leaves no library behind.
    source = args.directory or open_dataset(args.hub_dataset, args.hub_split)
    # A flag left out means the library's own setting (None); one given must be the library's (LibrarySettingError).
    settings = {"keep_tokens": args.keep_tokens or None, "fast_cpu_encoder": args.fast_cpu or None,
                "captions": args.captions or None, "beats_dtype": args.beats_dtype,
                "window_seconds": args.window_seconds, "hop_seconds": args.hop_seconds}  # fmt: skip
    with state.main_process_first():  # the main process creates a new library; the others then open it
        try:
            library = AudioLibrary.open(args.library, args.model, create=True, device=device, **settings)
        except LibrarySettingError as error:
            parser.error(f"{args.library} {_setting_text(error.setting, error.stored)}; {SETTING_FLAGS[error.setting]} "
                         "applies to new libraries")  # fmt: skip
        if exists and args.model and model_reference(args.model) != library.config["model"] and state.is_main_process:
            library.record_model(args.model)  # its weights, found here now (e.g. a moved folder)
    report = library.index(source, args.batch_size, show_progress=state.is_main_process, state=state,
                           audio_column=args.hub_audio_column, dataset_name=args.hub_dataset)  # fmt: skip
    who = f"process {state.process_index} of {state.num_processes}: " if state.num_processes > 1 else ""
    where = f"under {args.directory}" if args.directory else f"in {args.hub_dataset} ({args.hub_split})"
    # One write, newline included: the launch's processes share stdout, and unbuffered (PYTHONUNBUFFERED) print
    # writes the newline apart, so their lines could run into each other.
    sys.stdout.write(f"{args.library}: {who}{report['files']} audio files {where}: {report['embedded']} "
                     f"embedded, {report['reused']} already indexed, {len(report['failed'])} unreadable\n")
    sys.stdout.flush()
    for failure in report["failed"]:
        reason = failure["reason"].removeprefix(f"{failure['audio']}: ")  # most reasons start with the path
        print(f"  skipped {failure['audio']}: {reason}")
    if args.vector_index and state.is_main_process:
        stored = len(library.vector_index(build=True))
        live = sum(file["windows"] for file in library.stored_files())
        stale = f" ({stored - live} more of files changed or gone: search skips them)" if stored > live else ""
        print(f"Vector index: {live} windows{stale}")
    return 0


def _setting_text(setting: str, stored) -> str:
    """What an existing library's setting is, in words."""
    if setting in ("window_seconds", "hop_seconds"):
        return f"cuts files with {setting} {stored}"
    if setting == "fast_cpu_encoder":
        return "embeds with the exact encoder"
    if setting == "beats_dtype":
        return f"runs BEATs in {stored}"
    if setting == "keep_tokens":
        return "was indexed without BEATs tokens (re-ranking there runs BEATs on the candidates)"
    return f"was indexed without {setting}"


def import_command(args, parser) -> int:
    """Open an exported library as --library, embedding nothing."""
    library = AudioLibrary.from_dataset(args.dataset, args.library, args.model, _device(args.device), args.hub_split)
    files = library.stored_files()
    print(f"{args.library}: {len(files)} files, {sum(f['windows'] for f in files)} windows with {args.dataset}; "
          "nothing embedded")  # fmt: skip
    return 0


def export_command(args, parser) -> int:
    """Write the library as Parquet (the Hub's layout), optionally pushed to the Hub."""
    import tempfile

    library = AudioLibrary.open(args.library, args.model, device="cpu")
    if not library.live_keys():  # before OUT_DIR is made
        raise ValueError(f"The library {args.library} holds no files yet: nothing to export.")
    os.makedirs(args.output_dir, exist_ok=True)
    # The Hub's layout for a split "train": `load_dataset(OUT_DIR)` and the dataset viewer find it.
    path = os.path.join(args.output_dir, "data", "train-00000-of-00001.parquet")
    with tempfile.TemporaryDirectory(dir=args.output_dir) as cache:  # the rows' Arrow copy, gone once written
        dataset = library.to_dataset(cache_dir=cache)
        dataset.to_parquet(path)
        print(f"{path}: {len(dataset)} windows of {len(library.live_keys())} files, "
              f"{os.path.getsize(path) / len(dataset) / 1024:.1f} KiB per window")  # fmt: skip
        if args.push_to_hub:
            dataset.push_to_hub(args.push_to_hub, private=args.private or None)
            print(f"Pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


def search_command(args, parser) -> int:
    """Rank the library's files for each query."""
    library = AudioLibrary.open(args.library, args.model, device=_device(args.device))
    rerank = library.model.config.rerank_top_k if args.rerank == -1 else args.rerank
    found = library.search(args.text, args.k, rerank, approximate=args.approximate)
    for query, hits in zip(args.text, found):
        _print_hits(query, hits, args.json)
    return 0


def similar_command(args, parser) -> int:
    """Rank the library's files by how much they sound like a file."""
    library = AudioLibrary.open(args.library, args.model, device=_device(args.device))
    _print_hits(args.file, library.similar(args.file, args.k), args.json)
    return 0


def mteb_command(args, parser) -> int:
    """Run mteb's evaluation of a model on the tasks named; print each task's main score and where the files are."""
    try:
        from audio_qformer.mteb_encoder import evaluate
    except ImportError as error:
        parser.error(f"mteb needs the mteb extra: pip install -e '.[mteb]' ({error})")
    device = None if args.device == "auto" else _device(args.device)
    for result in evaluate(args.model, args.tasks, args.output_dir, revision=args.revision, device=device,
                           batch_size=args.batch_size):  # fmt: skip
        for split, scores in result.scores.items():
            for subset in scores:
                print(f"{result.task_name} {split} {subset['hf_subset']}: main score {subset['main_score']:.4f}")
    print(f"Result files: {os.path.join(args.output_dir, 'results')}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, parser)
    except (FileNotFoundError, NotADirectoryError, ValueError, LibraryBusyError, LibraryDiskFullError) as error:
        print(f"audio-qformer: error: {error}", file=sys.stderr)
        return 2


def console_main():
    sys.exit(main())


if __name__ == "__main__":
    console_main()
