"""The pipeline's commands: ``r1k pipeline`` (every stage) and ``r1k train <stage>`` (one stage alone).

    r1k pipeline [--name N] [--out-dir runs] [--seed S] [--zero] [--micro] [--distributed ddp|fsdp] [--threads 1]
    r1k train sft|grpo|rs|distill|eval (--model DIR | --preset tiny) --out DIR [--steps N] [--tasks a,b]
              [--seed S] [--batch B] [--lr LR] [--distributed ddp|fsdp] [--student-layers L]

``r1k train`` reads a Hugging Face directory (or a preset with fresh weights), runs the stage, writes the
resulting model to ``--out/model`` with the stage's ``metrics.jsonl`` and prints the held-out metrics. Under
``torchrun --nproc_per_node=K`` the SFT-type stages (sft, rs, distill) and grpo train data-parallel (gloo on
CPU); only rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_commands(sub) -> None:
    p = sub.add_parser("pipeline", help="run the R1 pipeline end to end (tiny preset by default)")
    p.add_argument("--name", default=None, help="run name: runs/<name>/ (default: tiny, or micro with --micro)")
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero", action="store_true", help="R1-Zero: GRPO from the base model, no cold-start SFT")
    p.add_argument("--micro", action="store_true", help="a few steps of every stage (smoke test)")
    p.add_argument("--distributed", choices=("ddp", "fsdp"), default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model runs hundreds of small ops per step, and on a "
                        "2-core machine shared with other work 2 OpenMP threads made them up to 10x slower; 0 keeps "
                        "torch's default)")

    t = sub.add_parser("train", help="run one pipeline stage on a model")
    t.add_argument("stage", choices=("sft", "grpo", "rs", "distill", "eval"))
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face checkpoint directory")
    src.add_argument("--preset", help="a ModelConfig preset with fresh weights (seeded)")
    t.add_argument("--out", required=True, help="output folder: model/, metrics.jsonl, metrics.json")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--tasks", default="arithmetic,countdown")
    t.add_argument("--difficulty", default="easy")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--samples", type=int, default=4000, help="training samples generated")
    t.add_argument("--n-eval", type=int, default=64)
    t.add_argument("--distributed", choices=("ddp", "fsdp"), default=None)
    t.add_argument("--student-layers", type=int, default=2, help="distill: the student's layer count")


def run_pipeline_command(args) -> int:
    import torch

    from .run import PipelineConfig, run_pipeline

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    kw = dict(out_dir=args.out_dir, seed=args.seed, zero=args.zero, distributed=args.distributed)
    if args.name:
        kw["name"] = args.name
    cfg = PipelineConfig.micro(**kw) if args.micro else PipelineConfig(**kw)
    report = run_pipeline(cfg)
    summary = {s["name"]: round(s["metrics"]["accuracy"], 3) for s in report["stages"]}
    print(json.dumps({"accuracy": summary, "student_retention": round(report["student_retention"], 3),
                      "speculative": {k: round(v, 3) for k, v in report["speculative"].items() if k != "detail"}}))
    return 0


def run_train_command(args) -> int:
    import torch

    from ..config import ModelConfig
    from ..model import Transformer, load_pretrained
    from ..training import LossConfig
    from ..training.distributed import init_from_env
    from ..training.trainer import TrainConfig
    from . import stages
    from .evaluate import evaluate
    from .rewards import SafetyChecker
    from .tasks import make_dataset
    from .tokenizer import CharTokenizer

    torch.manual_seed(args.seed)
    if args.model:
        model = load_pretrained(args.model, dtype=torch.float32, device="cpu")
    else:
        model = Transformer(ModelConfig.preset(args.preset))
    info = init_from_env(torch.device("cpu"))
    tok = CharTokenizer()
    tasks = [t for t in args.tasks.split(",") if t]
    train = make_dataset(tasks, args.samples, seed=args.seed, difficulty=args.difficulty, split="train")
    test = make_dataset(tasks, args.n_eval, seed=args.seed, difficulty=args.difficulty, split="test")
    lr = args.lr if args.lr is not None else {"grpo": 3e-4, "rs": 1e-3}.get(args.stage, 3e-3)
    tc = TrainConfig(steps=args.steps, lr=lr, warmup_steps=max(1, args.steps // 10), log_every=max(1, args.steps // 10),
                     distributed=args.distributed, seed=args.seed)
    cfg = model.config
    losses = LossConfig(mtp_weight=0.3 if cfg.num_nextn_predict_layers else 0.0, exit_layers=(1,) if cfg.num_hidden_layers > 1 else (),
                        exit_weight=0.5 if cfg.num_hidden_layers > 1 else 0.0, balance_alpha=1e-4)
    out_model = model
    if args.stage == "sft":
        stages.sft(model, tok, train, tc, losses=losses, batch_size=args.batch, run_dir=args.out, name="sft")
    elif args.stage == "grpo":
        stages.grpo(model, tok, train, tc, stages.GRPOConfig(), run_dir=args.out, name="grpo")
    elif args.stage == "rs":
        kept, texts, st = stages.rejection_sample(model, tok, train[:max(1, args.samples // 8)], n=4, max_new_tokens=64,
                                                   seed=args.seed)
        print(f"rejection sampling kept {len(kept)} ({st['kept_fraction']:.2f})", file=sys.stderr)
        checker = SafetyChecker()
        refusals = checker.samples("train")
        stages.sft(model, tok, kept + refusals, tc, losses=losses, batch_size=args.batch, run_dir=args.out, name="rs_sft",
                   completions=texts + [s.solution for s in refusals])
    elif args.stage == "distill":
        import dataclasses

        student = Transformer(dataclasses.replace(cfg, num_hidden_layers=args.student_layers,
                                                  first_k_dense_replace=min(cfg.first_k_dense_replace, args.student_layers),
                                                  num_nextn_predict_layers=0))
        stages.distill(student, model, tok, train, [s.solution for s in train], tc, batch_size=args.batch,
                       run_dir=args.out, name="distill")
        out_model = student
    metrics = evaluate(out_model, tok, test, max_new_tokens=64, safety=SafetyChecker())
    if info.is_main:
        os.makedirs(args.out, exist_ok=True)
        if args.stage != "eval":
            out_model.save_pretrained(os.path.join(args.out, "model"))
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        print(json.dumps(metrics))
    return 0
