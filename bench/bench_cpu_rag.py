"""CPU RAG benchmark: Hugging Face generate vs the cascade-rag engine, in one process.

Workload (every system does identical work on identical token ids):

* 8 questions about the fictional Republic of Kestria, each answered over a ~100-token system
  prompt and 3 of 6 shared documents of ~300 tokens each (geography, climate, history,
  government, economy, culture), 32 new tokens per question (greedy, EOS ignored, so every
  system generates exactly 8 x 32 tokens).
* The 3-of-6 document sets are what a retriever with canonical ordering (documents sorted by
  id) returns for related questions: 4 distinct sets over 8 questions, two questions per set,
  and pairs of sets that share their first two documents ({0,1,4} / {0,1,2} and
  {2,3,5} / {2,3,4}).
* Prompts are built through the chat template exactly as the engine's `Composition` does
  (system turn, documents, question, generation prompt); `engine.prepare(...).token_ids` gives
  the ids, and those same ids go to every system.

Systems (float32, same weights; warmed up first on short unrelated prompts that share no chunk
with the benchmark):

1. `transformers` `model.generate`, one request at a time (what a LangChain
   `HuggingFacePipeline` user gets) -- the baseline.
2. `CascadeEngine(enable_chunk_cache=False)`: all 8 requests submitted together.
3. `CascadeEngine()` (chunk cache + cascade attention): all 8 submitted together, cold cache.
4. The same engine as 3 run again on the same 8 questions (warm chunk cache).

Reported per system: seconds, output tokens/s, prompt tokens computed (prompt tokens minus
those served from the chunk cache; all of them for transformers), speedup over transformers,
and whether the generated token ids equal transformers' token for token.

It does not measure sampling, streaming, retrieval or the GPU path, and it asserts nothing: it
is a benchmark, not a test (tests/test_engine_equivalence.py pins correctness).

Run: python bench/bench_cpu_rag.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from cascade_rag.chunks import ChunkType
from cascade_rag.composition import Composition
from cascade_rag.llm import CascadeEngine
from cascade_rag.models.loader import load_model
from cascade_rag.sampling import SamplingParams

MAX_NEW_TOKENS = 32
KV_CACHE_TOKENS = 16384  # 8 uncached prompts of ~1,030 tokens + 8 x 32 new tokens fit

SYSTEM = (
    "You are a careful research assistant for the Kestrian National Library. Answer the "
    "user's question using only the documents provided in the conversation. Quote figures, "
    "dates and names exactly as they appear in the documents, and do not guess or add facts "
    "from outside them. If the documents do not contain the answer, say so plainly. Keep "
    "answers short: two or three sentences, written in plain English for a general reader, "
    "with no lists, headings or markdown."
)

DOCS = [
    # 0: geography
    "Geography of Kestria. The Republic of Kestria is a landlocked country of 148,000 square "
    "kilometres in the eastern highlands of the Varan continent. It borders Osmera to the "
    "north, Tellany to the east and the Duchy of Brask to the south and west. The Serrin "
    "Mountains run along the northern frontier and rise to 4,312 metres at Mount Adel, the "
    "highest point in the country. From the mountains the land falls southward through a belt "
    "of forested foothills to the Lowen Plain, a broad basin of fertile loess soils that holds "
    "two thirds of the population. The Amber River rises in the Serrin range, crosses the plain "
    "from north-west to south-east over 610 kilometres and leaves the country at the border "
    "town of Castrel. Its largest tributary, the Vell, drains the western hills and joins the "
    "Amber at the capital, Harrowgate, which stands on both banks of the confluence and has "
    "1.9 million inhabitants. Lake Orun, the largest body of fresh water in Kestria, fills a "
    "glacial valley in the foothills and covers 212 square kilometres. About 31 percent of the "
    "country is forested, mostly with beech and silver fir on the northern slopes, while the "
    "south-eastern corner near Castrel is a dry steppe used for grazing sheep and horses. The "
    "second city, Dunmere, grew up at the only pass through the Serrin Mountains that stays "
    "open in winter, and it remains the main road and rail gateway to Osmera.",
    # 1: climate
    "Climate of Kestria. Kestria has a continental climate with warm summers, cold winters and "
    "a marked difference between the highlands and the plain. In Harrowgate the average "
    "temperature is minus 4 degrees Celsius in January and 23 degrees in July, and the city "
    "receives about 640 millimetres of precipitation a year. Most of that rain falls between "
    "May and August, when moist air from the south-west meets the Serrin Mountains and "
    "produces heavy afternoon thunderstorms locally called the copper rains. The northern "
    "slopes are much wetter: weather stations near Mount Adel record more than 1,800 "
    "millimetres a year, much of it as snow, and the high passes are usually closed from "
    "November to April. The snowmelt each spring raises the Amber River by up to four metres "
    "at Harrowgate, and the great flood of 1887 destroyed the old lower town. Since the "
    "reservoirs of the Amber Valley Scheme were completed in 1974, spring floods have been "
    "held back and released slowly for irrigation and power. The south-eastern steppe around "
    "Castrel is the driest region, with less than 350 millimetres of rain and frequent summer "
    "droughts. The national weather service reports that average temperatures have risen by "
    "1.3 degrees since 1950, that the snow season in the Serrin range is now three weeks "
    "shorter than it was then, and that late frosts in May, once common on the plain, now "
    "occur in fewer than one year in five.",
    # 2: history
    "History of Kestria. The Lowen Plain was settled by farming peoples by the fourth "
    "millennium BC, and the hill fort at Old Dunmere is the oldest town site in the country. "
    "In 1204 the Amber principalities were united under Prince Taddeus the Elder, who founded "
    "Harrowgate at the meeting of the Amber and the Vell and built the stone bridge that still "
    "carries the old royal road. The principality grew rich on the amber and salt trade "
    "between the northern ports and the southern kingdoms. In 1611 it was annexed by the "
    "Osmeran Empire, which ruled Kestria for almost three centuries, moved the seat of "
    "government to Dunmere and made Osmeran the language of courts and schools. Resistance "
    "grew in the nineteenth century around reading societies and choirs that kept the Kestrian "
    "language alive. After the empire collapsed at the end of the Great War, a national "
    "assembly met in Harrowgate and declared independence on 14 March 1919. The young republic "
    "was occupied from 1941 to 1945 and then ruled for more than four decades by the "
    "single-party government of the People's Front, which nationalised industry and carried "
    "out the land reform of 1962, breaking up the large estates of the plain into cooperative "
    "farms. Mass demonstrations in the autumn of 1989, remembered as the Lantern Marches, "
    "ended one-party rule peacefully. Free elections followed in 1990, and Kestria joined the "
    "Varan Union in 2004.",
    # 3: government
    "Government of Kestria. Kestria is a parliamentary republic under the constitution "
    "adopted by referendum on 2 June 1991. The head of state is the President, elected by "
    "direct popular vote for a single term of six years; the office is mostly ceremonial, but "
    "the President appoints judges of the Constitutional Court, may return a law to "
    "parliament once for reconsideration and commands the armed forces in wartime. Executive "
    "power lies with the Prime Minister and the Council of Ministers, who must keep the "
    "confidence of the legislature. The parliament, called the Diet, has a single chamber of "
    "181 deputies elected every four years by proportional representation in nine regional "
    "constituencies, with a threshold of five percent of the national vote for parties. Since "
    "1990 no single party has won a majority, and every government has been a coalition; the "
    "current coalition of the Social Democrats and the Agrarian Union took office in 2021. "
    "The country is divided into nine regions, each with an elected assembly that runs "
    "schools, hospitals and regional roads, and into 212 municipalities. The Constitutional "
    "Court of nine judges reviews laws at the request of the President, one fifth of the "
    "deputies or any ordinary court. Kestrian and Osmeran are both official languages, and "
    "the constitution guarantees schooling in Osmeran in the northern regions, where about a "
    "tenth of the people speak it at home. Voting is open to all citizens from the age of "
    "eighteen.",
    # 4: economy
    "Economy of Kestria. Kestria has a mixed economy with a gross domestic product of about "
    "64 billion Kestrian crowns per year and a population of 6.2 million. Services produce "
    "58 percent of output, industry 33 percent and agriculture 9 percent, although farming "
    "still employs one worker in seven. The loess soils of the Lowen Plain yield wheat, "
    "sugar beet, sunflowers and barley, and the southern plain is known for its apricot and "
    "plum orchards; farmland there is irrigated from the reservoirs of the Amber Valley Scheme "
    "because summer rain is unreliable. The same scheme's four dams generate 41 percent of the "
    "country's electricity, and output falls sharply in dry years. Manufacturing is "
    "concentrated around Harrowgate and Dunmere and includes railway equipment, glass, "
    "pharmaceuticals and food processing. The largest single employer is Amberline, the "
    "railway engineering company privatised in 1996, which builds trams and regional trains "
    "for export. Tourism has grown quickly since 2004, drawn by the old town of Harrowgate, "
    "the ski resorts of the Serrin range and the spa towns around Lake Orun. After the land "
    "reform of 1962 the cooperatives raised grain output but neglected orchards and "
    "livestock; most cooperative land was returned to private farmers in the 1990s. "
    "Unemployment stood at 5.8 percent in 2023 and inflation at 3.1 percent. The crown is "
    "managed by the National Bank of Kestria, which targets inflation of two percent.",
    # 5: culture
    "Culture of Kestria. Kestrian culture mixes old peasant traditions of the Lowen Plain "
    "with the urban heritage of Harrowgate and the influence of three centuries of Osmeran "
    "rule. The Kestrian language belongs to the Varan family and is written in a Latin "
    "alphabet with six extra letters, introduced by the grammarian Elsbet Marrow in 1852. "
    "Choral singing is the best-known national art: the Song Festival, held every five years "
    "in Harrowgate since 1869, brings together more than twenty thousand singers on a single "
    "open-air stage, and during the years of foreign rule it served as a quiet demonstration "
    "of national feeling. Independence Day on 14 March is celebrated with the Lantern Night, "
    "when families carry paper lanterns to the Amber bridges, a custom that recalls both the "
    "declaration of 1919 and the Lantern Marches of 1989. The national dish, vellen, is a "
    "stew of lamb, barley and dried plums, and apricot brandy is served at weddings. The "
    "writer Anton Greve, whose novel The Salt Road describes the amber traders of the Middle "
    "Ages, is the most widely read Kestrian author, and the painter Mira Sollen is known for "
    "her landscapes of the Serrin Mountains. Football and ice hockey are the most popular "
    "sports, and the national hockey team won the Varan championship in 2016. The National "
    "Museum in Harrowgate keeps the Amber Crown of Prince Taddeus, the oldest surviving royal "
    "regalia of the region.",
]

DOC_TITLES = ["geography", "climate", "history", "government", "economy", "culture"]

# (question, retrieved document ids sorted by id): 4 distinct sets, two questions each
QUESTIONS = [
    ("Why is the southern Lowen Plain irrigated, and what grows there?", (0, 1, 4)),
    ("How does the weather affect how much electricity the dams produce?", (0, 1, 4)),
    ("How did the Amber River shape where the capital was built?", (0, 1, 2)),
    ("What happened to Harrowgate during the flood of 1887?", (0, 1, 2)),
    ("When did Kestria become independent, and how is that day celebrated?", (2, 3, 5)),
    ("Which languages are official, and why is Osmeran one of them?", (2, 3, 5)),
    ("What did the land reform of 1962 do to farming?", (2, 3, 4)),
    ("Which parties govern Kestria now, and how is parliament elected?", (2, 3, 4)),
]

WARMUP_SYSTEM = "You are a friendly assistant."
WARMUP_DOC = "Tea is made by pouring hot water over dried leaves of the tea plant."
WARMUP_QUERIES = ["How is tea made?", "What is tea?"]


def compositions() -> list[Composition]:
    return [
        Composition(query=q, chunks=[DOCS[d] for d in docs], system=SYSTEM) for q, docs in QUESTIONS
    ]


def warmup_compositions() -> list[Composition]:
    return [Composition(query=q, chunks=[WARMUP_DOC], system=WARMUP_SYSTEM) for q in WARMUP_QUERIES]


def greedy(max_tokens: int = MAX_NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def run_hf(hf_model, prompts: list[list[int]], max_new: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """transformers greedy generate, one request at a time; returns the new token ids."""
    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            out = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                pad_token_id=hf_model.config.eos_token_id,
            )
            outputs.append(out[0, len(ids) :].tolist())
    return outputs


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    loaded = load_model(dtype=torch.float32)
    tokenizer = loaded.tokenizer
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(loaded.model_dir, dtype=torch.float32).eval()

    engine_plain = CascadeEngine(loaded, enable_chunk_cache=False, kv_cache_tokens=KV_CACHE_TOKENS)
    engine_cached = CascadeEngine(loaded, kv_cache_tokens=KV_CACHE_TOKENS)
    comps = compositions()
    # Ids from the uncached engine: preparing on the cached engine would only register chunk
    # token ids (no KV), but this keeps its cold run untouched.
    prompts = [engine_plain.prepare(c).token_ids for c in comps]
    num_prompt_tokens = sum(len(p) for p in prompts)
    num_new = len(prompts) * MAX_NEW_TOKENS

    doc_tokens = [len(tokenizer.encode(d, add_special_tokens=False)) for d in DOCS]
    system_tokens = len(tokenizer.encode(SYSTEM, add_special_tokens=False))
    system_chunk = engine_plain.register_chunk(SYSTEM, type=ChunkType.SYSTEM_PROMPT)
    print("CPU RAG benchmark: transformers generate vs cascade-rag engine (float32, greedy)")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpu_count={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()} torch={torch.__version__} "
        f"load_avg={' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"model: {loaded.model_id}")
    print(
        f"workload: {len(prompts)} questions x (system prompt + 3 of {len(DOCS)} shared documents "
        f"+ question), {MAX_NEW_TOKENS} new tokens each (greedy, EOS ignored)"
    )
    print(
        f"  system prompt: {system_tokens} tokens of text, {len(system_chunk.token_ids)} with "
        "the chat template's system turn"
    )
    print(
        "  documents (tokens): "
        + ", ".join(f"{i}:{t}={n}" for i, (t, n) in enumerate(zip(DOC_TITLES, doc_tokens)))
    )
    print("  retrieved sets (document ids sorted, as a canonical retriever returns them):")
    for (question, docs), ids in zip(QUESTIONS, prompts):
        print(f"    {list(docs)}  {len(ids):5d} prompt tokens  {question}")
    print(
        f"  total: {num_prompt_tokens} prompt tokens, {num_new} new tokens; "
        f"{len({d for _, d in QUESTIONS})} distinct document sets"
    )

    # Warm-up: short, unrelated prompts; they share no chunk with the benchmark.
    warm = warmup_compositions()
    run_hf(hf_model, [engine_plain.prepare(c).token_ids for c in warm[:1]], max_new=4)
    engine_plain.generate(warm, greedy(4))
    engine_cached.generate(warm, greedy(4))

    rows = []

    def add_row(name: str, seconds: float, tokens: list[list[int]], computed: int, ref) -> None:
        rows.append(
            dict(
                system=name,
                seconds=seconds,
                output_tokens_per_s=sum(len(t) for t in tokens) / seconds,
                prompt_tokens_computed=computed,
                outputs_identical=None if ref is None else tokens == ref,
            )
        )

    hf_s, hf_tokens = timed(lambda: run_hf(hf_model, prompts))
    add_row("transformers generate, 1 at a time", hf_s, hf_tokens, num_prompt_tokens, None)

    for name, engine in [
        ("engine, chunk cache off, batch of 8", engine_plain),
        ("engine, chunk cache + cascade, cold", engine_cached),
        ("engine, chunk cache + cascade, warm", engine_cached),
    ]:
        seconds, outs = timed(lambda e=engine: e.generate(comps, greedy()))
        computed = sum(o.usage.prompt_tokens - o.usage.cached_tokens for o in outs)
        add_row(name, seconds, [o.token_ids for o in outs], computed, hf_tokens)

    for row in rows:
        row["speedup_vs_hf"] = hf_s / row["seconds"]
    print()
    header = (
        f"{'system':38s} {'seconds':>8s} {'out tok/s':>10s} {'prompt tok computed':>20s} "
        f"{'vs HF':>7s}  outputs identical"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        same = row["outputs_identical"]
        same = "(baseline)" if same is None else ("yes" if same else "no")
        print(
            f"{row['system']:38s} {row['seconds']:8.2f} {row['output_tokens_per_s']:10.1f} "
            f"{row['prompt_tokens_computed']:20d} {row['speedup_vs_hf']:6.2f}x  {same}"
        )

    engine_plain.close()
    engine_cached.close()
    if args.json:
        result = dict(
            machine=dict(
                cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(),
                load_avg=os.getloadavg(),
                torch=torch.__version__,
            ),
            model=loaded.model_id,
            workload=dict(
                questions=[dict(question=q, docs=list(d)) for q, d in QUESTIONS],
                document_tokens=doc_tokens,
                system_prompt_tokens=system_tokens,
                prompt_tokens=num_prompt_tokens,
                new_tokens_per_question=MAX_NEW_TOKENS,
            ),
            rows=rows,
        )
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
