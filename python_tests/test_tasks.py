"""Pipeline tasks and tokenizer: generators are deterministic, verifiers accept the generated answers and
reject wrong ones, train / test never share a prompt, zebra puzzles are unique (checked here by an
independent brute force over the prompt text), and the tokenizer round-trips every task's text."""
import dataclasses
import itertools
import json
import random
import re
import sys
from collections import Counter

import pytest

from r1kernels.pipeline import tasks
from r1kernels.pipeline.tasks import TASKS, Sample, load_jsonl, make_dataset, parse_expression, verify
from r1kernels.pipeline.tokenizer import ALPHABET, TAG_TOKENS, CharTokenizer, HFTokenizer, load_tokenizer

GENERATED = ("arithmetic", "countdown", "zebra")


def _answer_of(solution: str) -> str:
    return solution[solution.rindex("<answer>") + len("<answer>"):solution.rindex("</answer>")]


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------

def test_char_tokenizer_special_tokens_are_single_ids():
    tok = CharTokenizer()
    assert tok.vocab_size <= 1024
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = [tok.encode(t, add_bos=False) for t in TAG_TOKENS]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 4
    assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id} | {i[0] for i in ids}) == 8
    assert tok.encode("ab", add_eos=True) == [tok.bos_id, tok.token_to_id("a"), tok.token_to_id("b"), tok.eos_id]


def test_char_tokenizer_round_trip():
    tok = CharTokenizer()
    texts = [ALPHABET, "".join(reversed(ALPHABET)), "<think>7+5=12</think>\n<answer>12</answer>", "", "<thin<answer>"]
    texts += [s.prompt + s.solution for name in GENERATED for s in make_dataset(name, 10, seed=3, difficulty="hard")]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids[1:]) == text
        assert tok.decode(ids, skip_special=True) == text
        assert tok.decode(ids) == "<bos>" + text


def test_char_tokenizer_control_tokens_are_not_read_from_text():
    tok = CharTokenizer()
    ids = tok.encode("<eos><pad>", add_bos=False)
    assert len(ids) == len("<eos><pad>") and tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode([tok.pad_id, tok.eos_id], skip_special=True) == ""


def test_char_tokenizer_unknown_characters():
    ids = CharTokenizer().encode("a\u00e9b", add_bos=False)
    assert ids[1] == CharTokenizer().unk_id and len(ids) == 3
    with pytest.raises(ValueError, match="U\\+00E9"):
        CharTokenizer(strict=True).encode("a\u00e9b")
    with pytest.raises(ValueError, match="outside"):
        CharTokenizer().decode([5000])


def _write_hf_tokenizer(path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, "hello": 4, "world": 5, "<think>": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))


def test_hf_tokenizer_wraps_tokenizer_json(tmp_path):
    _write_hf_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 7)
    assert tok.encode("hello world", add_eos=True) == [1, 4, 5, 2]
    assert tok.decode([1, 4, 5, 2], skip_special=True) == "hello world"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "world"}}))
    assert HFTokenizer(tmp_path / "tokenizer.json").eos_id == 5
    with pytest.raises(ValueError, match="bos_token"):
        HFTokenizer(tmp_path, bos_token="<nope>")


def test_hf_tokenizer_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HFTokenizer(tmp_path)
    assert isinstance(load_tokenizer(None), CharTokenizer)


# ---------------------------------------------------------------------------------------------------------
# Datasets: determinism, splits, verifiers
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GENERATED)
def test_deterministic_by_seed(name):
    a = make_dataset(name, 20, seed=7, difficulty="medium")
    assert a == make_dataset(name, 20, seed=7, difficulty="medium")
    assert [s.prompt for s in a] != [s.prompt for s in make_dataset(name, 20, seed=8, difficulty="medium")]


@pytest.mark.parametrize("name", GENERATED)
@pytest.mark.parametrize("difficulty", ["easy", "medium"])
def test_train_and_test_are_disjoint(name, difficulty):
    train = make_dataset(name, 150, seed=0, difficulty=difficulty, split="train")
    test = make_dataset(name, 60, seed=0, difficulty=difficulty, split="test")
    assert len(train) == 150 and len(test) == 60
    assert not {s.prompt for s in train} & {s.prompt for s in test}
    assert all(tasks.split_of(s.prompt) == "test" for s in test)


