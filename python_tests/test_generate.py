"""The generation engine: plain decoding against a cache-free greedy loop, batched against one-by-one,
speculative (early exit, MTP) against plain greedy token for token, and the sampled speculative output's
distribution against the full model's exact one."""
import dataclasses
import math

import pytest
import torch

import r1kernels
from r1kernels import ModelConfig, Transformer
from r1kernels.inference import ContentMonitor, StopStrings, best_of_n, generate, majority_vote


def make_model(seed: int, **overrides) -> Transformer:
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    # larger weights than init's 0.02 so the random model's logits are not nearly flat (near-ties would make
    # "same argmax" depend on the order of float sums)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def prompts_of(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    """The plainest greedy loop: the full forward over the whole sequence at every step, no cache."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


MODELS = [
    dict(seed=1),
    dict(seed=2, q_lora_rank=None, first_k_dense_replace=2),
]


@pytest.mark.parametrize("spec", MODELS)
def test_plain_greedy_equals_a_cache_free_loop_on_mixed_lengths(spec):
    spec = dict(spec)
    model = make_model(spec.pop("seed"), **spec)
    prompts = prompts_of([5, 1, 12], model.config.vocab_size, 0)
    out = generate(model, prompts, max_new_tokens=9)
    for p, got in zip(prompts, out.tokens):
        assert got == greedy_without_cache(model, p, 9)
    assert out.stats.stop_reasons == ["length"] * 3
    assert out.stats.new_tokens == 27


def test_batched_equals_one_by_one():
    model = make_model(3)
    prompts = prompts_of([7, 2, 15, 4], model.config.vocab_size, 1)
    batched = generate(model, prompts, max_new_tokens=12).tokens
    for p, got in zip(prompts, batched):
        assert generate(model, [p], max_new_tokens=12).tokens[0] == got
    # sampled too: a row's draws depend only on its own seed
    seeds = [11, 12, 13, 14]
    batched = generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=seeds).tokens
    for p, s, got in zip(prompts, seeds, batched):
        assert generate(model, [p], max_new_tokens=8, temperature=1.0, seed=[s]).tokens[0] == got


@pytest.mark.parametrize("spec", MODELS)
@pytest.mark.parametrize("mode,num_draft,exit_layer", [
    ("early_exit", 1, 1), ("early_exit", 3, 2), ("early_exit", 5, 3), ("mtp", 1, None), ("mtp", 4, None),
])
def test_greedy_speculative_equals_plain_greedy(spec, mode, num_draft, exit_layer):
    spec = dict(spec)
    model = make_model(spec.pop("seed"), **spec)
    prompts = prompts_of([6, 1, 13, 3], model.config.vocab_size, 2)
    plain = generate(model, prompts, max_new_tokens=14)
    fast = generate(model, prompts, max_new_tokens=14, speculative=mode, num_draft=num_draft, exit_layer=exit_layer)
    assert fast.tokens == plain.tokens
    st = fast.stats
    assert st.rounds > 0 and len(st.accepted_histogram) == num_draft + 1
    assert 0.0 <= st.acceptance_rate <= 1.0 and 1.0 <= st.mean_accepted_length <= num_draft + 1
    assert st.target_passes == st.rounds + 1  # the prefill, then one full-model pass per round
    assert sum(st.accepted_histogram) <= 4 * st.rounds


def drafter_friendly_model(seed: int, mode: str, noise: float) -> Transformer:
    """A random model whose drafter mostly agrees with it, so that rounds accept several drafts and the
    multi-token commit paths are exercised (random models accept almost nothing).

    early_exit: the outputs of the layers after the exit layer are scaled by ``noise``, so the exit layer's
    prediction is nearly the final one. mtp: the main layers' outputs are zeroed (the model is the bigram model
    head(norm(emb(x)))) and the MTP module is made the same bigram model of the token it is given
    (eh_proj = [I, noise * random], its block's outputs zeroed): it disagrees only through the noise term.
    """
    model = make_model(seed)
    d = model.config.hidden_size
    scale = noise if mode == "early_exit" else 0.0
    with torch.no_grad():
        blocks = list(model.layers[2:]) if mode == "early_exit" else list(model.layers) + [model.mtp[0].block]
        for block in blocks:
            for name, p in block.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight", "w2")):
                    p.mul_(scale)
        if mode == "mtp":
            g = torch.Generator().manual_seed(seed)
            model.mtp[0].eh_proj.weight.copy_(torch.cat([torch.eye(d), noise * torch.randn(d, d, generator=g) / d ** 0.5], dim=1))
    return model


@pytest.mark.parametrize("mode,exit_layer", [("early_exit", 2), ("mtp", None)])
@pytest.mark.parametrize("num_draft", [2, 5])
def test_greedy_speculative_with_high_acceptance_equals_plain_greedy(mode, exit_layer, num_draft):
    model = drafter_friendly_model(9, mode, noise=0.3)
    prompts = prompts_of([8, 2, 17, 5, 1], model.config.vocab_size, 6)
    plain = generate(model, prompts, max_new_tokens=23)
    fast = generate(model, prompts, max_new_tokens=23, speculative=mode, num_draft=num_draft, exit_layer=exit_layer)
    assert fast.tokens == plain.tokens
    hist = fast.stats.accepted_histogram
    assert 0.1 < fast.stats.acceptance_rate < 1.0, hist  # several drafts accepted, and some rejections
    assert hist[num_draft] > 0 and sum(hist[:num_draft]) > 0


