"""``r1k pipeline``: DeepSeek-R1's recipe end to end on one model and its kernels.

    base ─► cold-start SFT ─► GRPO ─► rejection-sampling SFT (+ safety refusals) ─► distillation ─► deployment
    (R1-Zero mode: GRPO straight from the base model, no SFT before it)

Every stage is evaluated greedily on held-out prompts of the same tasks (accuracy by the exact verifiers,
format rate, tokens per answer, unsafe-response rate on held-out harmful prompts). The run writes
``runs/<name>/report.json``, ``report.md``, ``*.png`` plots, ``metrics.jsonl`` per stage and the final models
(``teacher/`` and ``student/``, Hugging Face directories loadable with ``r1kernels.load_pretrained``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import ModelConfig
from ..model import Transformer
from ..training import LossConfig
from ..training.distributed import init_from_env
from ..training.trainer import TrainConfig
from . import stages
from .evaluate import evaluate, sampled_accuracy, speculative_speedup
from .report import write_report
from .rewards import REFUSAL_TEXT, RewardFn, SafetyChecker
from .tasks import Sample, make_dataset
from .tokenizer import CharTokenizer


@dataclass
class PipelineConfig:
    """Everything ``r1k pipeline`` does; the defaults run the tiny preset on a 2-core CPU in about 10 minutes.

    Attributes:
        name: the run's folder under ``out_dir``; preset: the teacher's ``ModelConfig`` preset.
        tasks / difficulty: the built-in tasks trained and evaluated; n_eval: held-out prompts per evaluation.
        zero: R1-Zero mode (GRPO from the base model, no cold start).
        sft_*: the cold-start SFT; grpo_* and ``grpo``: the RL stage; rs_*: rejection sampling and its SFT;
        student / distill_*: the distilled model (``student`` overrides the teacher's config);
        bon_n / bon_prompts: best-of-N and majority-vote evaluation; spec_*: speculative-decoding measurement.
        exit_layer: the early-exit layer trained (LayerSkip) and used for self-speculation.
    """

    name: str = "tiny"
    out_dir: str = "runs"
    preset: str = "tiny"
    seed: int = 0
    tasks: tuple = ("arithmetic", "countdown")
    difficulty: str = "easy"
    n_eval: int = 96
    max_len: int = 96
    max_new_tokens: int = 48
    zero: bool = False
    sft_samples: int = 6000
    sft_steps: int = 300
    sft_batch: int = 32
    sft_lr: float = 3e-3
    grpo_steps: int = 30
    grpo_lr: float = 2e-4
    grpo: stages.GRPOConfig = field(default_factory=lambda: stages.GRPOConfig(prompts_per_step=12, group_size=8,
                                                                                max_new_tokens=48, beta=0.04))
    rs_prompts: int = 384
    rs_samples: int = 4
    rs_steps: int = 80
    rs_lr: float = 1e-3
    rs_trace_samples: int = 600
    rs_refusal_repeats: int = 12
    distill_trace_samples: int = 3000
    student: dict = field(default_factory=lambda: dict(num_hidden_layers=2, first_k_dense_replace=1,
                                                       num_nextn_predict_layers=0))
    distill_steps: int = 200
    distill_lr: float = 3e-3
    distill_kd_weight: float = 1.0
    bon_n: int = 4
    bon_prompts: int = 24
    spec_prompts: int = 8
    spec_num_draft: int = 5
    exit_layer: int = 1
    distributed: Optional[str] = None

    @classmethod
    def micro(cls, **overrides) -> "PipelineConfig":
        """A few steps of every stage on the 2-layer ``micro`` preset: the smoke test's configuration."""
        base = dict(name="micro", preset="micro", sft_samples=400, sft_steps=12, sft_batch=8, grpo_steps=2,
                    grpo=stages.GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=16), rs_prompts=8,
                    rs_samples=2, rs_steps=4, rs_trace_samples=20, distill_trace_samples=40, distill_steps=4, n_eval=8, max_new_tokens=16, bon_n=2, bon_prompts=2,
                    spec_prompts=1, student=dict(num_hidden_layers=1, first_k_dense_replace=1,
                                                 num_nextn_predict_layers=0))  # exit layer 1 of 2
        base.update(overrides)
        return cls(**base)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _train_config(cfg: PipelineConfig, steps: int, lr: float, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), log_every=max(1, steps // 6),
                       distributed=cfg.distributed, seed=cfg.seed, **kw)