@pytest.mark.parametrize("name", GENERATED)
@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_verifier_accepts_generated_answers(name, difficulty):
    n = 8 if (name, difficulty) == ("zebra", "hard") else 40
    for s in make_dataset(name, n, seed=1, difficulty=difficulty):
        assert s.task == name
        assert s.solution.startswith("<think>") and s.solution.endswith(f"<answer>{s.answer}</answer>")
        assert _answer_of(s.solution) == s.answer
        assert verify(s, s.answer) and verify(s, f"  {s.answer} ")
        assert not verify(s, None) and not verify(s, "") and not verify(s, s.answer + "1")
        assert Sample(**json.loads(json.dumps(dataclasses.asdict(s)))) == s  # meta is JSON-serialisable


def test_mixture_takes_turns():
    ds = make_dataset(["arithmetic", "countdown", "zebra"], 7, seed=0)
    assert [s.task for s in ds] == ["arithmetic", "countdown", "zebra"] * 2 + ["arithmetic"]


def test_make_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_dataset("nope", 1)
    with pytest.raises(ValueError, match="no generator"):
        make_dataset("jsonl", 1)
    with pytest.raises(ValueError, match="difficulty"):
        make_dataset("arithmetic", 1, difficulty="extreme")
    with pytest.raises(ValueError, match="split"):
        make_dataset("arithmetic", 1, split="dev")
    with pytest.raises(ValueError, match="not a known task"):
        verify(Sample("p", "a", "s", "nope"), "a")


def test_easy_level_fits_the_token_budget():
    tok = CharTokenizer()
    for name in ("arithmetic", "countdown"):
        for s in make_dataset(name, 200, seed=0, difficulty="easy"):
            assert len(tok.encode(s.prompt)) <= 32
            assert len(tok.encode(s.solution, add_bos=False, add_eos=True)) <= 64


# ---------------------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------------------

