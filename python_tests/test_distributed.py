"""The trainer under ``torchrun`` with 2 CPU processes (gloo): DDP and FSDP2 give the one-process losses, the
replicas (and their MoE routing biases) stay identical, FSDP2 leaves a plain model with the trained weights,
checkpoints move between modes, and Ctrl-C (SIGINT to torchrun, forwarded to the workers) stops every rank at
the same step with one checkpoint.

The runs: SFT on the ``micro`` preset, 4 steps of 8 sequences (``r1kernels.pipeline.stages.sft_batches``: rank
r takes draw[r::2]), CE loss. The global batch is the same in every run, and the trainer's default
``loss_weighting="tokens"`` weights each rank's mean by its label-token count over the step's total, so the
objective is the mean over the same tokens whatever the split: the ranks' shares below hold different token
counts (checked), which a mean of per-rank means would get wrong by ~1e-5 relative at the first step.

Cost: one in-process run and two torchrun launches (~30 s on 2 cores).
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TOL

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 4
# Loss comparisons against the one-process run. Step 1 sees the same weights: the only difference is the
# order of the fp32 sums (per-rank partial sums, then the all-reduce), ~1e-7 relative on a loss of ~5. Later
# steps see weights that AdamW moved from gradients differing in the last bits; its first steps amplify that
# for near-zero gradient entries (the update is lr * g / (|g| + eps)), so the later losses move by up to
# ~1e-6 relative. TOL[fp32] (1e-5 absolute and relative) bounds both with a margin of ~10.
LOSS_TOL = TOL[torch.float32]

WORKER = """
import sys
sys.path[:0] = [{here!r}, {root!r}]
from test_distributed import worker_main
worker_main(sys.argv[1:])
"""


# ---------------------------------------------------------------------------------------------- the runs
def _dataset() -> list:
    """64 (ids, labels) pairs of 24 tokens whose first 3..14 are a prompt without labels: the label counts vary
    (so the token weighting matters) but the lengths do not. Equal lengths because the MoE routers count every
    row they route, padding included, into the loads that drive the aux-loss-free bias update; a batch padded
    per rank (2 processes) and the same batch padded as a whole (1 process) would update the biases
    differently (see the report on r1kernels/nn/moe.py), and the routing would then differ."""
    import random

    from r1kernels.training import IGNORE_INDEX

    rng = random.Random(0)
    pairs = []
    for _ in range(64):
        ids, prompt = [rng.randrange(3, 128) for _ in range(24)], rng.randint(3, 14)
        pairs.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return pairs


def run(mode: str, out: str, *, steps: int = STEPS, checkpoint_every: int = 0, resume_from=None,
        interrupt_at=None, balance: bool = False, grad_accum: int = 1) -> None:
    """One SFT run (``mode``: "single", "ddp" or "fsdp"); every rank writes ``out/rank<r>.pt`` with its model's
    state afterwards (after Ctrl-C too) and the logits of a probe batch (the model must be a plain module).
    ``balance``: add the sequence-wise MoE balance loss (normalised per sequence, so the token weighting does
    not make it split-invariant: those runs are compared between DDP and FSDP2 only). ``grad_accum``: each
    rank's share in that many micro-batches (micro-batch j of rank r: the stage's share of "rank" r·k + j of
    world·k; the step's sequences are the same 8)."""
    from r1kernels import ModelConfig, Transformer
    from r1kernels.pipeline.stages import sft_batches
    from r1kernels.training import LossConfig, causal_lm_loss
    from r1kernels.training.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    # both layers MoE: the second router call then gets a `balance` list that already holds tensors, the case
    # FSDP2 used to copy (losing the appended routing)
    model = Transformer(dataclasses.replace(ModelConfig.preset("micro"), first_k_dense_replace=0))
    pairs = _dataset()
    batch_fn = sft_batches(pairs, 8, pad_id=0, seed=0, device="cpu")

    def batches(step, rank, world):
        if interrupt_at is not None and step == interrupt_at and rank == 0:
            os.kill(os.getppid(), signal.SIGINT)  # Ctrl-C reaches torchrun, which forwards it to every worker
            time.sleep(1.0)  # let it arrive before this step's collectives (rank 1 waits in them meanwhile)
        return [batch_fn(step, rank * grad_accum + j, world * grad_accum)[0] for j in range(grad_accum)]

    losses = LossConfig(balance_alpha=1e-4 if balance else 0.0)
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=checkpoint_every,
                      grad_accum=grad_accum,
                      routing_bias_gamma=1e-2, distributed=None if mode == "single" else mode)
    trainer = Trainer(model, cfg, out, name="sft", progress=False)
    if resume_from is not None:
        assert trainer.resume(resume_from)
    try:
        trainer.fit(batches, lambda m, b, step: causal_lm_loss(m, b.input_ids, b.labels, losses))
    except KeyboardInterrupt:
        if interrupt_at is None:
            raise
    probe = torch.tensor([pairs[0][0][:16], pairs[1][0][:16]])
    with torch.no_grad():
        logits = model(probe)  # [2, 16, V]
    torch.save({"state": model.state_dict(), "logits": logits, "step": trainer.step},
               os.path.join(out, f"rank{trainer.info.rank}.pt"))
    if mode == "fsdp" and trainer.info.is_main:
        model.save_pretrained(os.path.join(out, "model"))  # what `r1k train` does after the stage


