"""Pipeline rewards on hand-written outputs: answer extraction, format, accuracy, language consistency,
length, safety, and their weighted combination (per sample and per GRPO batch)."""
import pytest
import torch

from r1kernels.pipeline import make_dataset, rewards
from r1kernels.pipeline.rewards import (
    REFUSAL_TEXT,
    RewardFn,
    SafetyChecker,
    accuracy_reward,
    extract_answer,
    format_reward,
    is_refusal,
    language_consistency_reward,
    length_penalty,
    safety_reward,
)
from r1kernels.pipeline.tasks import Sample, verify
from r1kernels.pipeline.tokenizer import CharTokenizer

ADD = Sample("47+85=", "132", "<think>7+5=12,4+8+1=13</think><answer>132</answer>", "arithmetic",
             {"a": 47, "b": 85, "op": "+"})


def test_extract_answer():
    assert extract_answer("<think>x</think><answer> 132 </answer>") == "132"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("<answer>a<answer>b</answer>") == "b"
    assert extract_answer("<answer>1</answer><answer>2") == "1"
    assert extract_answer("<answer></answer>") == ""
    for none in ("", "132", "<answer>132", "132</answer>", "</answer><answer>"):
        assert extract_answer(none) is None, none


@pytest.mark.parametrize("text,want", [
    ("<think>7+5=12</think><answer>12</answer>", 1.0),
    ("  \n<think>a\nb</think>\n<answer>12</answer>\n", 1.0),
    ("<think></think><answer>12</answer>", 1.0),
    ("<think>x</think><answer> </answer>", 0.0),
    ("<answer>12</answer>", 0.0),
    ("<think>x</think>", 0.0),
    ("so <think>x</think><answer>12</answer>", 0.0),
    ("<think>x</think><answer>12</answer> ok", 0.0),
    ("<think>x</think>y<answer>12</answer>", 0.0),
    ("<answer>12</answer><think>x</think>", 0.0),
    ("<think>x</think><answer>1</answer><answer>2</answer>", 0.0),
    ("<think>x<think>y</think><answer>12</answer>", 0.0),
    ("<think>x</think><answer>12</answer></think>", 0.0),
])
def test_format_reward(text, want):
    assert format_reward(text) == want


def test_accuracy_reward():
    assert accuracy_reward(ADD, ADD.solution) == 1.0
    assert accuracy_reward(ADD, "<answer>132</answer>") == 1.0  # format is a separate reward
    assert accuracy_reward(ADD, "<think>x</think><answer>133</answer>") == 0.0
    assert accuracy_reward(ADD, "132") == 0.0
    for s in make_dataset(["arithmetic", "countdown", "zebra"], 9, seed=5):
        assert accuracy_reward(s, s.solution) == 1.0 and format_reward(s.solution) == 1.0


def test_language_consistency_reward():
    assert language_consistency_reward("<think>seven plus five</think><answer>12</answer>") == 1.0
    assert language_consistency_reward("<think>\u8fd9\u662f test</think><answer>5</answer>") == pytest.approx(2 / 3)
    assert language_consistency_reward("<think>caf\u00e9 au lait</think><answer>x</answer>") == pytest.approx(3 / 4)
    assert language_consistency_reward("<think>caf\u00e9 au lait</think><answer>x</answer>", "latin") == 1.0
    assert language_consistency_reward("plain words only") == 1.0
    assert language_consistency_reward("<think></think><answer> </answer>") == 0.0
    assert language_consistency_reward("a b", script=lambda ch: ch == "a") == 0.5
    with pytest.raises(ValueError, match="script"):
        language_consistency_reward("x", "klingon")


def test_length_penalty():
    assert length_penalty([0, 50, 100, 200], max_len=100) == [0.0, -0.5, -1.0, -1.0]
    assert length_penalty([10, 20, 30], kind="kimi") == [0.5, 0.0, -0.5]
    assert length_penalty([10, 20, 30], correct=[False, False, True], kind="kimi") == [0.0, 0.0, -0.5]
    assert length_penalty([7, 7], kind="kimi") == [0.0, 0.0]
    with pytest.raises(ValueError, match="max_len"):
        length_penalty([1])
    with pytest.raises(ValueError, match="kind"):
        length_penalty([1], 10, kind="cubic")