def test_speculative_with_stop_tokens_and_length_cut():
    model = make_model(4)
    prompts = prompts_of([4, 9], model.config.vocab_size, 3)
    plain = generate(model, prompts, max_new_tokens=20)
    stop = plain.tokens[0][6]  # a token the first row emits: it must stop there
    for mode in (None, "early_exit", "mtp"):
        out = generate(model, prompts, max_new_tokens=20, stop_tokens=[stop], speculative=mode, num_draft=3)
        for row, full in zip(out.tokens, plain.tokens):
            cut = full.index(stop) + 1 if stop in full else len(full)
            assert row == full[:cut]
        assert out.stats.stop_reasons[0] == "stop_token"


def test_zero_new_tokens_and_bad_arguments():
    model = make_model(5)
    out = generate(model, [[1, 2, 3]], max_new_tokens=0)
    assert out.tokens == [[]] and out.stats.stop_reasons == ["length"]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"outside \[0, 1024\)"):
        generate(model, [[1, 5000]], max_new_tokens=2)
    with pytest.raises(ValueError, match="exit_layer must be in"):
        generate(model, [[1]], max_new_tokens=2, speculative="early_exit", exit_layer=4)
    with pytest.raises(ValueError, match="speculative must be"):
        generate(model, [[1]], max_new_tokens=2, speculative="medusa")
    no_mtp = make_model(5, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="MTP module"):
        generate(no_mtp, [[1]], max_new_tokens=2, speculative="mtp")


def test_monitors_stop_rows_with_their_reason():
    model = make_model(6)
    prompts = prompts_of([3, 5], model.config.vocab_size, 4)
    plain = generate(model, prompts, max_new_tokens=10).tokens
    target = plain[1][:4]

    def decode(ids):  # one letter per id keeps substring positions exact
        return "".join(chr(0x4E00 + i) for i in ids)

    stop_text = decode(target[2:4])
    out = generate(model, prompts, max_new_tokens=10, monitors=[StopStrings(decode, [stop_text])], speculative="mtp")
    assert out.tokens[1] == plain[1][:4]
    assert out.stats.stop_reasons[1] == f"stop_string:{stop_text}"

    seen = []
    content = ContentMonitor(lambda ids: "please build a bomb" if len(ids) >= 3 else "ok")
    out = generate(model, prompts, max_new_tokens=10, monitors=[lambda r, new, all_: seen.append((r, len(all_))), content])
    assert out.stats.stop_reasons == ["content:weapons", "content:weapons"]
    assert all(len(t) == 3 for t in out.tokens)
    assert (0, 1) in seen and (1, 3) in seen


def joint_first_two_probs(model, prompt, temperature, top_p=1.0):
    """Exact P(t1, t2 | prompt) of the filtered target distribution, [V, V]."""
    from r1kernels.ops.sampling import filtered_probs

    v = model.config.vocab_size
    with torch.no_grad():
        p1 = filtered_probs(model(torch.tensor([prompt]))[:, -1], temperature=temperature, top_p=top_p)[0]  # [V]
        seqs = torch.tensor([prompt + [t] for t in range(v)])
        p2 = filtered_probs(model(seqs)[:, -1], temperature=temperature, top_p=top_p)  # [V, V]
    return p1[:, None] * p2


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square of observed counts against probabilities (cells with expected < 5 pooled)."""
    n = counts.sum().item()
    exp = probs.flatten().double() * n
    obs = counts.flatten().double()
    assert float(obs[exp == 0].sum()) == 0.0, "a zero-probability outcome was drawn"
    small = exp < 5
    e = torch.cat([exp[~small], exp[small].sum().view(1)])
    o = torch.cat([obs[~small], obs[small].sum().view(1)])
    keep = e > 0
    stat = float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square upper tail (dof >= 10 here)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("mode", ["early_exit", "mtp"])
def test_sampled_speculative_output_follows_the_target_distribution(mode):
    model = make_model(7, vocab_size=12)
    prompt = [3, 1, 4]
    n = 6000
    out = generate(model, [prompt] * n, max_new_tokens=2, temperature=1.3, top_p=0.95, seed=list(range(n)),
                   speculative=mode, num_draft=2)
    pairs = torch.tensor([t[:2] for t in out.tokens])  # [n, 2]
    counts = torch.bincount(pairs[:, 0] * 12 + pairs[:, 1], minlength=144).view(12, 12)
    p = chi_square_pvalue(counts, joint_first_two_probs(model, prompt, 1.3, top_p=0.95))
    assert p > 1e-3, f"chi-square p-value {p:.2e}"
    assert out.stats.accepted > 0  # the second token came through an accepted draft in some rows


def test_best_of_n_and_majority_vote():
    model = make_model(8)
    prompts = prompts_of([4, 6], model.config.vocab_size, 5)
    res = best_of_n(model, prompts, 5, scorer=lambda toks: -sum(toks), max_new_tokens=4, temperature=1.0, seed=3)
    assert len(res) == 2
    for r in res:
        assert len(r.samples) == 5 and r.best_score == max(r.scores) and r.best in r.samples
    single = best_of_n(model, prompts[0], 5, scorer=lambda toks: -sum(toks), max_new_tokens=4, temperature=1.0, seed=3)
    assert single.samples == res[0].samples
    vote = majority_vote(model, prompts[0], 7, extract=lambda toks: str(toks[0] % 3), max_new_tokens=2,
                         temperature=1.0, seed=4)
    assert sum(vote.votes.values()) == 7 and vote.votes[vote.answer] == max(vote.votes.values())
    assert vote.agreement == max(vote.votes.values()) / 7
    with pytest.raises(ValueError, match="temperature > 0"):
        best_of_n(model, prompts[0], 3, scorer=len, max_new_tokens=2)


def test_generate_is_exported_at_the_top_level():
    assert r1kernels.generate is generate
