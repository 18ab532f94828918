"""The `cascade-rag` command: ingest documents, ask questions, chat, and run the demo.

    cascade-rag ingest FOLDER --index PATH
    cascade-rag ask QUESTION [--index PATH | --docs FOLDER] [-k 3] [--max-tokens N]
    cascade-rag chat [--index PATH | --docs FOLDER] [-k 3] [--max-tokens N] [--history-turns N]
    cascade-rag demo
    cascade-rag serve [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    cascade-rag calibrate [--json] [--device cuda:N]
    cascade-rag --version

Every command that loads the LLM takes --device (cpu, cuda, cuda:N) and --dtype (auto,
float32, bfloat16, float16). Without --index or --docs, questions are answered over the
bundled Larkhaven documents. `ask` and `chat` print the answer as it is generated, then its
sources and token counts. `chat` sends the conversation's latest turns with each question
(oldest dropped first to fit the context) and reads stdin line by line with line editing on
a terminal; a line it cannot use (not valid text, a question that fails) prints one error
line and the chat goes on. `calibrate` times cascade against plain decode attention on the GPU
and stores when a shared level pays there (see `cascade_rag.attention.calibration`).

Only argument parsing and printing live here; the work is done by `cascade_rag.retrieval`
and `cascade_rag.rag`. A caller's mistake (a missing folder, an empty index...) prints one
line and exits with status 1; Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import re
import sys
from pathlib import Path

EXIT_ERROR = 1
DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.run(args)
    except (OSError, ValueError) as exc:  # missing files, empty index, bad sizes...
        _print_error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


# ---- commands ------------------------------------------------------------------------------


def _ingest(args: argparse.Namespace) -> int:
    from cascade_rag.retrieval import DocumentIndex, load_documents, split_documents
    from cascade_rag.retrieval.ingest import DEFAULT_EXTENSIONS, NoUsableDocumentsError

    if Path(args.index).exists() and not Path(args.index).is_dir():
        raise ValueError(f"--index {args.index!r} is a file; pass a folder path")
    try:  # documents are read and split before the models load
        docs = load_documents(
            args.folder,
            extensions=args.extensions or DEFAULT_EXTENSIONS,
            show_progress=not args.quiet,
            follow_symlinks=args.follow_symlinks,
            include_extensionless=args.include_extensionless,
        )
    except NoUsableDocumentsError as exc:
        print(exc.report.summary(), file=sys.stderr)
        raise
    print(docs.report.summary())  # every file not read, grouped by reason
    passages = split_documents(docs, chunk_size=args.chunk_size, chunk_overlap=args.chunk_overlap)
    embedder = _embedder(args)
    if args.precompute_kv and args.kv_store is None:
        args.kv_store = str(Path(args.index) / "chunk_kv")
    with _engine(args) as engine:
        index = DocumentIndex(engine, embedder)
        index.add_passages(passages, show_progress=not args.quiet)
        index.save(args.index)
        print(f"indexed {len(index)} passages from {args.folder} into {args.index}")
        if args.precompute_kv:
            _precompute_kv(engine, passages, args)
    return 0


def _precompute_kv(engine, passages, args: argparse.Namespace) -> None:
    """Compute every passage's KV after the RAG system prompt into the --kv-store folder."""
    from cascade_rag.chunks import ChunkType
    from cascade_rag.rag import DEFAULT_SYSTEM_PROMPT

    computed = 0
    for i, passage in enumerate(passages, 1):
        if not passage.text.strip():
            continue
        chunk = engine.register_chunk(passage.text, ChunkType.RAG_RESULT)
        computed += engine.precompute([chunk], system=DEFAULT_SYSTEM_PROMPT).computed_tokens
        if not args.quiet and (i % 20 == 0 or i == len(passages)):
            print(f"  chunk KV: {i}/{len(passages)} passages", file=sys.stderr)
    stats = engine.kv_store_stats()
    print(
        f"chunk KV of {len(passages)} passages in {args.kv_store} ({computed} tokens computed, "
        f"{stats.entries} entries, {stats.bytes / 2**20:.1f} MiB); answer with "
        f"`cascade-rag ask --index {args.index} --kv-store {args.kv_store} ...`"
    )


