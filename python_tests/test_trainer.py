"""The trainer in one process: the learning-rate schedule, gradient accumulation and loss weighting, exact
resume from a checkpoint, Ctrl-C (programmatic and a real SIGINT inside the optimiser step), an interrupted
checkpoint write, metrics.jsonl.

Everything runs on the 2-layer ``micro`` preset with a few short sequences per step (one thread: tiny ops on a
shared 2-core machine are much slower with two).
"""
import json
import math
import os
import random
import signal

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from conftest import TOL

from r1kernels import ModelConfig, Transformer
from r1kernels.pipeline.data import collate
from r1kernels.training import IGNORE_INDEX, LossConfig, causal_lm_loss
from r1kernels.training.trainer import TrainConfig, Trainer

STEPS = 6
# every auxiliary loss of an SFT stage, so that resume is checked on all of the loss's inputs
LOSSES = LossConfig(mtp_weight=0.3, exit_layers=(1,), exit_weight=0.5, balance_alpha=1e-4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # module scope: set before the module-scoped reference run (results depend on the thread count)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("micro"))


def _pairs(rng: random.Random, n: int, ids=None) -> list:
    """n (ids, labels) pairs of 6..16 tokens, the first 2..5 a prompt without labels."""
    out = []
    for _ in range(n):
        length, prompt = rng.randint(6, 16), rng.randint(2, 5)
        seq = [rng.randrange(3, 128) for _ in range(length)] if ids is None else ids(length)
        out.append((seq, [IGNORE_INDEX] * prompt + seq[prompt:]))
    return out


def batches(step: int, rank: int, world: int) -> list:
    """A batch function in the stages' style: the step's draw from Random(step), rank r takes draw[r::world]."""
    return [collate(_pairs(random.Random(step), 6)[rank::world], pad_id=0)]


def rng_batches(step: int, rank: int, world: int) -> list:
    """A batch function drawing from the *global* python and torch generators (as rollouts sampling does):
    a resumed run repeats it only if the checkpoint restored both."""
    pairs = _pairs(random, 6, ids=lambda n: torch.randint(3, 128, (n,)).tolist())
    return [collate(pairs[rank::world], pad_id=0)]


def loss_fn(model, batch, step):
    return causal_lm_loss(model, batch.input_ids, batch.labels, LOSSES)


def _config(**kw) -> TrainConfig:
    base = dict(steps=STEPS, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=1, routing_bias_gamma=1e-2)
    base.update(kw)
    return TrainConfig(**base)


def _state(model) -> dict:
    """Parameters and persistent buffers (the routing biases), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _losses(history) -> dict:
    return {m["step"]: m["loss"] for m in history}


def _metrics(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _latest(run_dir) -> str:
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: 6 steps, a checkpoint every 3."""
    run_dir = str(tmp_path_factory.mktemp("reference"))
    model = _model()
    history = Trainer(model, _config(), run_dir, progress=False).fit(rng_batches, loss_fn)
    return dict(run_dir=run_dir, losses=_losses(history), state=_state(model), history=history)


# ---------------------------------------------------------------------------------------------- schedule
def test_lr_schedule_warmup_and_cosine_end():
    cfg = TrainConfig(steps=20, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s) for s in range(cfg.steps)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)  # linear warm-up
    assert lrs[4] == pytest.approx(1e-3, rel=1e-12)  # the first step after the warm-up is at the peak
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-12)  # the last step is at lr * min_lr_ratio
    mid = 4 + (20 - 1 - 4) / 2  # halfway through the cosine: the mean of the two ends
    assert TrainConfig(steps=20, lr=1e-3, warmup_steps=4).lr_at(mid) == pytest.approx(5.5e-4, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # non-increasing after the warm-up
    assert cfg.lr_at(100) == pytest.approx(1e-4, rel=1e-12)
    # no warm-up, one step: that step is the last, at the end of the schedule
    assert TrainConfig(steps=1, lr=1.0, warmup_steps=0, min_lr_ratio=0.5).lr_at(0) == pytest.approx(0.5)


def test_config_and_batch_count_are_checked():
    with pytest.raises(ValueError, match="loss_weighting"):
        TrainConfig(loss_weighting="sum")
    with pytest.raises(ValueError, match="distributed"):
        TrainConfig(distributed="zero3")
    trainer = Trainer(_model(), _config(grad_accum=2), progress=False)
    with pytest.raises(ValueError, match="returned 1 micro-batch.*grad_accum is 2"):
        trainer.fit(batches, loss_fn)


# ---------------------------------------------------------------------------------------------- accumulation
def _two_halves(step, rank, world):
    pairs = _pairs(random.Random(100 + step), 8)
    return [collate(pairs[:4], 0), collate(pairs[4:], 0)]  # each padded to its own length


def _one_batch(step, rank, world):
    return [collate(_pairs(random.Random(100 + step), 8), 0)]


def ce_loss_fn(model, batch, step):
    return causal_lm_loss(model, batch.input_ids, batch.labels)


def _step_gradients(grad_accum: int, batch_fn) -> tuple[dict, dict, dict]:
    """One optimiser step; returns (metrics, the gradients AdamW saw by parameter name, the model state)."""
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    grads: dict = {}

    def capture(opt, args, kwargs):
        grads.update({names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"]
                      if p.grad is not None})

    handle = register_optimizer_step_pre_hook(capture)
    try:
        cfg = _config(steps=1, warmup_steps=0, checkpoint_every=0, grad_accum=grad_accum)
        metrics = Trainer(model, cfg, progress=False).fit(batch_fn, ce_loss_fn)[0]
    finally:
        handle.remove()
    return metrics, grads, _state(model)


def test_grad_accumulation_matches_one_big_batch():
    """2 micro-batches of 4 sequences == 1 of 8: the same loss, gradient and routing-bias update. The halves
    hold different label-token counts, so this needs the token weighting (exact for a per-token mean loss such
    as the CE; the MTP and sequence-wise balance terms are normalised over other counts, hence CE only)."""
    halves = _two_halves(0, 0, 1)
    assert halves[0].num_tokens != halves[1].num_tokens
    m_big, g_big, s_big = _step_gradients(1, _one_batch)
    m_small, g_small, s_small = _step_gradients(2, _two_halves)
    # fp32, the same sums in another order (and other padded shapes): TOL[fp32]
    fp32 = TOL[torch.float32]
    assert m_small["loss"] == pytest.approx(m_big["loss"], rel=fp32["rtol"], abs=fp32["atol"])
    assert m_small["grad_norm"] == pytest.approx(m_big["grad_norm"], rel=TOL[torch.float32]["rtol"])
    assert m_small["tokens"] == m_big["tokens"] == sum(h.num_tokens for h in halves)
    assert g_big.keys() == g_small.keys() and len(g_big) > 20
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], **TOL[torch.float32], msg=name)
    # the routing biases come from integer expert loads summed over the micro-batches: exact (the MTP router
    # saw no token, the CE-only loss does not run it)
    biases = [n for n in s_big if n.endswith("e_score_correction_bias")]
    assert biases and all(torch.equal(s_small[n], s_big[n]) for n in biases)
    assert s_big["layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0


def test_mean_weighting_averages_micro_batches():
    halves = _two_halves(0, 0, 1)
    model = _model()
    with torch.no_grad():
        expected = sum(float(loss_fn(model, b, 0).total) for b in halves) / 2
    cfg = _config(steps=1, warmup_steps=0, checkpoint_every=0, grad_accum=2, loss_weighting="mean")
    got = Trainer(model, cfg, progress=False).fit(lambda s, r, w: halves, loss_fn)[0]["loss"]
    assert got == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------- resume
def test_metrics_jsonl_one_line_per_step(reference):
    rows = _metrics(reference["run_dir"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    cfg = _config()
    for r in rows:
        assert {"loss", "ce", "mtp_1", "exit_1", "balance", "lr", "grad_norm", "tokens_per_s", "stage"} <= r.keys()
        assert r["lr"] == pytest.approx(cfg.lr_at(r["step"] - 1))
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["tokens"] > 0
        # the parts are averaged with the loss's own weights, so the loss is their weighted sum
        parts = r["ce"] + LOSSES.exit_weight * r["exit_1"] + LOSSES.mtp_weight * r["mtp_1"] + r["balance"]
        assert r["loss"] == pytest.approx(parts, rel=1e-6)
    ckpts = sorted(d for d in os.listdir(os.path.join(reference["run_dir"], "checkpoints")) if d.startswith("step_"))
    assert ckpts == ["step_000003", "step_000006"] and _latest(reference["run_dir"]) == "step_000006"


def test_resume_from_checkpoint_gives_the_same_losses(reference, tmp_path):
    """A fresh model (other weights) resumed from the step-3 checkpoint continues exactly like the run that
    never stopped. Bitwise: same process, same thread count, deterministic CPU kernels, fp32 weights and
    optimiser moments stored exactly, the RNG states restored, the batch a function of the step."""
    model = _model(seed=1)
    trainer = Trainer(model, _config(), str(tmp_path), progress=False)
    assert trainer.resume(os.path.join(reference["run_dir"], "checkpoints", "step_000003"))
    assert trainer.step == 3
    history = trainer.fit(rng_batches, loss_fn)
    assert [m["step"] for m in history] == [4, 5, 6]
    assert _losses(history) == {s: reference["losses"][s] for s in (4, 5, 6)}
    _assert_same_state(_state(model), reference["state"])


def test_crash_then_resume_latest(reference, tmp_path):
    """A crash (not Ctrl-C: no checkpoint on the way out) after step 5: resume() takes `latest` (step 3), drops
    metrics lines 4-5 of the lost steps, and the run ends as the uninterrupted one."""
    def crashing(step, rank, world):
        if step == 5:
            raise RuntimeError("worker lost")
        return rng_batches(step, rank, world)

    with pytest.raises(RuntimeError, match="worker lost"):
        Trainer(_model(), _config(), str(tmp_path), progress=False).fit(crashing, loss_fn)
    assert _latest(tmp_path) == "step_000003" and len(_metrics(tmp_path)) == 5
    model = _model(seed=2)
    trainer = Trainer(model, _config(), str(tmp_path), progress=False)
    assert trainer.resume() and trainer.step == 3
    trainer.fit(rng_batches, loss_fn)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert {r["step"]: r["loss"] for r in rows} == reference["losses"]
    _assert_same_state(_state(model), reference["state"])


def test_resume_without_checkpoint_returns_false(tmp_path):
    trainer = Trainer(_model(), _config(), str(tmp_path), progress=False)
    assert trainer.resume() is False and trainer.step == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trainer.resume(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_saves_the_last_finished_step(reference, tmp_path):
    """KeyboardInterrupt from the batch function of step 4 (0-based 3): steps 1-3 are done, so step_000003 is
    written (a periodic one exists at 2) with the RNG states from before step 4 began; it loads, and continues
    like the uninterrupted run."""
    def interrupted(step, rank, world):
        out = rng_batches(step, rank, world)  # draws from the global RNGs before the interrupt
        if step == 3:
            raise KeyboardInterrupt
        return out

    model = _model()
    trainer = Trainer(model, _config(checkpoint_every=2), str(tmp_path), progress=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(interrupted, loss_fn)
    assert trainer.step == 3 and _latest(tmp_path) == "step_000003"
    assert os.path.isdir(tmp_path / "checkpoints" / "step_000002")
    at_interrupt = _state(model)
    resumed = _model(seed=3)
    t2 = Trainer(resumed, _config(), str(tmp_path), progress=False)
    assert t2.resume() and t2.step == 3
    _assert_same_state(_state(resumed), at_interrupt)
    history = t2.fit(rng_batches, loss_fn)
    assert _losses(history) == {s: reference["losses"][s] for s in (4, 5, 6)}


def test_sigint_inside_the_optimizer_step_is_held_until_the_step_is_whole(reference, tmp_path):
    """A real SIGINT delivered while AdamW is updating the weights of step 3: the update finishes, step 3 is
    logged and checkpointed, then KeyboardInterrupt; the checkpoint resumes into the uninterrupted run."""
    trainer = Trainer(_model(), _config(checkpoint_every=0), str(tmp_path), progress=False)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a job started in the background

    def arm(metrics):
        if metrics["step"] == 2:  # during the next optimiser step, after its first parameter group is built
            trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: os.kill(os.getpid(), signal.SIGINT))

    with pytest.raises(KeyboardInterrupt):
        trainer.fit(rng_batches, loss_fn, on_step=arm)
    assert trainer.step == 3 and _latest(tmp_path) == "step_000003"
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handler is gone, the caller's is back
    resumed = _model(seed=4)
    t2 = Trainer(resumed, _config(), str(tmp_path), progress=False)
    assert t2.resume() and t2.step == 3
    assert _losses(t2.fit(rng_batches, loss_fn)) == {s: reference["losses"][s] for s in (4, 5, 6)}
    _assert_same_state(_state(resumed), reference["state"])


# ---------------------------------------------------------------------------------------------- atomic writes
def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path):
    model = _model()
    trainer = Trainer(model, _config(steps=2, checkpoint_every=0), str(tmp_path), progress=False)
    trainer.fit(batches, loss_fn)
    assert _latest(tmp_path) == "step_000002"
    saved = _state(model)

    def broken_save(path, **kw):  # fails after the temporary directory exists and the weights began
        os.makedirs(path)
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    model.save_pretrained = broken_save
    trainer.config.steps = 3
    with pytest.raises(OSError, match="disk full"):
        trainer.fit(batches, loss_fn)  # step 3 trains, its final checkpoint fails
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step_000002"]  # no step_000003, no temporary directory
    assert _latest(tmp_path) == "step_000002"
    fresh = _model(seed=5)
    t2 = Trainer(fresh, _config(steps=2), str(tmp_path), progress=False)
    assert t2.resume() and t2.step == 2
    _assert_same_state(_state(fresh), saved)
    del model.save_pretrained  # the disk is back: the next save goes through
    assert trainer.save_checkpoint().endswith("step_000003") and _latest(tmp_path) == "step_000003"
    assert sorted(os.listdir(root)) == ["latest", "step_000002", "step_000003"]


def test_module_without_save_pretrained_is_checkpointed_as_a_state_dict(tmp_path):
    """Any module trains and resumes: its weights go to model/model.safetensors (no Hugging Face config)."""
    from dataclasses import dataclass

    from r1kernels.training import LossOutput

    @dataclass
    class Pair:
        x: torch.Tensor
        y: torch.Tensor
        num_tokens: int

    def data(step, rank, world):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(5, 3, generator=g)
        return [Pair(x, x.sum(-1, keepdim=True), 5)]

    def mse(model, b, step):
        loss = ((model(b.x) - b.y) ** 2).mean()
        return LossOutput(loss, {"mse": loss.detach()})

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    cfg = TrainConfig(steps=4, lr=1e-2, warmup_steps=1, checkpoint_every=2)
    ref = net(0)
    losses = _losses(Trainer(ref, cfg, str(tmp_path / "a"), progress=False).fit(data, mse))
    assert os.path.exists(tmp_path / "a" / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    other = net(1)
    trainer = Trainer(other, cfg, str(tmp_path / "b"), progress=False)
    assert trainer.resume(str(tmp_path / "a" / "checkpoints" / "step_000002"))
    assert _losses(trainer.fit(data, mse)) == {s: losses[s] for s in (3, 4)}
    _assert_same_state(_state(other), _state(ref))
