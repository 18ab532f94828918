"""Per-token cost of streaming detokenization: DecodeStream fast path vs the Python reference.

Workload: the default model's tokenizer (SmolLM2-135M-Instruct, byte-level BPE, 49152 ids).
"Generated" sequences are the bundled documents (cascade_rag/data/docs) plus a multilingual
line with characters split across tokens, tokenized and cut into `--tokens`-long requests.
Each request goes through `TextStream` (what the engine runs per token) token by token, then
`finish()`, for three stop settings: none, one stop string and four (none of them occurs in
the text, their prefixes do). Rows
time the same requests with `use_decode_stream=False` (the Python `IncrementalDetokenizer`, the
baseline) and `True` (tokenizers' `DecodeStream`), alternately, best of `--repeats`; every
pair's texts are checked equal. Also the bare detokenizers without TextStream.

Run: python bench/bench_detokenize.py [--tokens 256] [--requests 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformers import AutoTokenizer

import cascade_rag
from cascade_rag.engine.detokenizer import IncrementalDetokenizer, TextStream, make_detokenizer
from cascade_rag.models.loader import convert_gguf, default_model_path

MULTILINGUAL = "naïve café 日本語のテキスト 🎉😀 Стоп-слова 👩‍👧 done.\n"
# Stop strings that never match these texts but whose prefixes do (held back, then released).
STOPS = {
    "none": (),
    "1 stop": ("\n\n\n\n",),
    "4 stops": ("\n\n\n\n", "####", "Question:", "</answer>"),
}


def requests(tokenizer, tokens: int, count: int) -> list[list[int]]:
    docs = Path(cascade_rag.__file__).parent / "data" / "docs"
    text = "".join(p.read_text() + MULTILINGUAL for p in sorted(docs.iterdir()))
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < tokens * count:
        ids = ids + ids
    return [ids[i * tokens : (i + 1) * tokens] for i in range(count)]


def time_streams(tokenizer, reqs, stop, fast: bool) -> tuple[float, list[str]]:
    start = time.perf_counter()
    texts = []
    for ids in reqs:
        stream = TextStream(tokenizer, stop=stop, use_decode_stream=fast)
        for token_id in ids:
            if stream.add(token_id)[1]:
                break
        stream.finish()
        texts.append(stream.text)
    return time.perf_counter() - start, texts


def time_detokenizers(tokenizer, reqs, fast: bool) -> tuple[float, list[str]]:
    start = time.perf_counter()
    texts = []
    for ids in reqs:
        detok = make_detokenizer(tokenizer) if fast else IncrementalDetokenizer(tokenizer)
        for token_id in ids:
            detok.add(token_id)
        detok.flush()
        texts.append(detok.text)
    return time.perf_counter() - start, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per request")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(str(convert_gguf(default_model_path())))
    reqs = requests(tokenizer, args.tokens, args.requests)
    num_tokens = sum(len(r) for r in reqs)
    print(
        f"tokenizer: {type(tokenizer).__name__} ({len(tokenizer)} ids); {args.requests} "
        f"requests x {args.tokens} tokens; best of {args.repeats}"
    )
    print(f"{'path':<26}{'python us/token':>16}{'DecodeStream us/token':>23}{'speedup':>9}")
    cases = [(f"TextStream, {name}", stop) for name, stop in STOPS.items()]
    cases.append(("detokenizer only", None))
    for label, stop in cases:
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):
            out = {}
            for fast in (False, True):
                if stop is None:
                    seconds, out[fast] = time_detokenizers(tokenizer, reqs, fast)
                else:
                    seconds, out[fast] = time_streams(tokenizer, reqs, stop, fast)
                best[fast] = min(best[fast], seconds)
            assert out[False] == out[True], f"{label}: texts differ"
        old, new = (best[f] / num_tokens * 1e6 for f in (False, True))
        print(f"{label:<26}{old:>16.2f}{new:>23.2f}{old / new:>8.1f}x")


if __name__ == "__main__":
    main()
