"""DSA in the model (``attention="mla_dsa"``, ``r1kernels.nn.sparse_dsa.MLADSA``): dense MLA when every token
is selected, decode through the paged cache against the cache-free forward when few are, generation, and
the indexer's training loss and gradients."""
import dataclasses

import pytest
import torch

from conftest import MODEL_ATOL, TOL
from r1kernels import ModelConfig, Transformer, use_backend
from r1kernels.inference import generate
from r1kernels.nn import MLA, LatentKVCache, RotaryEmbedding
from r1kernels.nn.sparse_dsa import MLADSA
from r1kernels.reference import sparse_dsa as ref

S = 40  # sequence length of the model tests
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the Triton test: GPU, else the interpreter


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this file: its ops are tiny ([2, 1, 256] in a decode step), so threads only
    add overhead, and on a busy 2-core machine OpenMP's waiting threads make each op ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(seed: int, **overrides) -> Transformer:
    cfg = dataclasses.replace(ModelConfig.preset("tiny-dsa"), **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    # larger weights than init's 0.02: logits and index scores are then not nearly flat, so that argmax and
    # top-k decisions do not hinge on the order of float sums
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def dense_twin(model: Transformer) -> Transformer:
    """The dense-MLA model with ``model``'s weights (every parameter but the indexers')."""
    dense = Transformer(dataclasses.replace(model.config, attention="mla")).eval()
    result = dense.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and all(".indexer." in k for k in result.unexpected_keys)
    return dense


def token_ids(b: int, s: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def module_inputs(cfg: ModelConfig, b: int, s: int, seed: int = 0, start: int = 0):
    """x ``[B, S, D]`` and the cos / sin of positions ``start + [0, S)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, cfg.hidden_size, generator=g)
    rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_kwargs)
    cos, sin = rotary(torch.arange(start, start + s).expand(b, s))
    return x, cos, sin


def twin_modules(cfg: ModelConfig, seed: int = 0) -> tuple[MLADSA, MLA]:
    torch.manual_seed(seed)
    dsa = MLADSA(cfg).eval()
    mla = MLA(cfg).eval()
    result = dsa.load_state_dict(mla.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("indexer.") for k in result.missing_keys)
    return dsa, mla


# ------------------------------------------------------------------------------------------ the module


@pytest.mark.parametrize("q_lora_rank", [96, None])
@torch.no_grad()
def test_module_with_every_token_selected_is_dense_mla(q_lora_rank):
    cfg = dataclasses.replace(ModelConfig.preset("tiny-dsa"), q_lora_rank=q_lora_rank, index_topk=64)
    dsa, mla = twin_modules(cfg)
    x, cos, sin = module_inputs(cfg, 2, 19)
    want = mla(x, cos, sin)
    torch.testing.assert_close(dsa(x, cos, sin), want, **TOL[torch.float32])
    # through a cache: a 13-token prefill, then 6 tokens in one step, against MLA's absorbed decode
    caches = [LatentKVCache(1, 2, 19, cfg.kv_lora_rank + cfg.qk_rope_head_dim, page_size=4,
                            index_dim=cfg.index_head_dim) for _ in range(2)]
    for c in caches:
        c.kv.fill_(float("nan"))
        c.index_keys.fill_(float("nan"))
    for lo, hi in ((0, 13), (13, 19)):
        a = dsa(x[:, lo:hi], cos[:, lo:hi], sin[:, lo:hi], cache=caches[0])
        b = mla(x[:, lo:hi], cos[:, lo:hi], sin[:, lo:hi], cache=caches[1], absorbed=True)
        torch.testing.assert_close(a, b, **TOL[torch.float32])
        torch.testing.assert_close(a, want[:, lo:hi], **TOL[torch.float32])
        for c in caches:
            c.advance(hi - lo)


@torch.no_grad()
def test_module_with_few_selected_rows_differs_from_dense_and_cache_agrees():
    cfg = dataclasses.replace(ModelConfig.preset("tiny-dsa"), index_topk=5)
    dsa, mla = twin_modules(cfg, seed=1)
    x, cos, sin = module_inputs(cfg, 2, 17, seed=1)
    full = dsa(x, cos, sin)
    # the first 5 queries see at most 5 tokens: dense; the later ones drop rows
    torch.testing.assert_close(full[:, :5], mla(x, cos, sin)[:, :5], **TOL[torch.float32])
    assert (full[:, 5:] - mla(x, cos, sin)[:, 5:]).abs().amax() > 1e-2
    cache = LatentKVCache(1, 2, 17, cfg.kv_lora_rank + cfg.qk_rope_head_dim, page_size=4, index_dim=cfg.index_head_dim)
    # pages in a shuffled order: the block table, not the storage order, says where a position lives
    cache.block_table.copy_(torch.randperm(cache.kv.shape[1], generator=torch.Generator().manual_seed(3))
                            .view_as(cache.block_table).int())
    cache.kv.fill_(float("nan"))
    cache.index_keys.fill_(float("nan"))
    for lo, hi in ((0, 7), (7, 8), (8, 17)):
        torch.testing.assert_close(dsa(x[:, lo:hi], cos[:, lo:hi], sin[:, lo:hi], cache=cache), full[:, lo:hi],
                                   **TOL[torch.float32])
        cache.advance(hi - lo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_module_on_the_triton_kernels_matches_the_references(dtype):
    """Every op forced to Triton (the interpreter here) against the references: forward without and with a
    cache, and (fp32) the backward of output + indexer loss. The few selected rows (K = 5 of 11) make the
    check cover the selection; the two backends see the same index scores up to rounding."""
    cfg = dataclasses.replace(ModelConfig.preset("tiny-dsa"), index_topk=5)
    dsa, _ = twin_modules(cfg, seed=1)
    dsa = dsa.to(DEV, dtype)
    x, cos, sin = (t.to(DEV) for t in module_inputs(cfg, 2, 11, seed=1))
    x = x.to(dtype).requires_grad_(dtype == torch.float32)
    grads = []
    for backend in ("reference", "triton"):
        dsa.zero_grad(set_to_none=True)
        x.grad = None
        aux = []
        with use_backend(backend):
            y = dsa(x, cos, sin, aux=aux)
            cache = LatentKVCache(1, 2, 11, cfg.kv_lora_rank + cfg.qk_rope_head_dim, page_size=4, dtype=dtype,
                                  device=DEV, index_dim=cfg.index_head_dim)
            cache.kv.fill_(float("nan"))
            cache.index_keys.fill_(float("nan"))
            with torch.no_grad():
                y_cached = dsa(x[:, :6], cos[:, :6], sin[:, :6], cache=cache)
                cache.advance(6)
                y_cached = torch.cat([y_cached, dsa(x[:, 6:], cos[:, 6:], sin[:, 6:], cache=cache)], dim=1)
            if dtype == torch.float32:
                (y.sum() + aux[0]).backward()
        grads.append((y.detach(), y_cached, aux[0].detach(), x.grad,
                      {n: p.grad for n, p in dsa.named_parameters()}))
    (y_ref, yc_ref, aux_ref, gx_ref, gp_ref), (y_tri, yc_tri, aux_tri, gx_tri, gp_tri) = grads
    torch.testing.assert_close(y_tri, y_ref, **TOL[dtype])
    torch.testing.assert_close(yc_tri, y_ref, **TOL[dtype])
    torch.testing.assert_close(yc_ref, y_ref, **TOL[dtype])
    torch.testing.assert_close(aux_tri, aux_ref, **TOL[torch.float32])
    if dtype == torch.float32:
        torch.testing.assert_close(gx_tri, gx_ref, **TOL[dtype])
        for name, g in gp_ref.items():
            assert g is not None and gp_tri[name] is not None, name
            torch.testing.assert_close(gp_tri[name], g, **TOL[dtype], msg=name)


def test_indexer_loss_is_the_kl_to_the_expanded_attention():
    """The aux loss against a target built independently: the expanded (per-head keys) attention's
    probabilities summed over heads, through the reference indexer and KL."""
    cfg = dataclasses.replace(ModelConfig.preset("tiny-dsa"), index_topk=6)
    dsa, _ = twin_modules(cfg, seed=2)
    b, s = 2, 11
    x, cos, sin = module_inputs(cfg, b, s, seed=2)
    aux = []
    dsa(x, cos, sin, aux=aux)
    assert len(aux) == 1 and aux[0].dim() == 0 and aux[0].dtype == torch.float32
    with torch.no_grad():
        q_nope, q_pe, c_kv, k_pe = dsa._project(x, cos, sin)
        h, dn = dsa.n_heads, dsa.qk_nope_head_dim
        k_nope = dsa.kv_b_proj(c_kv).view(b, s, h, -1)[..., :dn]  # [B, S, H, Dn]
        q = torch.cat([q_nope, q_pe], -1)  # [B, S, H, Dqk]
        k = torch.cat([k_nope, k_pe.expand(b, s, h, -1)], -1)
        logits = torch.einsum("bshd,bthd->bsht", q, k) * dsa.softmax_scale
        causal = torch.ones(s, s, dtype=torch.bool).tril()  # [S, T]
        target = torch.softmax(logits.masked_fill(~causal[None, :, None, :], float("-inf")), -1).sum(2)
        q_idx, w = dsa.indexer.query(dsa.q_latent(x), x, cos, sin)
        scores = ref.lightning_indexer(q_idx, dsa.indexer.key(x, cos, sin), w,
                                       q_positions=torch.arange(s).expand(b, s))
        want = ref.indexer_kl_loss(scores, target)
    torch.testing.assert_close(aux[0].detach(), want, **TOL[torch.float32])
    assert want > 0


def test_module_argument_errors():
    cfg = ModelConfig.preset("tiny-dsa")
    dsa = MLADSA(cfg)
    x, cos, sin = module_inputs(cfg, 1, 3)
    plain = LatentKVCache(1, 1, 8, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    with pytest.raises(ValueError, match="no indexer keys"):
        dsa(x, cos, sin, cache=plain)
    with_keys = LatentKVCache(1, 1, 8, cfg.kv_lora_rank + cfg.qk_rope_head_dim, index_dim=cfg.index_head_dim)
    with pytest.raises(ValueError, match="aux"):
        dsa(x, cos, sin, cache=with_keys, aux=[])
    with pytest.raises(ValueError, match="index_head_dim"):
        MLADSA(dataclasses.replace(cfg, index_head_dim=8))
    with pytest.raises(ValueError, match="write_index"):
        with_keys.write_index(0, torch.zeros(1, 2, cfg.index_head_dim + 1))


# ------------------------------------------------------------------------------------------- the model


@torch.no_grad()
def test_model_with_topk_past_the_sequence_equals_the_dense_model():
    model = make_model(0)
    assert model.config.index_topk >= S
    ids = token_ids(2, S, model.config.vocab_size)
    logits = model(ids)
    assert logits.shape == (2, S, model.config.vocab_size) and bool(torch.isfinite(logits).all())
    assert (logits - dense_twin(model)(ids)).abs().max() <= MODEL_ATOL


@torch.no_grad()
def test_sparse_model_decode_equals_the_full_forward():
    model = make_model(1, index_topk=8)
    ids = token_ids(2, S, model.config.vocab_size, seed=1)
    full = model(ids)  # [B, S, V]
    assert (full - dense_twin(model)(ids)).abs().max() > 1e-2  # the selection matters
    cache = model.new_cache(2, S, page_size=16)
    cache.kv.fill_(float("nan"))  # slots not yet written must never be read
    cache.index_keys.fill_(float("nan"))
    steps = [model(ids[:, :1], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(1, S)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= MODEL_ATOL
    # a longer prefill, then chunks (several queries per step, each with its own causal selection)
    cache = model.new_cache(2, S, page_size=16)
    cache.kv.fill_(float("nan"))
    cache.index_keys.fill_(float("nan"))
    chunks = [model(ids[:, lo:hi], cache=cache) for lo, hi in ((0, 13), (13, 14), (14, 29), (29, S))]
    assert (torch.cat(chunks, dim=1) - full).abs().max() <= MODEL_ATOL


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    """The full forward over the whole sequence at every step, no cache."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_generate_greedy_equals_a_cache_free_loop():
    model = make_model(2, index_topk=8)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (13, 3, 9)]
    out = generate(model, prompts, max_new_tokens=8, page_size=8)
    assert [len(t) for t in out.tokens] == [8, 8, 8]
    for prompt, got in zip(prompts, out.tokens):
        assert got == greedy_without_cache(model, prompt, 8)


def test_training_forward_appends_one_indexer_loss_per_layer_and_trains_the_indexer():
    model = make_model(3, index_topk=8).train()
    ids = token_ids(2, 24, model.config.vocab_size, seed=3)
    aux = []
    hidden, _ = model.forward_train(ids, aux=aux)
    assert len(aux) == model.config.num_hidden_layers
    assert all(a.dim() == 0 and bool(torch.isfinite(a)) and a > 0 for a in aux)
    (hidden.sum() + sum(aux)).backward()
    indexer = {n: p for n, p in model.named_parameters() if ".indexer." in n and not n.startswith("mtp.")}
    assert len(indexer) == 5 * model.config.num_hidden_layers
    for name, p in indexer.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert all(bool(p.grad.abs().sum() > 0) for n, p in indexer.items() if "wq_b" in n or "wk" in n)
    attn = model.layers[1].self_attn
    assert bool(torch.isfinite(attn.kv_b_proj.weight.grad).all()) and attn.kv_b_proj.weight.grad.abs().sum() > 0


def test_indexer_learns_only_from_its_own_loss():
    """V3.2 detaches the indexer's inputs: the LM side gives it no gradient, its loss none to the rest."""
    model = make_model(4, index_topk=8).train()
    ids = token_ids(1, 12, model.config.vocab_size, seed=4)
    hidden, _ = model.forward_train(ids)
    hidden.sum().backward()
    layer = model.layers[0].self_attn
    assert all(p.grad is None for p in layer.indexer.parameters())
    model.zero_grad(set_to_none=True)
    aux = []
    model.forward_train(ids, aux=aux)
    sum(aux).backward()
    assert layer.indexer.wk.weight.grad is not None
    assert layer.q_a_proj.weight.grad is None and layer.kv_b_proj.weight.grad is None


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_sparse_model_decode_and_dense_equivalence():
    """The Triton kernels (``auto`` on CUDA) in the model: the CPU reference's logits, decode == forward."""
    cpu = make_model(5, index_topk=8)
    model = make_model(5, index_topk=8).cuda()
    ids = token_ids(2, S, cpu.config.vocab_size, seed=5)
    full = model(ids.cuda())
    assert (full.cpu() - cpu(ids)).abs().max() <= MODEL_ATOL
    cache = model.new_cache(2, S, page_size=16)
    cache.kv.fill_(float("nan"))
    cache.index_keys.fill_(float("nan"))
    steps = [model(ids[:, i:i + 1].cuda(), cache=cache) for i in range(S)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= MODEL_ATOL
    dense = make_model(5)
    gpu_dense = make_model(5).cuda()
    assert (gpu_dense(ids.cuda()).cpu() - dense_twin(dense)(ids)).abs().max() <= MODEL_ATOL


@pytest.mark.gpu
def test_gpu_training_backward_is_finite():
    model = make_model(6, index_topk=8).cuda().train()
    aux = []
    hidden, _ = model.forward_train(token_ids(2, S, model.config.vocab_size, seed=6).cuda(), aux=aux)
    (hidden.sum() + sum(aux)).backward()
    assert len(aux) == model.config.num_hidden_layers
    assert all(bool(torch.isfinite(p.grad).all()) for n, p in model.named_parameters()
               if p.grad is not None and ".indexer." in n)