def worker_main(argv) -> None:
    phase, base = argv
    if phase == "main":
        run("ddp", os.path.join(base, "ddp"))
        run("fsdp", os.path.join(base, "fsdp"))
        run("fsdp", os.path.join(base, "fsdp_resumed"),
            resume_from=os.path.join(base, "single", "checkpoints", "step_000002"))
        run("ddp", os.path.join(base, "ddp_accum"), grad_accum=2)
        run("ddp", os.path.join(base, "ddp_balance"), steps=2, balance=True)
        run("fsdp", os.path.join(base, "fsdp_balance"), steps=2, balance=True)
    else:
        run("fsdp", os.path.join(base, "fsdp_interrupt"), steps=20, interrupt_at=2)


def _torchrun(base, phase: str) -> subprocess.CompletedProcess:
    script = os.path.join(base, "worker.py")
    with open(script, "w") as f:
        f.write(WORKER.format(here=HERE, root=ROOT))
    path = os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", script, phase,
           str(base)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(base))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("dist"))
    threads = torch.get_num_threads()
    try:
        run("single", os.path.join(base, "single"), checkpoint_every=2)
    finally:
        torch.set_num_threads(threads)
    proc = _torchrun(base, "main")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return base


def _metrics(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(run_dir) -> list:
    return [m["loss"] for m in _metrics(run_dir)]


def _ranks(run_dir) -> list:
    return [torch.load(os.path.join(run_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]


def _checkpoint_state(run_dir, name=None) -> dict:
    from r1kernels import load_pretrained

    root = os.path.join(run_dir, "checkpoints")
    if name is None:
        with open(os.path.join(root, "latest")) as f:
            name = f.read().strip()
    return load_pretrained(os.path.join(root, name, "model"), dtype=torch.float32).state_dict()


# ---------------------------------------------------------------------------------------------- checks
def test_rank_shares_hold_different_token_counts():
    """The premise of the exact comparison: a mean of per-rank means would not be the global mean."""
    from r1kernels.pipeline.stages import sft_batches

    fn = sft_batches(_dataset(), 8, pad_id=0, seed=0, device="cpu")
    counts = [(fn(s, 0, 2)[0].num_tokens, fn(s, 1, 2)[0].num_tokens, fn(s, 0, 1)[0].num_tokens) for s in range(STEPS)]
    assert all(a + b == total for a, b, total in counts)
    assert any(a != b for a, b, _ in counts)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_losses_match_one_process(runs, mode):
    single, multi = _losses(os.path.join(runs, "single")), _losses(os.path.join(runs, mode))
    assert len(single) == len(multi) == STEPS
    assert multi == pytest.approx(single, rel=LOSS_TOL["rtol"], abs=LOSS_TOL["atol"])
    assert multi[0] == pytest.approx(single[0], rel=1e-6)  # the same weights: summation order only


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_replicas_and_routing_biases_identical(runs, mode):
    """Every rank ends with the same model (FSDP2: the plain model the trainer copied the shards back into),
    including the aux-loss-free routing biases, which are updated on each rank from the loads summed over ranks;
    the biases equal the one-process run's (integer loads: exact, barring a routing flip on a near tie)."""
    r0, r1 = _ranks(os.path.join(runs, mode))
    assert r0["step"] == r1["step"] == STEPS
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    torch.testing.assert_close(r0["logits"], r1["logits"], atol=0, rtol=0)
    single = _ranks_single(runs)
    biases = [k for k in r0["state"] if k.endswith("e_score_correction_bias")]
    assert biases and any(r0["state"][k].abs().sum() > 0 for k in biases)
    for k in biases:
        assert torch.equal(r0["state"][k], single["state"][k]), k


def _ranks_single(runs) -> dict:
    return torch.load(os.path.join(runs, "single", "rank0.pt"), weights_only=True)


def test_fsdp_model_equals_ddp_model(runs):
    """The FSDP2 run's checkpoint, and the model it leaves for the caller to save, load and equal the DDP run's
    within the tolerance of the loss comparison (the same computation, other summation orders)."""
    ddp = _checkpoint_state(os.path.join(runs, "ddp"))
    fsdp = _checkpoint_state(os.path.join(runs, "fsdp"))
    from r1kernels import load_pretrained

    saved = load_pretrained(os.path.join(runs, "fsdp", "model"), dtype=torch.float32).state_dict()
    assert ddp.keys() == fsdp.keys() == saved.keys()
    for k in ddp:
        assert torch.equal(saved[k], fsdp[k]), k
        torch.testing.assert_close(fsdp[k], ddp[k], **LOSS_TOL, msg=k)
    single = _ranks_single(runs)
    torch.testing.assert_close(_ranks(os.path.join(runs, "fsdp"))[0]["logits"], single["logits"], **LOSS_TOL)


def test_ddp_with_grad_accumulation_matches_one_process(runs):
    """2 ranks x 2 micro-batches of 2 sequences == 1 process x 8: the losses within the tolerance above and the
    routing biases exactly (the expert loads of both micro-batches of both ranks are summed before the update;
    DDP must not overwrite rank 1's loads with rank 0's between micro-batches, which its buffer broadcast would
    do without ``no_sync`` and ``broadcast_buffers=False``)."""
    single, accum = _losses(os.path.join(runs, "single")), _losses(os.path.join(runs, "ddp_accum"))
    assert accum == pytest.approx(single, rel=LOSS_TOL["rtol"], abs=LOSS_TOL["atol"])
    ref, r0 = _ranks_single(runs), _ranks(os.path.join(runs, "ddp_accum"))[0]
    for k in ref["state"]:
        if k.endswith("e_score_correction_bias"):
            assert torch.equal(r0["state"][k], ref["state"][k]), k


def test_fsdp_keeps_every_balance_term(runs):
    """The routers append their routing to a list the model passes down for the balance loss; FSDP2 rebuilt
    list arguments holding tensors, so the second MoE layer's term was lost (the balance part halved). With
    the trainer's fix FSDP2 logs what DDP logs, term for term."""
    ddp, fsdp = _metrics(os.path.join(runs, "ddp_balance")), _metrics(os.path.join(runs, "fsdp_balance"))
    assert len(ddp) == len(fsdp) == 2
    for a, b in zip(ddp, fsdp):
        assert a["balance"] > 0
        for k in ("loss", "ce", "balance"):
            assert b[k] == pytest.approx(a[k], rel=1e-6), k


def test_fsdp_resumes_a_one_process_checkpoint(runs):
    """The one-process step-2 checkpoint (whole tensors, AdamW moments keyed by name) loads into FSDP2 (the
    moments sharded on load) and steps 3-4 give the one-process losses."""
    single = _losses(os.path.join(runs, "single"))
    resumed = _losses(os.path.join(runs, "fsdp_resumed"))
    assert len(resumed) == 2
    assert resumed == pytest.approx(single[2:], rel=LOSS_TOL["rtol"], abs=LOSS_TOL["atol"])


def test_ctrl_c_under_fsdp_stops_every_rank_at_one_step(runs):
    """SIGINT to torchrun during step 3: torchrun forwards it, the ranks agree on a step boundary, gather the
    shards and write one checkpoint of that step, and exit; every rank holds the checkpoint's weights."""
    base = runs
    proc = _torchrun(base, "interrupt")
    out = os.path.join(base, "fsdp_interrupt")
    assert "interrupted after step" in proc.stderr, proc.stderr[-4000:]
    r0, r1 = _ranks(out)
    assert r0["step"] == r1["step"] and 3 <= r0["step"] < 20
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == f"step_{r0['step']:06d}"
    assert len(_losses(out)) == r0["step"]
    saved = _checkpoint_state(out)
    for k in saved:
        assert torch.equal(r0["state"][k], saved[k]) and torch.equal(r1["state"][k], saved[k]), k