def test_arithmetic_answers_and_traces():
    rng = random.Random(0)
    for _ in range(300):
        s = tasks.arithmetic_sample(rng, max_digits=4, ops="+-*", allow_negative=True, mul_digits=2)
        a, b, op = s.meta["a"], s.meta["b"], s.meta["op"]
        assert s.prompt == f"{a}{op}{b}="
        assert int(s.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
    assert tasks.arithmetic_sample(random.Random(0), ops="+").solution.count(",") <= 1
    assert tasks._add_trace(47, 85) == "7+5=12,4+8+1=13"
    assert tasks._sub_trace(52, 17) == "12-7=5,5-1-1=3"
    assert tasks._sub_trace(100, 1) == "10-1=9,10-0-1=9,1-0-1=0"
    assert tasks._mul_trace(47, 5) == "7*5=35,4*5+3=23"
    assert tasks._mul_trace(47, 35) == "47*5=235,47*3=141,235+1410=1645"


def test_arithmetic_easy_has_no_negative_answers():
    assert all(int(s.answer) >= 0 for s in make_dataset("arithmetic", 100, seed=2, difficulty="easy"))


def test_arithmetic_verifier():
    s = Sample("52-17=", "35", "", "arithmetic")
    assert verify(s, "35") and verify(s, "+35") and verify(s, " 35\n")
    for wrong in ("36", "35.0", "3 5", "35a", "thirty-five", "-35", "", "1,035"):
        assert not verify(s, wrong), wrong
    assert verify(Sample("17-52=", "-35", "", "arithmetic"), "-35")


# ---------------------------------------------------------------------------------------------------------
# Countdown
# ---------------------------------------------------------------------------------------------------------

def test_countdown_generated_solutions_use_every_number():
    for s in make_dataset("countdown", 60, seed=4, difficulty="hard"):
        value, used = parse_expression(s.answer)
        assert value == s.meta["target"] and Counter(used) == Counter(s.meta["numbers"])
        assert s.prompt == ",".join(map(str, s.meta["numbers"])) + f"->{s.meta['target']}"


def test_countdown_parser_and_verifier():
    s = Sample("8,3,5,2->21", "8*3-5+2", "", "countdown", {"numbers": [8, 3, 5, 2], "target": 21})
    assert verify(s, "8*3-5+2") and verify(s, " (8 * 3) - (5 - 2) ") and verify(s, "2+8*3-5")
    assert parse_expression("(8/3)*3") == (8, [8, 3, 3])
    assert not verify(s, "8*3-5")  # wrong target
    assert not verify(s, "8*3-3+0")  # numbers not given
    assert not verify(s, "8*3-5+2+2-2")  # 2 used three times
    assert not verify(s, "8*3*1-3")
    for bad in ("8*3-5+", "(8*3-5+2", "8*3-5+2)", "8 3", "8**3-5+2", "-8+3*5", "08*3-5+2", "8*3-5+2=21",
                "8/0", "eval('21')", "", "(" * 40 + "21" + ")" * 40, "21" + "+0" * 200):
        assert not verify(s, bad), bad
    with pytest.raises(tasks.ExpressionError, match="division by zero"):
        parse_expression("8/(3-3)")
    assert verify(Sample("3,3,5->1", "", "", "countdown", {"numbers": [3, 3, 5], "target": 1}), "3/3")


# ---------------------------------------------------------------------------------------------------------
# Zebra: an independent brute force over the prompt text
# ---------------------------------------------------------------------------------------------------------

_CLUE_RE = r"^([a-z]+)(!=|=|<|~)([a-z]+|\d)$"


def _brute_force(prompt: str):
    """All assignments {value: house} satisfying the prompt's clues, and the question."""
    header, clues, question = prompt.split(". ")
    cats = [part.split(":")[1].split(",") for part in header.split()]
    n = len(cats[0])
    parsed = [re.match(_CLUE_RE, c).groups() for c in clues.split(",")]
    sols = []
    for perms in itertools.product(itertools.permutations(range(1, n + 1)), repeat=len(cats)):
        pos = {v: h for vals, perm in zip(cats, perms) for v, h in zip(vals, perm)}
        ok = True
        for u, op, v in parsed:
            x, y = pos[u], (int(v) if v.isdigit() else pos[v])
            ok &= {"=": x == y, "!=": x != y, "<": x < y, "~": abs(x - y) == 1}[op]
        if ok:
            sols.append(pos)
    return cats, sols, question


@pytest.mark.parametrize("n_houses,n_attributes,count", [(2, 2, 30), (3, 2, 20), (3, 3, 8), (4, 2, 6), (4, 3, 2)])
def test_zebra_unique_and_answer_matches(n_houses, n_attributes, count):
    rng = random.Random(n_houses * 10 + n_attributes)
    for _ in range(count):
        s = tasks.zebra_sample(rng, n_houses, n_attributes)
        cats, sols, question = _brute_force(s.prompt)
        assert len(sols) == 1, s.prompt
        (pos,) = sols
        assert pos == s.meta["solution"]
        target, _, value = question.rstrip("?").split(" ")
        if target == "house":
            assert s.answer == str(pos[value])
        else:
            names = [part.split(":")[0] for part in s.prompt.split(". ")[0].split()]
            (want,) = [v for v in cats[names.index(target)] if pos[v] == pos[value]]
            assert s.answer == want
        trace = s.solution[len("<think>"):s.solution.index("</think>")]
        for fact in trace.split(","):  # every logged deduction is true of the solution
            value_, op, house = re.fullmatch(r"([a-z]+)(!=|=)(\d)", fact).groups()
            assert (pos[value_] == int(house)) == (op == "="), (fact, s.solution)


def test_zebra_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_houses"):
        tasks.zebra_sample(random.Random(0), n_houses=5)
    with pytest.raises(ValueError, match="n_attributes"):
        tasks.zebra_sample(random.Random(0), n_attributes=1)


def test_zebra_verifier_is_normalised_exact_match():
    s = Sample("...", "cat", "", "zebra")
    assert verify(s, "cat") and verify(s, " Cat. ") and not verify(s, "dog") and not verify(s, "cats")


# ---------------------------------------------------------------------------------------------------------
# JSONL user data
# ---------------------------------------------------------------------------------------------------------

def test_load_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "capital of France?", "answer": "Paris"}, {"prompt": "2/4=", "answer": "0.5", "meta": {"k": 1}}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    a, b = load_jsonl(path)
    assert (a.prompt, a.answer, a.task) == ("capital of France?", "Paris", "jsonl")
    assert a.solution == "<think></think><answer>Paris</answer>"
    assert b.meta["k"] == 1 and b.meta["line"] == 3
    assert verify(a, "paris") and verify(a, "  PARIS. ") and not verify(a, "Lyon")
    assert verify(b, ".5") and verify(b, "0.50") and not verify(b, "0.6")
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="'answer' must be a string"):
        load_jsonl(path)
    path.write_text('{"prompt": "x", "answer": "y"}\nnot json\n')
    with pytest.raises(ValueError, match=":2: not valid JSON"):
        load_jsonl(path)


def test_registry_is_read_only():
    assert set(GENERATED) <= set(TASKS)
    with pytest.raises(TypeError):
        TASKS["mine"] = TASKS["zebra"]