def _ask(args: argparse.Namespace) -> int:
    question = _check_text(args.question, "the question", sys.getfilesystemencoding())
    with _pipeline(args) as rag:
        _stream_answer(question, rag.stream(question))
        _print_stats(rag.engine)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from cascade_rag.llm import EngineClosedError

    _tolerate_undecodable_stdin()
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history where available
            import readline  # noqa: F401
    history: list[tuple[str, str]] = []
    with _pipeline(args) as rag:
        if interactive:
            print('Ask a question ("/reset" forgets the conversation; "exit" or Ctrl-D quits).')
        for number, line in enumerate(_lines(interactive), start=1):
            question = line.strip()
            if question.lower() in ("exit", "quit"):
                break
            if question == "/reset":
                history.clear()
                continue
            if not question:
                continue
            try:
                encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
                question = _check_text(question, f"line {number}", encoding)
                answer = _stream_answer(question, rag.stream(question, history=history))
            except EngineClosedError as exc:  # nothing more can be answered
                _print_error(exc)
                return EXIT_ERROR
            except Exception as exc:  # noqa: BLE001 - one failing question must not end the chat
                _print_error(exc)
                continue
            if len(history) > answer.history_turns:
                dropped = len(history) - answer.history_turns
                turns = "turn" if dropped == 1 else "turns"
                print(f"   history: {dropped} oldest {turns} dropped to fit the context")
            _print_stats(rag.engine)
            if args.history_turns:
                history = [*history, (answer.question, answer.text)][-args.history_turns :]
    return 0


def _lines(interactive: bool):
    """Lines of stdin until EOF: read with `input` (line editing) on a terminal."""
    while True:
        if interactive:
            try:
                yield input("> ")
            except EOFError:
                print()
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            yield line


def _tolerate_undecodable_stdin() -> None:
    """Read undecodable bytes as lone surrogates (`_check_text` rejects such lines) instead
    of failing the whole read."""
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")


def _check_text(text: str, what: str, encoding: str) -> str:
    """`text` unless it holds bytes that did not decode (surrogate escapes)."""
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        raise ValueError(f"{what} is not valid {encoding} text")
    return text


def _demo(args: argparse.Namespace) -> int:
    from cascade_rag import data

    args.index, args.docs = None, str(data.docs_dir())
    args.chunk_size, args.chunk_overlap = data.DEMO_CHUNK_SIZE, data.DEMO_CHUNK_OVERLAP
    with _pipeline(args) as rag:
        print(f"\nAnswering {len(data.DEMO_QUESTIONS)} questions in one batch over {args.docs}\n")
        for answer in rag.ask_many(list(data.DEMO_QUESTIONS)):
            _print_answer(answer)
        _print_stats(rag.engine)
        print("\nThe same question in other words gets the same passages, whose KV is cached:\n")
        _print_answer(rag.ask(data.DEMO_FOLLOW_UP))
        _print_stats(rag.engine)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    try:
        from cascade_rag.serving import API_KEY_ENV, ServerConfig, run_server
    except ImportError as exc:
        _print_error(
            ImportError(
                f"`serve` needs the server extra ({exc}): pip install 'cascade-rag[server]'"
            )
        )
        return EXIT_ERROR
    from cascade_rag.llm import CascadeEngine

    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        served_model_name=args.served_model_name,
        max_queued_requests=args.max_queued_requests,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
        max_chunks=args.max_chunks,
        drain_timeout_s=args.drain_timeout,
        log_level=args.log_level,
        access_log=args.access_log,
    )  # checked before the model loads
    _quiet_model_loading()
    with CascadeEngine(
        args.model,
        kv_cache_tokens=args.kv_cache_tokens,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
    ) as engine:
        run_server(engine, config)
    return 0


# ---- shared pieces -------------------------------------------------------------------------


def _calibrate(args: argparse.Namespace) -> int:
    import json

    from cascade_rag.attention import calibration

    def progress(t) -> None:
        print(
            f"batch {t.batch:>4}  shared {t.shared_tokens:>6}  saved "
            f"{t.saved_bytes / 1e6:>8.1f} MB  plain {t.plain_ms:.3f} ms  cascade "
            f"{t.cascade_ms:.3f} ms  "
            f"{t.plain_ms / t.cascade_ms:.2f}x",
            flush=True,
        )

    try:
        result = calibration.measure(args.device, progress=None if args.json else progress)
    except calibration.CalibrationError as exc:
        _print_error(exc)
        return EXIT_ERROR
    path = calibration.save_calibration(result)
    key = calibration.store_key(result.device_name, result.flashinfer_version)
    if args.json:
        print(json.dumps(dict(result.to_json(), store=str(path), key=key), indent=2))
        return 0
    where = "" if result.bracketed else " (outside the grid: a bound, not a break-even)"
    print(
        f"{result.device_name}, flashinfer {result.flashinfer_version}: a shared level pays "
        f"above {result.level_overhead_bytes / 1e6:.0f} MB of KV reads saved per layer and "
        f"step{where}; stored in {path} as {key!r}"
    )
    return 0


