"""smollm.orca: the synthetic teacher's traces against independent computations, the harder held-out split,
prompt erasure, answer extraction, the exact-match scorer (an oracle scores 1, garbage 0), and a smoke run of
experiment=orca_prompt_erasure through smollm-train."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smollm.orca import (DEFAULT_SIZES, ERASE, FAMILIES, GENERIC_PROMPT, OrcaData, erase_prompt, exact_match,
                         extract_answer, orca_problems, to_chat)

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def problems():
    return orca_problems(FAMILIES, 300, 100, 100, 0, DEFAULT_SIZES)


def _all(problems, family):
    return [p for split in problems.values() for p in split if p["family"] == family]


def test_addition_traces_are_right(problems):
    line = re.compile(r"^(\d+)\+(\d+) carry ([01]): (\d)\+(\d)\+([01])=(\d+), so (\d+)$")
    for p in _all(problems, "addition"):
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", p["user"]).groups())
        *steps, last = p["trace"].splitlines()
        assert last == f"Answer: {a + b}" and p["answer"] == str(a + b)
        carry = 0
        for k, text in enumerate(steps, 1):
            x, y, c, dx, dy, c2, s, found = line.fullmatch(text).groups()
            # the numbers left are a and b without their last k - 1 digits (0 once a number is used up)
            assert (int(x), int(y)) == (a // 10 ** (k - 1), b // 10 ** (k - 1))
            assert (int(dx), int(dy)) == (a // 10 ** (k - 1) % 10, b // 10 ** (k - 1) % 10)
            assert int(c) == int(c2) == carry and int(s) == int(dx) + int(dy) + carry
            assert found == f"{(a + b) % 10 ** k:0{k}d}"              # the low k digits of the sum
            carry = int(s) // 10
        assert carry == 0 and len(steps) == max(len(str(a)), len(str(b)), len(str(a + b)))


def _simulate(story: str):
    """Re-read a story and answer its question from an event log: each move records who saw it; a person's belief
    is the last move of the object they saw, else where it started."""
    sentences = re.findall(r"[^.?]+[.?]", story)
    people = re.fullmatch(r"(.+) are in the room\.", sentences[0].strip()).group(1).replace(" and ", ", ").split(", ")
    start, log, room = {}, [], set(people)
    for s in (x.strip() for x in sentences[1:-1]):
        if m := re.fullmatch(r"The (\w+) is in the (\w+)\.", s): start[m[1]] = m[2]
        elif m := re.fullmatch(r"(\w+) leaves\.", s): room.discard(m[1])
        elif m := re.fullmatch(r"(\w+) comes back\.", s): room.add(m[1])
        elif m := re.fullmatch(r"(\w+) moves the (\w+) to the (\w+)\.", s):
            assert m[1] in room                                      # only someone in the room moves things
            log.append((m[2], m[3], frozenset(room)))
        else: raise AssertionError(f"unknown sentence {s!r}")
    q = sentences[-1].strip()
    m = re.fullmatch(r"Where is the (\w+)\?", q) or re.fullmatch(r"Where does (\w+) think the (\w+) is\?", q)
    who, obj = (None, m[1]) if m.lastindex == 1 else (m[1], m[2])
    believes = lambda person: ([c for o, c, saw in log if o == obj and person in saw] or [start[obj]])[-1]
    reality = ([c for o, c, _ in log if o == obj] or [start[obj]])[-1]
    return (reality if who is None else believes(who)), reality, len(log), {p: believes(p) for p in people}, obj


def test_false_belief_answers_agree_with_an_event_log(problems):
    wrong_beliefs = 0
    for p in _all(problems, "false_belief"):
        answer, reality, moves, beliefs, obj = _simulate(p["user"])
        assert p["answer"] == answer and p["size"] == moves
        assert p["trace"].splitlines()[-1] == f"Answer: {answer}"
        # the trace's last belief line holds what every person saw last of the object
        last = [l for l in p["trace"].splitlines() if f" {obj}: " in f" {l}"][-1]
        assert last.split(f"{obj}: ")[-1] == ", ".join(f"{a} {c}" for a, c in beliefs.items()) + "."
        wrong_beliefs += answer != reality
    assert wrong_beliefs > 50                # many questions are about a belief that is no longer true


def test_the_heldout_split_is_harder(problems):
    digits = lambda p: max(map(len, re.findall(r"\d+", p["user"])))
    moves = lambda p: _simulate(p["user"])[2]
    for family, size in (("addition", digits), ("false_belief", moves)):
        train = [size(p) for p in problems["train"] if p["family"] == family]
        held = [size(p) for p in problems["heldout"] if p["family"] == family]
        test = [size(p) for p in problems["test"] if p["family"] == family]
        assert min(held) > max(train) and max(test) <= max(train), family
    assert not {p["user"] for p in problems["test"]} & {p["user"] for p in problems["train"]}
    assert orca_problems(FAMILIES, 5, 5, 5, 0, DEFAULT_SIZES) == orca_problems(FAMILIES, 5, 5, 5, 0, DEFAULT_SIZES)


@pytest.mark.parametrize("mode", ERASE)
def test_erasure_changes_the_system_prompt_alone(problems, mode):
    row = to_chat(problems["train"][1])
    row["messages"].insert(2, {"role": "system", "content": "a second system message"})
    out = erase_prompt(row, mode, generic="Be brief.")
    rest = lambda r: [m for m in r["messages"] if m["role"] != "system"]
    assert rest(out) == rest(row) and {k: v for k, v in out.items() if k != "messages"} == \
        {k: v for k, v in row.items() if k != "messages"}
    systems = [m["content"] for m in out["messages"] if m["role"] == "system"]
    assert systems == {"keep": [row["messages"][0]["content"], "a second system message"],
                       "generic": ["Be brief.", "Be brief."], "remove": []}[mode]
    assert [m["role"] for m in out["messages"]] == [m["role"] for m in row["messages"] if mode != "remove" or m["role"] != "system"]
    assert erase_prompt(row, "generic")["messages"][0]["content"] == GENERIC_PROMPT


def test_answer_extraction():
    good = {"a\nb\nAnswer: 1234": "1234", "Answer: box.": "box", "Answer:jar\n\n": "jar", "x\n  Answer:  42  ": "42"}
    for text, want in good.items():
        assert extract_answer(text) == want
    for text in ("1234", "answer: 12", "Answer:", "Answer: 12\nmore text", "The Answer: 12 is", ""):
        assert extract_answer(text) is None
    assert exact_match("...\nAnswer: 105", 105) and not exact_match("Answer: 1050", "105")


class Scripted(torch.nn.Module):
    "A stand-in model whose next token is script(the ids it has read, padding left out); no cache."
    def __init__(self, vocab_size, script):
        super().__init__()
        self.vocab_size, self.script = vocab_size, script
        self.w = torch.nn.Parameter(torch.zeros(1))

    def new_cache(self, **kw): return None

    def forward(self, ids, cache=None, key_mask=None):
        if ids.shape[1] > 1:   # the prefill: the prompts, padding left out
            keep = key_mask if key_mask is not None else torch.ones_like(ids, dtype=torch.bool)
            self.seen = [[t for t, k in zip(r, m) if k] for r, m in zip(ids.tolist(), keep.tolist())]
        else:
            self.seen = [s + [t] for s, t in zip(self.seen, ids[:, 0].tolist())]
        logits = torch.full((ids.shape[0], ids.shape[1], self.vocab_size), -1e9)
        for b, s in enumerate(self.seen): logits[b, -1, self.script(s)] = 0.0
        return logits


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return OrcaData("trace", "remove", n_train=40, n_test=12, n_heldout=6, vocab_size=400,
                    cache_dir=str(tmp_path_factory.mktemp("cache"))).prepare()


def test_the_scorer_gives_an_oracle_1_and_garbage_0(source):
    chat, replies = source.chat, {}
    for rows in source.eval_rows.values():
        for r in rows:   # the oracle knows each question's gold trace, keyed by the prompt asked without a system message
            user = [m for m in r["messages"] if m["role"] == "user"]
            prompt = tuple(chat.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
            replies[prompt] = chat.encode(r["messages"][-1]["content"], add_special_tokens=False) + [chat.eos_id]

    def oracle(seen):
        n = next(n for n in range(len(seen), 0, -1) if tuple(seen[:n]) in replies)
        gold = replies[tuple(seen[:n])]
        return gold[min(len(seen) - n, len(gold) - 1)]

    scores = source.score(Scripted(source.vocab_size, oracle), "cpu")
    assert set(scores) == set(source.score_columns) and len(scores) == 6
    assert scores == {c: 1.0 for c in source.score_columns}
    digit = chat.encode("7", add_special_tokens=False)[0]
    assert source.score(Scripted(source.vocab_size, lambda s: digit), "cpu") == {c: 0.0 for c in source.score_columns}
    answer_only = {p: chat.encode("Answer: 0", add_special_tokens=False) + [chat.eos_id] for p in replies}
    replies.update(answer_only)   # a well-formed but wrong answer: right format, wrong value
    assert source.score(Scripted(source.vocab_size, oracle), "cpu")["exact_match_addition"] < 0.2


def test_the_three_students_share_problems_and_tokenizer(tmp_path):
    kw = dict(n_train=30, n_test=4, n_heldout=2, vocab_size=400, cache_dir=str(tmp_path))
    a, b, c = (OrcaData(t, s, **kw).prepare() for t, s in (("answer", "remove"), ("trace", "keep"), ("trace", "remove")))
    assert a.tokenizer.to_str() == b.tokenizer.to_str() == c.tokenizer.to_str()
    ca, cb, cc = (s.conversations["train"] for s in (a, b, c))
    assert [x[1:] for x in cb] == cc and [x[0]["content"] for x in cc] == [x[0]["content"] for x in ca]
    assert all(x[-1]["content"].startswith("Answer: ") and "\n" not in x[-1]["content"] for x in ca)
    assert all(x[0]["role"] == "system" for x in cb) and all(m["role"] != "system" for x in cc for m in x)
    with pytest.raises(Exception, match="keep, generic, remove"):
        OrcaData("trace", "erase", **kw)


def test_smoke_run_of_the_experiment(tmp_path):
    run = tmp_path / "run"
    overrides = ["experiment=orca_prompt_erasure", "data.n_train.addition=30", "data.n_train.false_belief=30", "data.n_test=8", "data.n_heldout=4",
                 "data.vocab_size=400", "trainer.max_steps=4", "trainer.eval_every=4", "trainer.log_every=2",
                 "trainer.batch_size=4", "trainer.eval_batches=1", "trainer.samples=1", "trainer.progress=false",
                 "model.dim=32", "model.n_layers=1", f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"]
    p = subprocess.run([str(BIN / "smollm-train"), *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["metric"] == "exact_match"
    for col in ("exact_match", "exact_match_heldout", "exact_match_false_belief", "exact_match_heldout_addition"):
        assert 0.0 <= info[col] <= 1.0
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"exact_match", "exact_match_heldout"} <= set(header)
