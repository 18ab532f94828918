"""Decode CUDA graphs and fused kernels on the GPU (skipped without CUDA and FlashInfer).

- Graph-safe attention captured once per number of shared levels, then replayed for steps of
  5..48 sequences (padded to 48) with 0-3 shared levels, planned afresh each time: equals the
  eager FlashInfer backend and the float32 PyTorch reference.
- Engine steps (plain, cascade with 1-3 shared levels, 37 sequences padded to 48, chunks that
  end inside pages so admission makes boundary-page copies): a step replayed from a graph equals
  the same step run eagerly from the same cache state (logits within bf16 tolerance, same
  tokens), and the graph path's logits equal Hugging Face transformers' on the same weights.
- Cascade with graphs generates what plain decode with graphs generates (ties allowed).
- The fused model path with FlashInfer's kernels equals the unfused bf16 path.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flashinfer", reason="needs the gpu extra (flashinfer-python)")

from cascade_rag.attention.flashinfer_backend import FlashInferAttention  # noqa: E402
from cascade_rag.attention.flashinfer_graph import DecodeGraphAttention
from cascade_rag.attention.metadata import AttentionMetadata, CascadeLevel
from cascade_rag.attention.torch_backend import TorchAttention
from cascade_rag.chunks import ChunkType
from cascade_rag.engine.cascade_plan import SeqView, order_for_sharing, plan_levels
from cascade_rag.engine.cuda_graph import run_with_graphs
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams

DEV = torch.device("cuda")


def take_graphs(runner):
    """The engine's own decode graphs, detached from its runner so that `runner.run` stays
    eager and `run_with_graphs` replays them explicitly."""
    graphs, runner.graphs = runner.graphs, None
    return graphs


# ---- attention alone -------------------------------------------------------------------


def _decode_step(rng: random.Random, n: int, page_size: int, num_pages: int, long=False):
    """n decode sequences sharing a prefix (`long`: over 2048 tokens), group middles and
    subgroup parts (some nothing), own lengths up to ~12 pages that do not fill pages; page 0
    is the scratch page."""
    free = iter(rng.sample(range(1, num_pages), num_pages - 1))
    shared = [next(free) for _ in range(rng.randint(140, 160) if long else rng.randint(4, 40))]
    middles = [[next(free) for _ in range(rng.randint(0, 6))] for _ in range(3)]
    subs = [[next(free) for _ in range(rng.randint(0, 3))] for _ in range(6)]
    views, slots = [], []
    for i in range(n):
        prefix = [] if i % 5 == 4 else shared + middles[i % 3] + subs[i % 6]
        own_len = rng.randint(1, 12 * page_size - 3)
        table = prefix + [next(free) for _ in range(-(-own_len // page_size))]
        kv_len = len(prefix) * page_size + own_len
        views.append(SeqView(table, kv_len, 1))
        pos = kv_len - 1
        slots.append(table[pos // page_size] * page_size + pos % page_size)
    return views, slots


def _metadata(views, slots, page_size, max_levels, indices_on_device):
    order = order_for_sharing(views, page_size)
    levels = plan_levels([views[i] for i in order], page_size, max_levels)
    if indices_on_device:  # as the engine's block-table layout hands them
        levels = [CascadeLevel(lv.qo_indptr, lv.kv_indptr, lv.kv_indices.to(DEV),
                               lv.kv_last_page_len, lv.causal) for lv in levels]  # fmt: skip
    empty = torch.zeros(0, dtype=torch.int64, device=DEV)
    return AttentionMetadata(
        page_size=page_size,
        slot_mapping=torch.tensor([slots[i] for i in order], device=DEV),
        copy_src=empty,
        copy_dst=empty,
        levels=levels,
    )


@pytest.mark.parametrize(
    "backend,pieces,short,kernel",
    [("fa2", 1, None, "decode"), ("fa2", 4, 200, "prefill"), ("fa3", 4, 200, "decode")],
)
def test_graph_attention_replays_like_the_eager_backend(backend, pieces, short, kernel):
    """Graph replays (shared keys split by FlashInfer or cut into parts, FA2 or FA3 kernels
    for the shared levels, short last levels on the CUDA-core decode kernel or the tensor-core
    one without split-KV) equal the eager backend and the float32 reference."""
    hq, hk, d, ps, num_pages, b = 32, 8, 64, 16, 4000, 48
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device=DEV)
    attn = DecodeGraphAttention(
        hq, hk, d, ps, torch.bfloat16, DEV, b, 3, num_pages, 0, workspace,
        shared_backend=backend, shared_pieces=pieces, short_last_tokens=short,
        short_last_kernel=kernel,
    )  # fmt: skip
    torch.manual_seed(0)
    shape = (num_pages, ps, hk, d)
    k_cache = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    q = torch.zeros(b, hq, d, device=DEV, dtype=torch.bfloat16)
    k = torch.zeros(b, hk, d, device=DEV, dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    outs, graphs = {}, {}
    pool = torch.cuda.graph_pool_handle()
    for key in [(n, short) for n in range(4) for short in attn.last_variants]:
        attn.plan_dummy(*key)
        out = outs[key] = torch.zeros(b, hq, d, device=DEV, dtype=torch.bfloat16)

        def forward(out=out):
            out.copy_(attn.forward(q, k, v, k_cache, v_cache))

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graphs[key] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[key], pool=pool):
            forward()
    eager = FlashInferAttention(hq, hk, d, ps, torch.bfloat16, DEV, max_levels=4)
    rng = random.Random(0)
    steps = [(37, 1), (48, 2), (5, 3), (41, 4), (37, 4), (20, 2), (48, 4), (1, 1)]
    steps += [(37, 1, True), (5, 1, True), (44, 3, True)]  # long shared prefixes
    seen = set()
    for step, (n, max_levels, *long) in enumerate(steps):
        views, slots = _decode_step(rng, n, ps, num_pages, long=bool(long))
        meta = _metadata(views, slots, ps, max_levels, indices_on_device=step % 2 == 1)
        layout = attn.layout(meta)
        assert layout is not None, f"step {step} does not fit"
        key = (len(meta.levels) - 1, layout.short)
        seen.add(key)
        q.normal_()
        k.normal_()
        v.normal_()
        k_before, v_before = k_cache.clone(), v_cache.clone()
        attn.plan(layout)
        attn.set_slots(meta.slot_mapping, n)
        graphs[key].replay()
        got = outs[key][:n].float()
        k_graph = k_cache.clone()
        k_cache.copy_(k_before)
        v_cache.copy_(v_before)
        eager.plan(meta)
        want = eager.forward(q[:n], k[:n], v[:n], k_cache, v_cache).float()
        err = (got - want).abs()
        assert err.max() < 2e-2, f"step {step}: vs eager max {err.max():.3g} mean {err.mean():.3g}"
        ref_backend = TorchAttention(hq, hk, d)
        ref_backend.plan(meta)
        ref = ref_backend.forward(q[:n].float(), k[:n].float(), v[:n].float(),
                                  k_before.float(), v_before.float())  # fmt: skip
        err = (got - ref).abs()
        assert err.max() < 3e-2, f"step {step}: vs fp32 max {err.max():.3g} mean {err.mean():.3g}"
        k_graph[0], k_cache[0] = 0, 0  # the scratch page
        assert torch.equal(k_graph, k_cache), f"step {step}: K written elsewhere than eagerly"
        torch.cuda.synchronize()  # plans write pinned buffers: the last replay has used them
    assert {n for n, _ in seen} == {0, 1, 2, 3}
    assert {short for _, short in seen} == set(attn.last_variants)


def test_flashinfer_rows_without_keys():
    """What FlashInfer's paged prefill gives rows of an entry without keys (the graph path
    masks them out of the merge, so any value is safe; recorded for the report)."""
    hq, hk, d, ps = 8, 2, 64, 16
    workspace = torch.zeros(32 << 20, dtype=torch.uint8, device=DEV)
    import flashinfer

    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    k_cache = torch.randn(4, ps, hk, d, device=DEV, dtype=torch.bfloat16)
    i32 = dict(dtype=torch.int32)
    wrapper.plan(torch.tensor([0, 2, 4], **i32), torch.tensor([0, 1, 1], **i32),
                 torch.tensor([1], **i32, device=DEV), torch.tensor([ps, 0], **i32),
                 hq, hk, d, ps, causal=False, q_data_type=torch.bfloat16)  # fmt: skip
    q = torch.randn(4, hq, d, device=DEV, dtype=torch.bfloat16)
    out, lse = wrapper.run(q, (k_cache, k_cache), return_lse=True)
    empty_out, empty_lse = out[2:].float(), lse[2:]
    print(
        f"rows without keys: out finite {bool(torch.isfinite(empty_out).all())}, "
        f"max |out| {empty_out.abs().max():.3g}, lse {empty_lse.flatten()[:4].tolist()}"
    )
    assert torch.isfinite(out[:2].float()).all()


# ---- engine steps ----------------------------------------------------------------------


def _prompts(engine, rng: random.Random, n: int):
    """system | doc a | doc b | doc c: nested groups (up to 3 shared levels); chunk lengths
    that do not fill 16-token pages (boundary-page copies at admission)."""
    vocab = engine.model_config.vocab_size

    def chunk(size):
        return engine.register_token_chunk([rng.randrange(1, vocab) for _ in range(size)])

    system = engine.register_token_chunk(
        [rng.randrange(1, vocab) for _ in range(53)], ChunkType.SYSTEM_PROMPT
    )
    a = [chunk(rng.randint(40, 90)) for _ in range(2)]
    b = [chunk(rng.randint(40, 90)) for _ in range(2)]
    c = [chunk(rng.randint(20, 50)) for _ in range(2)]
    prompts = []
    for i in range(n):
        query = tuple(rng.randrange(1, vocab) for _ in range(rng.randint(5, 20)))
        chunks = (system, a[i % 2], b[(i // 2) % 2], c[(i // 4) % 2])[: 1 + i % 4]
        prompts.append(PreparedPrompt(chunks, query))
    return prompts


def _snapshot(caches):
    return [(k.clone(), v.clone()) for k, v in caches]


def _restore(caches, saved):
    for (k, v), (k0, v0) in zip(caches, saved):
        k.copy_(k0)
        v.copy_(v0)


@pytest.mark.parametrize("levels,fused", [(1, False), (2, False), (3, False), (4, False),
                                          (1, True), (3, True)])  # fmt: skip
def test_decode_graph_replay_equals_eager(llama_dir, levels, fused):
    """With `fused` the graphs run RoPE, the parts' query copies and the KV append as one
    Triton kernel (cuda_graph_fused_rope)."""
    from transformers import AutoModelForCausalLM

    kw = dict(cascade=False) if levels == 1 else dict(max_cascade_levels=levels)
    kw.update(cuda_graph_fused_rope=fused)
    if levels == 1:  # capture all buckets at start
        kw.update(cuda_graph_capture="warm", cuda_graph_max_batch=48)
    with CascadeEngine(
        str(llama_dir), dtype="bfloat16", device="cuda", kv_cache_tokens=1 << 15,
        max_num_batched_tokens=16384, cascade_min_shared_tokens=0, **kw,
    ) as engine:  # fmt: skip
        core = engine._core
        runner = core.runner
        graphs = take_graphs(runner)
        assert graphs is not None
        if levels == 1:
            variants = len(graphs._bucket_attention(48).last_variants)  # long and short
            assert graphs.num_captures == len(graphs.buckets) * variants == 8 * variants
        hf = None
        if levels == 3:
            hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).to(DEV)
        rng = random.Random(levels)
        for p in _prompts(engine, rng, 37):
            core.add_request(p, SamplingParams(max_tokens=8), 8, False)
        caches = runner.pool.kv_caches
        replayed, copies_seen = 0, False
        for step in range(5):
            plan = core.scheduler.schedule()
            batch = plan.scheduled
            if step == 0:
                with torch.inference_mode():
                    meta = runner.prepare(batch).metadata
                copies_seen = meta.copy_src.numel() > 0
            saved = _snapshot(caches)
            eager = runner.run(batch).float()
            after_eager = _snapshot(caches)
            _restore(caches, saved)
            before = graphs.num_replays
            got = run_with_graphs(runner, graphs, batch).float()
            replayed += graphs.num_replays - before
            err = (got - eager).abs().max() / eager.abs().max()
            assert err < 2e-2, f"step {step}: relative max err {err:.3g} vs eager"
            same = got.argmax(-1) == eager.argmax(-1)
            top = eager.topk(2, dim=-1).values
            gap = (top[:, 0] - top[:, 1]) / eager.abs().amax(-1)
            assert bool((same | (gap < 1e-2)).all()), f"step {step}: tokens differ"
            for (k, v), (ke, ve) in zip(caches, after_eager):
                for cache, want in ((k, ke), (v, ve)):
                    cache[graphs.scratch_page] = want[graphs.scratch_page]
                    diff = (cache.float() - want.float()).abs().max()
                    assert diff < 5e-2, f"step {step}: KV differs by {diff:.3g}"
            core.scheduler.finish_step(plan, failed=False)
            for row, entry in enumerate(batch):
                if hf is not None:
                    ids = torch.tensor([entry.seq.token_ids], device=DEV)
                    with torch.inference_mode():
                        ref = hf(ids).logits[0, -1].float()
                    rel = (got[row] - ref).abs().max() / ref.abs().max()
                    assert rel < 5e-2, f"step {step} row {row}: graph vs HF {rel:.3g}"
                entry.seq.token_ids.append(int(eager[row].argmax()))
        assert copies_seen, "the prefill step made no boundary-page copies"
        assert replayed == 4, f"{replayed} of 4 decode steps replayed"
        shared_counts = {key[1] for key in graphs._graphs}
        if levels > 1:
            assert max(shared_counts) > 0, f"no graph with shared levels: {shared_counts}"
        print(f"levels={levels}: graphs {sorted(graphs._graphs)}")


def _patched(engine):
    runner = engine._core.runner
    assert runner.graphs is not None, "the engine made no decode graphs"
    return runner.graphs


def test_cascade_equals_plain_with_graphs(llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).to(DEV).eval()
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    outs = {}
    configs = {"cascade": dict(cascade_min_shared_tokens=0), "plain": dict(cascade=False)}
    for name, kw in configs.items():
        with CascadeEngine(str(llama_dir), dtype="bfloat16", device="cuda",
                           kv_cache_tokens=1 << 15, **kw) as engine:  # fmt: skip
            graphs = _patched(engine)
            prompts = _prompts(engine, random.Random(5), 12)
            outs[name] = [o.token_ids for o in engine.generate(prompts, params)]
            assert graphs.num_replays >= 14
    exact = 0
    for i, (p, c, pl) in enumerate(zip(prompts, outs["cascade"], outs["plain"])):
        exact += c == pl
        if c != pl:
            j = next(t for t, (x, y) in enumerate(zip(c, pl)) if x != y)
            ids = torch.tensor([p.token_ids + pl[:j]], device=DEV)
            with torch.inference_mode():
                logits = hf(ids).logits[0, -1].float()
            top = logits.topk(2).values
            gap = float(top[0] - top[1]) / float(logits.abs().max())
            assert gap < 2e-2, f"prompt {i}: token {j} differs with a top-2 gap of {gap:.3g}"
    # every difference above is a near tie of this random model (bf16 kernels that round
    # differently flip those: 9 of 12 identical seen on the H200 with the CUDA-core decode
    # kernel); exact equality is asserted on the peaked model (test_peaked_model_gpu.py)
    assert exact >= len(prompts) // 2, f"only {exact} of {len(prompts)} identical"


# ---- fused kernels ---------------------------------------------------------------------


class _DenseCausal:
    def forward(self, q, k, v, k_cache, v_cache):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
        )
        return out.transpose(0, 1)


def test_fused_kernels_match_the_unfused_bf16_path(llama_dir):
    from cascade_rag.models.loader import load_model

    model = load_model(str(llama_dir), dtype=torch.bfloat16, device="cuda").model
    fused = {}
    for kind in ("flashinfer", "torch"):
        fused[kind] = copy.deepcopy(model)
        fused[kind].fuse_for_speed(kind)
    torch.manual_seed(0)
    n = 300
    ids = torch.randint(1, model.config.vocab_size, (n,), device=DEV)
    pos = torch.arange(7, 7 + n, device=DEV)
    caches = [(None, None)] * model.config.num_layers
    with torch.inference_mode():
        ref = model.compute_logits(model(ids, pos, caches, _DenseCausal()))
        got = {k: m.compute_logits(m(ids, pos, caches, _DenseCausal())) for k, m in fused.items()}
    scale = ref.abs().max()
    for kind, logits in got.items():
        err = (logits - ref).abs().max() / scale
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
        print(f"fused {kind} vs unfused bf16: relative max err {err:.3g}, argmax agree {agree:.3f}")
        assert err < 5e-2 and agree > 0.97, kind
    err = (got["flashinfer"] - got["torch"]).abs().max() / scale
    assert err < 5e-2