@contextlib.contextmanager
def _pipeline(args: argparse.Namespace):
    """A `RAGPipeline` over --index or --docs; its engine is closed on exit."""
    from cascade_rag import data
    from cascade_rag.rag import RAGPipeline
    from cascade_rag.retrieval import DocumentIndex, Retriever
    from cascade_rag.retrieval.ingest import list_document_files
    from cascade_rag.sampling import SamplingParams

    if args.index is not None and args.docs is not None:
        raise ValueError("pass --index or --docs, not both")
    if args.index is not None and not DocumentIndex.exists(args.index):
        raise FileNotFoundError(
            f"no index at {args.index!r}; build one with `cascade-rag ingest FOLDER --index "
            f"{args.index}`"
        )
    if args.index is None and args.docs is None:
        args.docs = str(data.docs_dir())
    if args.docs is not None:
        list_document_files(args.docs)  # a missing folder fails before the model loads
    embedder = _embedder(args)
    with _engine(args) as engine:
        if args.index is not None:
            index = DocumentIndex.load(args.index, engine, embedder)
        else:
            index = DocumentIndex.cached(
                args.docs,
                engine,
                embedder,
                cache_dir=args.cache_dir,
                chunk_size=args.chunk_size,
                chunk_overlap=args.chunk_overlap,
                show_progress=not args.quiet,
            )
        sampling = SamplingParams(max_tokens=args.max_tokens)
        yield RAGPipeline(engine, Retriever(engine, index, k=args.k), sampling=sampling)


def _engine(args: argparse.Namespace):
    from cascade_rag.llm import CascadeEngine

    _quiet_model_loading()
    store = {}
    if getattr(args, "kv_store", None) is not None:  # chunk KV on disk: reuse anywhere
        store = dict(chunk_reuse="anywhere", kv_store_dir=args.kv_store)
    return CascadeEngine(
        args.model,
        kv_cache_tokens=args.kv_cache_tokens,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        **store,
    )


def _embedder(args: argparse.Namespace):
    from cascade_rag.retrieval import Embedder

    _quiet_model_loading()
    return Embedder(args.embedder, device=args.device, cache_dir=args.cache_dir)


