"""NSA in the model (``attention="nsa"``, ``r1kernels.nn.sparse``): the cache-free forward against decoding
through ``NSACache`` (token by token, in chunks, after a rollback, with NaN-poisoned storage), generation
(plain and speculative) against a cache-free greedy loop, the training backward, and the module on the
Triton kernels against the references.

Most tests use a variant of ``tiny-nsa`` with small blocks (l = 8, d = 4, l' = 16, n = 4, w = 32) so that a
few dozen tokens cross many compression and selection blocks and the window.
"""
import dataclasses

import pytest
import torch

from conftest import MODEL_ATOL, TOL
from r1kernels import ModelConfig, Transformer, use_backend
from r1kernels.inference import generate
from r1kernels.nn import RotaryEmbedding
from r1kernels.nn.sparse import NSACache, NSAttention

SMALL_BLOCKS = dict(nsa_window=32, nsa_compress_block=8, nsa_compress_stride=4, nsa_select_block=16,
                    nsa_num_selected=4)
S = 80  # 2.5 windows, 5 selection blocks, 19 compressed tokens
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the Triton test: GPU, else the interpreter


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the ops of a decode step are tiny, and on a busy 2-core machine OpenMP's waiting
    threads make each of them ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny-nsa"), **{**SMALL_BLOCKS, **overrides})


def make_model(seed: int, cfg: ModelConfig = None) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg or small_config())
    # larger weights than init's 0.02: logits and block scores are then not nearly flat, so that argmax and
    # top-n decisions do not hinge on the order of float sums
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def token_ids(b: int, s: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def poisoned_cache(model: Transformer, b: int, n: int, page_size: int = 16) -> NSACache:
    """A fresh cache whose every storage tensor holds NaN: a row read before it is written shows up."""
    cache = model.new_cache(b, n, page_size=page_size)
    assert isinstance(cache, NSACache)
    for t in cache.tensors():
        t.fill_(float("nan"))
    return cache


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------- the model


@torch.no_grad()
def test_tiny_nsa_forward_is_finite_and_uses_nsa():
    model = make_model(0, ModelConfig.preset("tiny-nsa"))
    assert all(isinstance(layer.self_attn, NSAttention) for layer in model.layers)
    logits = model(token_ids(2, 40, model.config.vocab_size))
    assert logits.shape == (2, 40, model.config.vocab_size) and logits.dtype == torch.float32
    assert bool(torch.isfinite(logits).all())


@torch.no_grad()
def test_decode_on_a_nan_poisoned_cache_equals_the_full_forward():
    model = make_model(1)
    ids = token_ids(2, S, model.config.vocab_size, seed=1)
    full = model(ids)  # [B, S, V]
    # the sparsity matters: a model whose window covers everything gives other logits
    dense_ish = Transformer(dataclasses.replace(model.config, nsa_window=S)).eval()
    dense_ish.load_state_dict(model.state_dict())
    assert max_err(dense_ish(ids), full) > 1e-2
    # a 5-token prefill, then one token at a time (NaN storage: nothing unwritten may be read)
    cache = poisoned_cache(model, 2, S)
    steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(5, S)]
    assert cache.max_committed == S and cache.seqlens.tolist() == [S, S]
    assert max_err(torch.cat(steps, dim=1), full) <= MODEL_ATOL
    # multi-token steps after the prefill (speculative verification): each completes several compressed tokens
    cache = poisoned_cache(model, 2, S)
    chunks = [model(ids[:, lo:hi], cache=cache) for lo, hi in ((0, 13), (13, 14), (14, 37), (37, 42), (42, S))]
    assert max_err(torch.cat(chunks, dim=1), full) <= MODEL_ATOL


