"""The pipeline's report: ``report.json`` (machine-readable), ``report.md`` (for people) and PNG plots
(GRPO reward and accuracy per step, training loss per step, accuracy by stage). Written atomically
(temporary file + rename) so an interrupted run never leaves a half-written report."""
from __future__ import annotations

import json
import os
from typing import Optional


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plots(run_dir: str, report: dict, histories: dict) -> tuple[list, Optional[str]]:
    """PNG plots; returns (files written, why none were when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # the report still has every number
        return [], f"matplotlib is not importable ({type(exc).__name__}: {exc}); pip install 'r1kernels[pipeline]'"
    files = []

    def save(fig, name):
        path = os.path.join(run_dir, name)
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        files.append(name)

    grpo = histories.get("grpo") or []
    if grpo:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [m["step"] for m in grpo]
        ax.plot(steps, [m.get("reward", float("nan")) for m in grpo], label="mean reward")
        ax.plot(steps, [m.get("accuracy", float("nan")) for m in grpo], label="rollout accuracy")
        ax.plot(steps, [m.get("format_rate", float("nan")) for m in grpo], label="rollout format rate", alpha=0.6)
        ax.set_xlabel("GRPO step")
        ax.set_title("GRPO: reward and accuracy per step")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "grpo_reward.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for name, hist in histories.items():
        if not hist:
            continue
        ax.plot([offset + m["step"] for m in hist], [m["loss"] for m in hist], label=name)
        offset += hist[-1]["step"]
    ax.set_xlabel("step (stages in order)")
    ax.set_ylabel("loss")
    ax.set_title("training loss per step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "loss.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [s["name"] for s in report["stages"]]
    ax.bar(names, [s["metrics"]["accuracy"] for s in report["stages"]], label="accuracy")
    ax.plot(names, [s["metrics"]["unsafe_rate"] for s in report["stages"]], "o-", color="tab:red", label="unsafe rate")
    ax.set_ylim(0, 1)
    ax.set_title("held-out accuracy and unsafe rate by stage")
    ax.tick_params(axis="x", rotation=20)
    ax.legend()
    save(fig, "accuracy_by_stage.png")
    return files, None


def markdown(report: dict, files: list, why_no_plots: Optional[str]) -> str:
    lines = [f"# r1k pipeline report: {report['name']}", ""]
    m = report["model"]
    lines += [f"Model: preset `{m['preset']}`, {m['parameters'] / 1e6:.2f}M parameters; student "
              f"{m['student_parameters'] / 1e6:.2f}M. Total time {report['total_s']:.0f} s.", ""]
    lines += ["## Held-out metrics by stage", "",
              "| stage | accuracy | format rate | mean tokens | unsafe rate |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        x = s["metrics"]
        lines.append(f"| {s['name']} | {x['accuracy']:.3f} | {x['format_rate']:.3f} | {x['mean_tokens']:.1f} | "
                     f"{x['unsafe_rate']:.3f} |")
    d = report["deployment"]
    sp = report["speculative"]["detail"]
    lines += ["", "## Deployment", "",
              f"- student retention (student accuracy / teacher accuracy): {report['student_retention']:.3f}",
              f"- best-of-{d['n']} (pass@{d['n']}, verifier-scored) accuracy: {d['best_of_n_accuracy']:.3f}; "
              f"majority vote: {d['majority_vote_accuracy']:.3f}",
              f"- plain decoding {sp['plain_tokens_per_s']:.1f} tokens/s (batch 1, greedy)"]
    for mode in ("early_exit", "mtp"):
        if mode in sp:
            x = sp[mode]
            lines.append(f"- {mode}: {x['tokens_per_s']:.1f} tokens/s, speedup {x['speedup']:.2f}x, acceptance "
                         f"{x['acceptance']:.2f}, {x['mean_accepted_length']:.2f} tokens per round, same output as "
                         f"plain: {x['same_output']}")
    lines += ["", "## Time per stage (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in report["timings_s"].items()]
    lines += ["", "## Plots", ""]
    lines += [f"![{f}]({f})" for f in files] if files else [f"No plots: {why_no_plots}"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str, report: dict, histories: dict) -> None:
    files, why = plots(run_dir, report, histories)
    report["plots"] = files
    _atomic_write(os.path.join(run_dir, "report.json"), json.dumps(report, indent=1).encode())
    _atomic_write(os.path.join(run_dir, "report.md"), markdown(report, files, why).encode())