def _quiet_model_loading() -> None:
    """transformers draws a bar per weight file loaded; ours are enough."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _stream_answer(question: str, pieces):
    """Print "Q:", then the answer as `RAGPipeline.stream` yields it, then its sources.

    The first piece is awaited before anything is printed, so a question that fails
    (retrieval, a prompt too long) prints only its error.
    """
    pieces = iter(pieces)
    first = next(pieces)
    print(f"Q: {question}")
    print("A: ", end="", flush=True)
    answer = None
    try:
        for piece in itertools.chain([first], pieces):
            if isinstance(piece, str):
                print(piece, end="", flush=True)
            else:
                answer = piece
    finally:
        print(flush=True)
    assert answer is not None, "RAGPipeline.stream ends with the Answer"
    _print_sources(answer)
    return answer


def _print_answer(answer) -> None:
    print(f"Q: {answer.question}")
    print(f"A: {answer.text}")
    _print_sources(answer)


def _print_sources(answer) -> None:
    sources = ", ".join(
        f"{Path(s['source']).name or s['source']}"
        + ("" if s["score"] is None else f" ({s['score']:.2f})")
        for s in answer.sources
    )
    u = answer.usage
    print(f"   sources: {sources or '(none)'}")
    if answer.history_turns:
        turns = "turn" if answer.history_turns == 1 else "turns"
        print(f"   history: {answer.history_turns} earlier {turns} in the prompt")
    print(
        f"   tokens: {u.prompt_tokens} prompt ({u.cached_tokens} from the chunk cache), "
        f"{u.completion_tokens} generated\n"
    )


def _print_error(exc: BaseException) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"cascade-rag: error: {message}", file=sys.stderr, flush=True)


def _print_stats(engine) -> None:
    s = engine.stats()
    cached = s.prompt_tokens - s.computed_prompt_tokens
    print(
        f"cache: {s.cache_hit_rate:.1%} of prompt tokens from the chunk cache "
        f"({cached} cached, {s.computed_prompt_tokens} computed, {s.generated_tokens} "
        f"generated); {s.kv_cache.num_nodes} chunks hold {s.kv_cache.cached_tokens} tokens of KV"
    )


# ---- arguments -----------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to an option's help, unless the help already says it or there
    is nothing to show (None, or False for a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and subcommand parsers) that show defaults in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    llm = argparse.ArgumentParser(add_help=False)  # the LLM's options (serve has only these)
    llm.add_argument(
        "--model", default=None, help="LLM folder or .gguf (default: SmolLM2-135M-Instruct)"
    )
    llm.add_argument(
        "--cache-dir",
        default=None,
        help="converted models and cached indexes (default: $CASCADE_RAG_CACHE or "
        "~/.cache/cascade_rag)",
    )
    llm.add_argument(
        "--kv-cache-tokens", type=_positive, default=16384, help="KV cache size in tokens"
    )
    llm.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="where the LLM and embedder run: cpu, cuda or cuda:N",
    )
    llm.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights and KV dtype; auto is float32 on the CPU, bfloat16 on CUDA",
    )
    common = argparse.ArgumentParser(add_help=False, parents=[llm])
    common.add_argument(
        "--embedder", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)"
    )
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument(
        "--kv-store",
        default=None,
        metavar="DIR",
        help="keep passages' KV on disk in DIR across runs and reuse it at any position "
        "(chunk_reuse='anywhere'); default: off",
    )

    splitting = argparse.ArgumentParser(add_help=False)
    splitting.add_argument("--chunk-size", type=_positive, default=800, help="passage characters")
    splitting.add_argument(
        "--chunk-overlap", type=_non_negative, default=80, help="characters shared by passages"
    )

    answering = argparse.ArgumentParser(add_help=False)
    answering.add_argument("-k", type=_positive, default=3, help="passages per question")
    answering.add_argument(
        "--max-tokens", type=_positive, default=128, help="most tokens per answer"
    )

    source = argparse.ArgumentParser(add_help=False)
    where = source.add_mutually_exclusive_group()
    where.add_argument("--index", default=None, help="an index saved by `cascade-rag ingest`")
    where.add_argument(
        "--docs", default=None, help="a document folder (indexed once, cached; default: bundled)"
    )

    parser = _Parser(
        prog="cascade-rag",
        description="Answer questions over your documents with a local LLM that computes "
        "each retrieved passage's KV once and shares it across requests.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "ingest", parents=[common, splitting], help="index a folder of documents"
    )
    p.add_argument("folder", help="folder of .txt, .md, .rst, .pdf, .html files")
    p.add_argument("--index", required=True, help="folder to save the index in")
    p.add_argument(
        "--ext",
        action="append",
        dest="extensions",
        metavar=".EXT",
        help="read files with this extension; repeat for several (replaces the default "
        ".txt .md .rst .pdf .html .htm)",
    )
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="follow symlinks that lead out of FOLDER (each one is listed); by default they "
        "are skipped and reported",
    )
    p.add_argument(
        "--include-extensionless",
        action="store_true",
        help="also read files without an extension, as text",
    )
    p.add_argument(
        "--precompute-kv",
        action="store_true",
        help="also compute every passage's KV into --kv-store (default: INDEX/chunk_kv), so "
        "`ask`/`chat --kv-store` serve them from disk after a restart",
    )
    p.set_defaults(run=_ingest)

    p = commands.add_parser(
        "ask", parents=[common, splitting, answering, source], help="answer one question"
    )
    p.add_argument("question")
    p.set_defaults(run=_ask)

    p = commands.add_parser(
        "chat",
        parents=[common, splitting, answering, source],
        help="answer questions read from stdin until EOF or 'exit', keeping the conversation",
    )
    p.add_argument(
        "--history-turns",
        type=_non_negative,
        default=8,
        help="earlier questions and answers sent with each question (0: none); the oldest "
        "are dropped first where they do not fit the context",
    )
    p.set_defaults(run=_chat)

    p = commands.add_parser(
        "demo",
        parents=[common, answering],
        help="answer bundled questions over the bundled Larkhaven documents in one batch",
    )
    p.set_defaults(run=_demo)

    p = commands.add_parser(
        "serve",
        parents=[llm],
        help="serve the LLM over an OpenAI-compatible HTTP API (chat, completions, chunks, "
        "metrics)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (only this machine)")
    p.add_argument("--port", type=_non_negative, default=8000, help="TCP port")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every request but /health (default: "
        "$CASCADE_RAG_API_KEY; none if unset)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the model name clients send (default: its file)"
    )
    p.add_argument("--max-model-len", type=_positive, default=None, help="context window")
    p.add_argument("--max-num-seqs", type=_positive, default=64, help="requests running at once")
    p.add_argument(
        "--max-queued-requests",
        type=_non_negative,
        default=256,
        help="requests waiting beyond the running ones; more get 429",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=_positive,
        default=4096,
        help="most tokens a request may generate (the default when it does not say)",
    )
    p.add_argument(
        "--max-request-bytes", type=_positive, default=4 * 2**20, help="largest request body"
    )
    p.add_argument(
        "--max-chunks", type=_positive, default=10_000, help="most chunks registered over HTTP"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get to finish after SIGTERM",
    )
    p.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        default="info",
        help="server log level",
    )
    p.add_argument("--access-log", action="store_true", help="log one line per request")
    p.set_defaults(run=_serve)

    p = commands.add_parser(
        "calibrate",
        help="time cascade vs plain decode attention on this GPU (FlashInfer) and store when "
        "a shared level pays ($CASCADE_RAG_CALIBRATION or CACHE/calibration.json)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", type=_device, default="cuda", help="the GPU: cuda or cuda:N")
    p.set_defaults(run=_calibrate)
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("cascade-rag")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