@torch.no_grad()
def test_rollback_then_new_tokens_equals_a_fresh_decode():
    """What speculative decoding does: write and commit tokens, roll back to a shorter length (mid compression
    block, to a different length per row), continue with other tokens. The compressed tokens whose block was
    cut must be rebuilt from the new tokens, the stale rows never read."""
    model = make_model(2)
    vocab = model.config.vocab_size
    prompt, first, second = token_ids(2, 30, vocab, 3), token_ids(2, 14, vocab, 4), token_ids(2, 20, vocab, 5)
    keep = [3, 9]  # tokens of ``first`` each row keeps: lengths 33 and 39 (compressed blocks end at 4k + 7)
    cache = poisoned_cache(model, 2, 64)
    model(prompt, cache=cache)
    model(first[:, :6], cache=cache)  # a multi-token step
    for i in range(6, first.shape[1]):
        model(first[:, i:i + 1], cache=cache)
    lengths = torch.tensor([30 + k for k in keep], dtype=torch.int32)
    cache.set_lengths(lengths, 30 + max(keep))
    # the two rows now sit at different positions: continue with 4 tokens in one step, then one at a time
    got = [model(second[:, :4], cache=cache)] + [model(second[:, i:i + 1], cache=cache) for i in range(4, 20)]
    got = torch.cat(got, dim=1)  # [B, 20, V]
    assert cache.seqlens.tolist() == [30 + k + 20 for k in keep]
    for row, k in enumerate(keep):
        fresh = poisoned_cache(model, 1, 64)
        model(prompt[row:row + 1], cache=fresh)
        model(first[row:row + 1, :k], cache=fresh)
        want = [model(second[row:row + 1, i:i + 1], cache=fresh) for i in range(20)]
        assert max_err(got[row:row + 1], torch.cat(want, dim=1)) <= MODEL_ATOL
        # and the cache-free forward over the row's final sequence
        seq = torch.cat([prompt[row], first[row, :k], second[row]])[None]
        assert max_err(got[row], model(seq)[0, -20:]) <= MODEL_ATOL


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    """The plainest greedy loop: the full forward over the whole sequence at every step, no cache."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_generate_greedy_equals_a_cache_free_loop_and_speculative_equals_plain():
    model = make_model(3)
    g = torch.Generator().manual_seed(6)
    # mixed lengths: the padded prefill writes compressed tokens past the short prompts' ends, which the
    # decode must rebuild; the longest prompt plus its tokens crosses the window
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (29, 3, 14)]
    plain = generate(model, prompts, max_new_tokens=10, page_size=8)
    assert [len(t) for t in plain.tokens] == [10, 10, 10]
    for prompt, got in zip(prompts, plain.tokens):
        assert got == greedy_without_cache(model, prompt, 10)
    for mode, num_draft in (("early_exit", 3), ("mtp", 2)):
        out = generate(model, prompts, max_new_tokens=10, speculative=mode, num_draft=num_draft, page_size=8)
        assert out.tokens == plain.tokens, mode
        assert out.stats.rounds > 0


def test_training_backward_gives_finite_gradients_to_every_nsa_parameter():
    model = make_model(4).train()
    ids = token_ids(2, 40, model.config.vocab_size, seed=7)
    hidden, _ = model.forward_train(ids)
    loss = model.logits(hidden).logsumexp(-1).mean()
    loss.backward()
    nsa = {n: p for n, p in model.named_parameters() if ".self_attn." in n and not n.startswith("mtp.")}
    names = {n.split(".self_attn.")[1] for n in nsa}
    assert {"compress_k.pos_emb", "compress_k.fc1.weight", "compress_k.fc2.weight", "compress_v.pos_emb",
            "gate_proj.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"} <= names
    for name, p in nsa.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert bool(p.grad.abs().sum() > 0), name


# ------------------------------------------------------------------------------------------ the module


def module_inputs(cfg: ModelConfig, b: int, s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, cfg.hidden_size, generator=g)
    rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_kwargs)
    cos, sin = rotary(torch.arange(s).expand(b, s))
    return x, cos, sin


@torch.no_grad()
def test_module_compressed_tokens_match_the_documented_phi():
    """φ applied by hand to one block (rows i·d .. i·d + l − 1 of the rotated keys, plus the position
    embedding, flattened, fc1, SiLU, fc2), and the cache's rebuilt compressed tokens equal the forward's."""
    cfg = small_config()
    torch.manual_seed(0)
    attn = NSAttention(cfg).eval()
    torch.nn.init.normal_(attn.compress_k.pos_emb, std=0.5)
    x, cos, sin = module_inputs(cfg, 2, 23)
    _, k, v, _ = attn._project(x, cos, sin)
    k_cmp, v_cmp = attn.compress(k, v)
    l, d = cfg.nsa_compress_block, cfg.nsa_compress_stride
    assert k_cmp.shape == (2, (23 - l) // d + 1, cfg.nsa_num_kv_heads, cfg.nsa_head_dim)
    i, head = 2, 1
    block = (k[1, i * d:i * d + l, head] + attn.compress_k.pos_emb).reshape(-1)  # [l * Dh]
    want = attn.compress_k.fc2.weight @ torch.nn.functional.silu(attn.compress_k.fc1.weight @ block)
    torch.testing.assert_close(k_cmp[1, i, head], want, **TOL[torch.float32])
    # decode through a cache: a 2-token prefill, then 1, 5 and 15 tokens per step
    cache = NSACache(1, 2, 23, cfg, page_size=4)
    for t in cache.tensors():
        t.fill_(float("nan"))
    for lo, hi in ((0, 2), (2, 3), (3, 8), (8, 23)):
        attn(x[:, lo:hi], cos[:, lo:hi], sin[:, lo:hi], cache=cache)
        cache.advance(hi - lo)
    _, _, kc, vc = cache.layer(0)
    torch.testing.assert_close(kc[:, :k_cmp.shape[1]], k_cmp, **TOL[torch.float32])
    torch.testing.assert_close(vc[:, :v_cmp.shape[1]], v_cmp, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_module_on_the_triton_kernels_matches_the_references(dtype):
    """Every op forced to Triton (the interpreter here) against the references: the cache-free forward and
    (fp32) its gradients, and decoding through the cache (its compressed rows are a strided slice)."""
    cfg = small_config()
    torch.manual_seed(5)
    attn = NSAttention(cfg).to(DEV, dtype).eval()
    x, cos, sin = (t.to(DEV) for t in module_inputs(cfg, 2, 21, seed=5))
    x = x.to(dtype).requires_grad_(dtype == torch.float32)
    results = []
    for backend in ("reference", "triton"):
        attn.zero_grad(set_to_none=True)
        x.grad = None
        with use_backend(backend):
            y = attn(x, cos, sin)
            if dtype == torch.float32:
                y.float().square().sum().backward()
            cache = NSACache(1, 2, 21, cfg, page_size=8, dtype=dtype, device=DEV)
            for t in cache.tensors():
                t.fill_(float("nan"))
            with torch.no_grad():
                parts = []
                for lo, hi in ((0, 5), (5, 6), (6, 21)):  # a prefill with no compressed token yet
                    parts.append(attn(x[:, lo:hi], cos[:, lo:hi], sin[:, lo:hi], cache=cache))
                    cache.advance(hi - lo)
        results.append((y.detach(), torch.cat(parts, dim=1), x.grad,
                        {n: p.grad for n, p in attn.named_parameters()}))
    (y_ref, yc_ref, gx_ref, gp_ref), (y_tri, yc_tri, gx_tri, gp_tri) = results
    torch.testing.assert_close(y_tri, y_ref, **TOL[dtype])
    torch.testing.assert_close(yc_tri, y_ref, **TOL[dtype])
    torch.testing.assert_close(yc_ref, y_ref, **TOL[dtype])
    if dtype == torch.float32:
        torch.testing.assert_close(gx_tri, gx_ref, **TOL[dtype])
        for name, g in gp_ref.items():
            assert g is not None and gp_tri[name] is not None, name
            torch.testing.assert_close(gp_tri[name], g, **TOL[dtype], msg=name)


def test_cache_argument_errors():
    cfg = small_config()
    cache = NSACache(2, 2, 10, cfg, page_size=4, first_layer=3)
    assert cache.capacity == 12 and cache.batch_size == 2
    assert cache.k.shape == (2, 2, 12, cfg.nsa_num_kv_heads, cfg.nsa_head_dim)
    assert cache.k_cmp.shape[2] == (12 - 8) // 4 + 1 + 1  # the compressed tokens of 12 positions + scratch
    with pytest.raises(IndexError, match="layer 0"):
        cache.layer(0)
    with pytest.raises(ValueError, match="do not fit"):
        cache.check_room(13)
    with pytest.raises(ValueError, match="set_lengths"):
        cache.set_lengths(torch.zeros(3, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="capacity"):
        cache.set_lengths(torch.zeros(2, dtype=torch.int32), 13)
    with pytest.raises(ValueError, match="NSACache.write"):
        cache.write(3, torch.zeros(2, 1, cfg.nsa_num_kv_heads, cfg.nsa_head_dim + 1),
                    torch.zeros(2, 1, cfg.nsa_num_kv_heads, cfg.nsa_head_dim + 1))
    with pytest.raises(ValueError, match="positive"):
        NSACache(1, 0, 10, cfg)


# ------------------------------------------------------------------------------------------- the GPU


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_decode_equals_the_forward_and_the_cpu_reference():
    """The Triton kernels (``auto`` on CUDA) in the model: the CPU reference's logits, decode == forward."""
    cpu = make_model(8)
    model = make_model(8).cuda()
    ids = token_ids(2, S, cpu.config.vocab_size, seed=8)
    full = model(ids.cuda())
    assert max_err(full.cpu(), cpu(ids)) <= MODEL_ATOL
    cache = poisoned_cache(model, 2, S)
    steps = [model(ids[:, :5].cuda(), cache=cache)] + [model(ids[:, i:i + 1].cuda(), cache=cache) for i in range(5, S)]
    assert max_err(torch.cat(steps, dim=1), full) <= MODEL_ATOL


@pytest.mark.gpu
def test_gpu_training_backward_is_finite():
    model = make_model(9).cuda().train()
    hidden, _ = model.forward_train(token_ids(2, S, model.config.vocab_size, seed=9).cuda())
    hidden.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".self_attn." in n and not n.startswith("mtp.")]
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
