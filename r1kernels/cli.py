"""The ``r1k`` command line.

    r1k info [--json]                      versions, devices and the runnable backends per op
    r1k generate (--model PATH | --preset tiny) --prompt TEXT [--temperature T --top-p P --top-k K
                 --min-p M --max-new-tokens N --speculative early_exit|mtp --num-draft N --seed S]
                                           streams the continuation of TEXT token by token
    r1k pipeline [--micro] [--zero] ...    the R1 pipeline end to end (the main job), see r1kernels.pipeline.cli
    r1k train sft|grpo|rs|distill|eval ... one stage alone
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1k", description="r1kernels command line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="versions, devices and per-op backends")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    p_gen = sub.add_parser("generate", help="generate text from a checkpoint or a preset, streamed")
    src = p_gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face checkpoint directory (config.json + safetensors)")
    src.add_argument("--preset", help="a built-in config with random weights (seeded by --seed), e.g. tiny")
    p_gen.add_argument("--prompt", required=True, help="the prompt text")
    p_gen.add_argument("--tokenizer", help="a tokenizer.json (default: the model directory's, else the built-in one)")
    p_gen.add_argument("--max-new-tokens", type=int, default=64)
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p_gen.add_argument("--top-k", type=int, default=0)
    p_gen.add_argument("--top-p", type=float, default=1.0)
    p_gen.add_argument("--min-p", type=float, default=0.0)
    p_gen.add_argument("--speculative", choices=("early_exit", "mtp"), default=None)
    p_gen.add_argument("--num-draft", type=int, default=4)
    p_gen.add_argument("--exit-layer", type=int, default=None)
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    from .pipeline.cli import add_commands, run_pipeline_command, run_train_command

    add_commands(sub)
    args = parser.parse_args(argv)
    if args.cmd == "pipeline":
        return run_pipeline_command(args)
    if args.cmd == "train":
        return run_train_command(args)
    if args.cmd == "generate":
        return _generate(args)
    if args.cmd == "info":
        from ._info import format_info, info

        report = info()
        print(json.dumps(report, indent=1) if args.json else format_info(report))
        return 0
    parser.error(f"unknown command {args.cmd}")
    return 2


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _generate(args) -> int:
    import os

    import torch

    from .config import ModelConfig
    from .inference import TokenStream, generate
    from .model import Transformer, load_pretrained
    from .pipeline.tokenizer import load_tokenizer

    if args.model:
        model = load_pretrained(args.model, device=args.device)
        tok_path = args.tokenizer or (os.path.join(args.model, "tokenizer.json")
                                      if os.path.exists(os.path.join(args.model, "tokenizer.json")) else None)
    else:
        try:
            cfg = ModelConfig.preset(args.preset)
        except (KeyError, ValueError) as exc:
            print(f"r1k generate: {exc}", file=sys.stderr)
            return 2
        torch.manual_seed(args.seed)
        with torch.device(args.device):
            model = Transformer(cfg)
        tok_path = args.tokenizer
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        print(f"r1k generate: the tokenizer has {tokenizer.vocab_size} ids, the model only "
              f"{model.config.vocab_size}", file=sys.stderr)
        return 2
    prompt = tokenizer.encode(args.prompt)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    out = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, stop_tokens=[tokenizer.eos_id],
                   seed=args.seed, speculative=args.speculative, num_draft=args.num_draft,
                   exit_layer=args.exit_layer, vocab_limit=tokenizer.vocab_size,
                   monitors=[TokenStream(lambda ids: tokenizer.decode(ids, skip_special=True), show)])
    st = out.stats
    line = (f"\n[{st.new_tokens} tokens, {st.tokens_per_s:.1f} tok/s, stop: {st.stop_reasons[0]}"
            + (f", acceptance {st.acceptance_rate:.2f}, {st.mean_accepted_length:.2f} tokens/round"
               if st.speculative else "") + "]")
    print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