def test_safety_prompts_split_and_detection():
    checker = SafetyChecker()
    train, test = checker.prompts("train"), checker.prompts("test")
    assert len(train) == 24 and len(test) == 6 and not set(train) & set(test)
    assert all(checker.is_unsafe(p) for p in train + test)
    safe = [s.prompt for s in make_dataset(["arithmetic", "countdown", "zebra"], 60, seed=0, difficulty="medium")]
    safe += ["how does a virus replicate?", "what is the bomb calorimeter used for", "capital of France?"]
    assert not any(checker.is_unsafe(p) for p in safe)
    samples = checker.samples("test")
    assert all(s.task == "safety" and s.solution == REFUSAL_TEXT and verify(s, s.answer) for s in samples)


def test_is_refusal_and_safety_reward():
    assert is_refusal(REFUSAL_TEXT)
    assert is_refusal("I\u2019m sorry, but no.") and is_refusal("<answer>We cannot assist with this.</answer>")
    assert not is_refusal("<think>I can't help but notice 7+5=12</think><answer>12</answer>")
    assert not is_refusal("<think>x</think><answer>132</answer>")
    assert safety_reward(True, REFUSAL_TEXT) == 1.0
    assert safety_reward(True, ADD.solution) == 0.0
    assert safety_reward(False, ADD.solution) == 1.0
    assert safety_reward(False, REFUSAL_TEXT) == 0.0


class _RefuseNothing:
    """A plug-in policy: nothing is unsafe, and only 'NO' is a refusal."""

    def is_unsafe(self, prompt):
        return False

    def is_refusal(self, text):
        return text.strip() == "NO"


def test_reward_fn_single_sample():
    fn = RewardFn(accuracy=1.0, format=0.5, language=0.25, safety=2.0, length=1.0, max_len=100)
    total, comps = fn(ADD, ADD.solution)
    assert comps["accuracy"] == comps["format"] == comps["language"] == comps["safety"] == 1.0
    assert comps["length"] == pytest.approx(-len(ADD.solution) / 100)
    assert total == pytest.approx(1.0 + 0.5 + 0.25 + 2.0 - len(ADD.solution) / 100)
    total, comps = fn(ADD, "<answer>132</answer>", length=50)
    assert comps["format"] == 0.0 and comps["length"] == -0.5 and total == pytest.approx(1 + 0.25 + 2 - 0.5)
    unsafe = SafetyChecker().samples("train")[0]
    assert fn(unsafe, REFUSAL_TEXT, length=0)[1]["safety"] == 1.0
    assert fn(unsafe, ADD.solution, length=0)[1]["safety"] == 0.0
    assert fn(ADD, REFUSAL_TEXT, length=0, prompt_is_unsafe=True)[1]["safety"] == 1.0
    assert RewardFn().weights == {"accuracy": 1.0, "format": 0.5, "language": 0.0, "safety": 0.0, "length": 0.0}
    assert RewardFn(checker=_RefuseNothing(), safety=1.0)(ADD, "NO")[1]["safety"] == 0.0
    assert isinstance(_RefuseNothing(), rewards.SafetyPolicy)
    tok_len = RewardFn(max_len=100, tokenizer=CharTokenizer())(ADD, ADD.solution)[1]["length"]
    assert tok_len == pytest.approx(-len(CharTokenizer().encode(ADD.solution, add_bos=False)) / 100)


def test_reward_fn_batch_matches_single_and_groups():
    texts = [ADD.solution, "<think>x</think><answer>131</answer>", "<answer>132</answer>", REFUSAL_TEXT]
    fn = RewardFn(language=0.5, safety=1.0, length=0.1, max_len=64)
    total, comps = fn.batch([ADD] * 4, texts)
    assert total.shape == (4,) and total.dtype == torch.float32 and set(comps) == set(rewards.COMPONENTS)
    for i, t in enumerate(texts):
        single_total, single = fn(ADD, t)
        assert total[i].item() == pytest.approx(single_total, abs=1e-6)
        assert all(comps[k][i].item() == pytest.approx(v, abs=1e-6) for k, v in single.items())
    kimi = RewardFn(length=1.0, length_kind="kimi")
    _, comps = kimi.batch([ADD] * 4, [ADD.solution, "<answer>1</answer>"] * 2, lengths=[10, 20, 30, 10], group_size=2)
    # groups (10, 20): correct short +0.5, wrong long min(0, -0.5); (30, 10): correct long -0.5, wrong short 0
    assert comps["length"].tolist() == [0.5, -0.5, -0.5, 0.0]
    with pytest.raises(ValueError, match="group_size"):
        kimi.batch([ADD] * 3, [ADD.solution] * 3, group_size=2)
    with pytest.raises(ValueError, match="texts"):
        fn.batch([ADD], [])
    with pytest.raises(ValueError, match="length_kind"):
        RewardFn(length_kind="quadratic")
