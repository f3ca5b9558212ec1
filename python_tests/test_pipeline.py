"""The pipeline stages: GRPO raises the reward of a toy policy; the micro pipeline runs end to end and writes
its report with every field the issue names."""
import json
import os

import pytest
import torch

from r1kernels import ModelConfig, Transformer
from r1kernels.pipeline import CharTokenizer, make_dataset
from r1kernels.pipeline.run import PipelineConfig, run_pipeline
from r1kernels.pipeline.stages import GRPOConfig, grpo
from r1kernels.training.trainer import TrainConfig


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny ops of these models are slowed down badly by OpenMP threads fighting over a busy 2-core box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FirstCharReward:
    """Toy reward: 1 when the completion starts with one of ``chars`` (no format term)."""

    def __init__(self, chars: str):
        self.chars = chars

    def batch(self, samples, texts, lengths=None, group_size=None, prompt_is_unsafe=None):
        r = torch.tensor([1.0 if t[:1] and t[0] in self.chars else 0.0 for t in texts])
        return r, {"accuracy": r, "format": torch.zeros_like(r)}


def first_char_prob(model, tok, samples, chars):
    """Mean probability, under the model, that the completion starts with one of ``chars``."""
    with torch.no_grad():
        ps = []
        for s in samples:
            logits = model(torch.tensor([tok.encode(s.prompt)]))[0, -1, :tok.vocab_size]
            ps.append(torch.softmax(logits, -1)[[tok.token_to_id(c) for c in chars]].sum())
    return float(torch.stack(ps).mean())


def test_grpo_raises_the_reward_of_a_toy_policy(tmp_path):
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = Transformer(ModelConfig.preset("micro"))
    samples = make_dataset(["arithmetic"], 16, seed=3)
    target = "0123456789"  # about 10 of the tokenizer's 105 ids: some reward in most groups from the start
    before = first_char_prob(model, tok, samples, target)
    hist = grpo(model, tok, samples, TrainConfig(steps=15, lr=1e-2, warmup_steps=1, log_every=100, routing_bias_gamma=0.0),
                GRPOConfig(prompts_per_step=4, group_size=8, max_new_tokens=2, beta=0.0), reward=FirstCharReward(target),
                run_dir=str(tmp_path / "grpo"))
    after = first_char_prob(model, tok, samples, target)
    assert before < 0.2, before
    assert after > 0.6, (before, after)
    print(f"P(rewarded first token): before {before:.3f}, after {after:.3f}")
    assert hist[-1]["reward"] > hist[0]["reward"]
    assert all("kl" in m and "clip_fraction" in m for m in hist)


def test_micro_pipeline_writes_the_report(tmp_path):
    report = run_pipeline(PipelineConfig.micro(out_dir=str(tmp_path)))
    run_dir = tmp_path / "micro"
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["stages"][0]["name"] == "base"
    assert [s["name"] for s in on_disk["stages"]] == ["base", "cold_start_sft", "grpo", "rejection_sampling_sft",
                                                      "distilled_student"]
    for s in on_disk["stages"]:
        assert set(s["metrics"]) >= {"accuracy", "format_rate", "mean_tokens", "unsafe_rate"}
        assert all(0.0 <= s["metrics"][k] <= 1.0 for k in ("accuracy", "format_rate", "unsafe_rate"))
    assert "student_retention" in on_disk and set(on_disk["speculative"]) >= {"speedup", "acceptance"}
    assert on_disk["speculative"]["detail"]["early_exit"]["same_output"] is True
    assert (run_dir / "report.md").read_text().startswith("# r1k pipeline report")
    for name in ("teacher", "student"):
        assert (run_dir / name / "config.json").exists() and (run_dir / name / "model.safetensors").exists()
    for stage in ("cold_start_sft", "grpo", "rejection_sampling_sft", "distill"):
        lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
        assert lines and all("loss" in json.loads(x) for x in lines)
    if report["plots"]:
        assert all((run_dir / f).stat().st_size > 1000 for f in report["plots"])
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]


@pytest.mark.parametrize("attention,extra", [
    ("nsa", dict(nsa_num_kv_heads=2, nsa_head_dim=16, nsa_compress_block=8, nsa_compress_stride=4,
                 nsa_select_block=8, nsa_num_selected=3, nsa_window=8)),
    ("mla_dsa", dict(index_n_heads=2, index_head_dim=16, index_topk=6)),
])
def test_micro_pipeline_runs_with_sparse_attention(tmp_path, attention, extra):
    """Every stage (training, GRPO rollouts, speculative decoding, save and reload) with the sparse variants;
    small blocks / budgets so that the sparsity is exercised on the micro tasks' short sequences."""
    import dataclasses

    from r1kernels import load_pretrained

    cfg = dataclasses.replace(ModelConfig.preset("micro"), attention=attention, **extra)
    report = run_pipeline(PipelineConfig.micro(out_dir=str(tmp_path), name=attention), model_config=cfg)
    assert [s["name"] for s in report["stages"]][-1] == "distilled_student"
    assert report["speculative"]["detail"]["early_exit"]["same_output"] is True
    reloaded = load_pretrained(str(tmp_path / attention / "teacher"), dtype=torch.float32)
    assert reloaded.config.attention == attention