def run_pipeline(cfg: PipelineConfig, model_config: Optional[ModelConfig] = None) -> dict:
    """Run every stage; returns the report dict (also written to ``out_dir/name/report.json``)."""
    t_start = time.perf_counter()
    run_dir = os.path.join(cfg.out_dir, cfg.name)
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tok = CharTokenizer()
    mcfg = model_config or ModelConfig.preset(cfg.preset)
    if tok.vocab_size > mcfg.vocab_size:
        raise ValueError(f"pipeline: the tokenizer has {tok.vocab_size} ids, the model's vocabulary {mcfg.vocab_size}")
    model = Transformer(mcfg)
    safety = SafetyChecker()
    tasks = list(cfg.tasks)
    train = make_dataset(tasks, cfg.sft_samples, seed=cfg.seed, difficulty=cfg.difficulty, split="train")
    test = make_dataset(tasks, cfg.n_eval, seed=cfg.seed, difficulty=cfg.difficulty, split="test")
    losses = LossConfig(mtp_weight=0.3 if mcfg.num_nextn_predict_layers else 0.0, exit_layers=(cfg.exit_layer,),
                        exit_weight=0.5, balance_alpha=1e-4)
    stage_rows: list = []
    histories: dict = {}
    timings: dict = {}

    def record(name: str, m, extra: Optional[dict] = None) -> dict:
        t0 = time.perf_counter()
        metrics = evaluate(m, tok, test, max_new_tokens=cfg.max_new_tokens, safety=safety)
        timings[f"eval_{name}"] = time.perf_counter() - t0
        row = {"name": name, "metrics": metrics, **(extra or {})}
        stage_rows.append(row)
        _log(f"[{name}] accuracy {metrics['accuracy']:.3f}  format {metrics['format_rate']:.3f}  "
             f"tokens {metrics['mean_tokens']:.1f}  unsafe {metrics['unsafe_rate']:.3f}")
        return metrics

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        return out

    _log(f"r1k pipeline: {mcfg.num_parameters() / 1e6:.1f}M-parameter {cfg.preset} model, tasks {', '.join(tasks)}, "
         f"run folder {run_dir}")
    record("base", model)

    # 1. cold-start SFT on generated reasoning traces (skipped in R1-Zero mode)
    if not cfg.zero:
        histories["cold_start_sft"] = timed("cold_start_sft", lambda: stages.sft(
            model, tok, train, _train_config(cfg, cfg.sft_steps, cfg.sft_lr), losses=losses,
            batch_size=cfg.sft_batch, max_len=cfg.max_len, run_dir=os.path.join(run_dir, "cold_start_sft"),
            name="cold_start_sft"))
        record("cold_start_sft", model)

    # 2. GRPO with rule-based rewards (accuracy + format), KL to the model it starts from
    histories["grpo"] = timed("grpo", lambda: stages.grpo(
        model, tok, train, _train_config(cfg, cfg.grpo_steps, cfg.grpo_lr, routing_bias_gamma=0.0), cfg.grpo,
        reward=RewardFn(accuracy=1.0, format=0.5), run_dir=os.path.join(run_dir, "grpo"), name="grpo"))
    record("grpo", model)

    # 3. rejection sampling: keep verified, well-formed samples of the RL model; add refusals of the
    #    harmful training prompts (the safety data); SFT on both
    rs_prompts = make_dataset(tasks, cfg.rs_prompts, seed=cfg.seed + 1, difficulty=cfg.difficulty, split="train")
    kept, texts, rs_stats = timed("rejection_sampling", lambda: stages.rejection_sample(
        model, tok, rs_prompts, n=cfg.rs_samples, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed))
    _log(f"[rejection_sampling] kept {len(kept)} of {len(rs_prompts)} prompts ({rs_stats['kept_fraction']:.2f})")
    refusals = safety.samples("train")
    # R1 mixed the verified reasoning samples with other SFT data (and safety data); here: the kept samples,
    # the refusals of the 24 training prompts (repeated rs_refusal_repeats times) and a slice of the cold-start
    # traces, so the stage adds safety without forgetting the tasks. Measured (seed 1): with 4 repeats the model
    # began its refusals but garbled the text (unsafe rate 1.0 on the held-out harmful prompts), hence 12.
    traces = train[:cfg.rs_trace_samples]
    reps = cfg.rs_refusal_repeats
    mix = kept + refusals * reps + traces
    mix_texts = texts + [REFUSAL_TEXT] * (reps * len(refusals)) + [s.solution for s in traces]
    histories["rejection_sampling_sft"] = timed("rejection_sampling_sft", lambda: stages.sft(
        model, tok, mix, _train_config(cfg, cfg.rs_steps, cfg.rs_lr), losses=losses, batch_size=cfg.sft_batch,
        max_len=cfg.max_len, run_dir=os.path.join(run_dir, "rejection_sampling_sft"), name="rejection_sampling_sft",
        completions=mix_texts))
    teacher_metrics = record("rejection_sampling_sft", model, {"kept_fraction": rs_stats["kept_fraction"]})

    # 4. distillation into a smaller student: SFT on the teacher's verified traces + logit KD
    student_cfg = dataclasses.replace(mcfg, **cfg.student)
    student = Transformer(student_cfg)
    # the student learns the teacher's verified samples, the refusals and the traces the teacher was taught,
    # matching the teacher's token distributions on all of them (logit KD)
    d_traces = train[:cfg.distill_trace_samples]
    d_mix = kept + refusals * reps + d_traces
    d_texts = texts + [REFUSAL_TEXT] * (reps * len(refusals)) + [s.solution for s in d_traces]
    histories["distill"] = timed("distill", lambda: stages.distill(
        student, model, tok, d_mix, d_texts, _train_config(cfg, cfg.distill_steps, cfg.distill_lr),
        kd_weight=cfg.distill_kd_weight, batch_size=cfg.sft_batch, max_len=cfg.max_len,
        losses=LossConfig(balance_alpha=1e-4), run_dir=os.path.join(run_dir, "distill"), name="distill"))
    student_metrics = record("distilled_student", student, {"parameters": student_cfg.num_parameters()})

    # 5. deployment: best-of-N / majority vote, speculative decoding, the final checkpoints
    bon = timed("best_of_n", lambda: sampled_accuracy(model, tok, test[:cfg.bon_prompts], n=cfg.bon_n,
                                                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed))
    spec = timed("speculative", lambda: speculative_speedup(model, tok, test[:cfg.spec_prompts],
                                                             max_new_tokens=cfg.max_new_tokens,
                                                             num_draft=cfg.spec_num_draft, exit_layer=cfg.exit_layer))
    _log(f"[deployment] best-of-{cfg.bon_n} {bon['best_of_n_accuracy']:.3f}, majority vote "
         f"{bon['majority_vote_accuracy']:.3f}; speculative {spec['best_mode']} speedup {spec['speedup']:.2f}x, "
         f"acceptance {spec['acceptance']:.2f}")
    main_rank = init_from_env(next(model.parameters()).device).is_main  # under torchrun only rank 0 writes
    if main_rank:
        model.save_pretrained(os.path.join(run_dir, "teacher"))
        student.save_pretrained(os.path.join(run_dir, "student"))

    acc_t = teacher_metrics["accuracy"]
    report = {
        "name": cfg.name,
        "config": _jsonable(dataclasses.asdict(cfg)),
        "model": {"preset": cfg.preset, "parameters": mcfg.num_parameters(), "student_parameters": student_cfg.num_parameters()},
        "stages": stage_rows,
        "student_retention": student_metrics["accuracy"] / acc_t if acc_t > 0 else 0.0,
        "deployment": {**bon, "teacher": teacher_metrics, "student": student_metrics},
        "speculative": {"speedup": spec["speedup"], "acceptance": spec["acceptance"], "detail": spec},
        "timings_s": timings,
        "total_s": time.perf_counter() - t_start,
    }
    if main_rank:
        write_report(run_dir, report, histories)
        _log(f"report: {os.path.join(run_dir, 'report.md')} ({report['total_s']:.0f} s)")
    return report


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)
