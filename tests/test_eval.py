"""smollm.eval, the lm-evaluation-harness adapter: request by request against lm-eval's own `hf` model on an exported
Llama, against model.loss on a model Hugging Face has no class for (ALiBi), the context boundary, the offline tasks,
the errors, and the command lines in subprocesses."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the eval extra: pip install 'smollm[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402

from smollm.config import build_model, compose  # noqa: E402
from smollm.eval import EvalError, adapter_class, evaluate, local_tasks, summarize, tasks_dir, window  # noqa: E402
from smollm.hf import to_hf  # noqa: E402
from smollm.runs import save_checkpoint, save_config  # noqa: E402

BIN = Path(sys.executable).parent
SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n",
         "for i in range(10):\n    if i % 2:\n        continue\n", "x = [1, 2, 3]\ny = {k: v for k, v in zip(x, x)}\n"]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    "tokenizer.json + tokenizer_config.json of a 300-token byte-level BPE of a few standard-library files."
    from smollm.data import PyStdlib, train_bpe
    src = PyStdlib(max_files=12)
    tok = train_bpe(((src.root / f).read_text() for f in src.files()), 300, special=["<|bos|>", "<|eos|>", "<|pad|>"])
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({**SPECIAL, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d, tok.get_vocab_size()


def _copy_tokenizer(tokenizer_files, folder):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_text((tokenizer_files[0] / f).read_text())


def _model(vocab, *overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(compose(["model=tiny", f"data.vocab_size={vocab}", *overrides]).model).eval()


@pytest.fixture(scope="module")
def llama(tokenizer_files, tmp_path_factory):
    "(smollm model, HF folder) of a tiny Llama (context 256) with the tokenizer, exported by to_hf."
    model = _model(tokenizer_files[1], "model.block_size=256")
    d = tmp_path_factory.mktemp("hf")
    to_hf(model, d, bos_token_id=0, eos_token_id=1)
    _copy_tokenizer(tokenizer_files, d)
    return model, d


def run_folder(path, tokenizer_files, *overrides, checkpoint=True):
    "A smollm-train run folder (config.yaml, checkpoints/, tokenizer) of a tiny model with random weights."
    cfg = compose(["model=tiny", f"data.vocab_size={tokenizer_files[1]}", *overrides])
    path.mkdir(parents=True)
    save_config(cfg, path)
    (path / "checkpoints").mkdir()
    if checkpoint:
        model = build_model(cfg.model)
        save_checkpoint(path / "checkpoints", 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    _copy_tokenizer(tokenizer_files, path)
    return path


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _pairs():
    """(context, continuation) requests: short ones, an empty context, and two longer than a 256-token context. No two
    share context + continuation: lm-eval's hf model computes such requests once, in one split, for both (its
    logits cache for one-token continuations), and scores the other split wrongly."""
    pairs = [(t[:5], t[5:]) for t in TEXTS] + [(t[:len(t) // 2], t[len(t) // 2:] + "# end") for t in TEXTS]
    pairs += [("", "def f():\n    return 1\n"), ("x = 1\n", " y")]
    pairs += [("\n".join(TEXTS * 4), "\nz = 2\n"), ("".join(TEXTS[:3]) * 6, "print(x)")]
    return pairs


@pytest.fixture(scope="module")
def hflm(llama):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=str(llama[1]), device="cpu", dtype="float32", batch_size=3)


def test_loglikelihood_matches_lm_eval_hf_model(llama, hflm):
    ours = adapter_class()(path=str(llama[1]), device="cpu", batch_size=4)
    assert ours.max_length == hflm.max_length == 256
    pairs = _pairs()
    assert sum(len(ours.tok_encode(c + k)) > 257 for c, k in pairs) == 2       # the context boundary is crossed
    got, ref = ours.loglikelihood(_requests("loglikelihood", pairs)), hflm.loglikelihood(_requests("loglikelihood", pairs))
    for (c, k), (a, ga), (b, gb) in zip(pairs, got, ref):
        assert a == pytest.approx(b, abs=1e-4, rel=1e-5), (c[-20:], k)
        assert ga == gb
    texts = [t * n for t in TEXTS for n in (1, 20)]                         # some span several windows
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    ref = hflm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    assert got == pytest.approx(ref, abs=1e-4, rel=1e-5)


def test_generate_until_matches_lm_eval_hf_model(llama, hflm):
    ours = adapter_class()(path=str(llama[1]), device="cpu", batch_size=4)
    args = [(t, {"until": ["\n\n", "return"], "max_gen_toks": 12, "do_sample": False}) for t in TEXTS]
    args += [(TEXTS[0], {"until": [], "max_gen_toks": 7})]
    got, ref = ours.generate_until(_requests("generate_until", args)), hflm.generate_until(_requests("generate_until", args))
    assert got == ref
    assert any(g for g in got)


def test_same_accuracy_as_lm_eval_hf_model_on_a_local_task(llama, hflm):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    task = "smollm_pystdlib_next_line"
    ours = summarize(evaluate(str(llama[1]), task, limit=12, device="cpu"))[task]
    ref = simple_evaluate(model=hflm, tasks=[task], limit=12, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(tasks_dir()), include_defaults=False))
    ref = summarize(ref)[task]
    assert ours == pytest.approx(ref, abs=1e-9) and set(ours) == {"acc", "acc_norm"}


def by_loss(model, context, continuation, max_length):
    "The log-probability of continuation after context: minus model.loss summed over the continuation's tokens."
    ids = torch.tensor(window(context, continuation, max_length) + continuation[-1:])[None]
    targets = ids[:, 1:].clone()
    targets[:, :-len(continuation)] = -100
    with torch.no_grad():
        return -float(model.loss(ids[:, :-1], targets)) * len(continuation)


def by_log_softmax(model, context, continuation):
    "The same without smollm's window: the last 64 tokens of context + continuation, by hand."
    ids = (context + continuation)[-65:]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    return float(sum(lp[len(ids) - 1 - len(continuation) + j, t] for j, t in enumerate(continuation)))


@pytest.mark.parametrize("overrides", [["model/positional=alibi"], ["model/norm=dyt", "model/positional=alibi"]])
def test_model_without_hf_class_matches_its_loss(tokenizer_files, overrides):
    from smollm.hf import load_tokenizer
    model, tok = _model(tokenizer_files[1], *overrides), load_tokenizer(tokenizer_files[0])
    lm = adapter_class()(model=model, tok=tok, device="cpu", batch_size=3)
    pairs = _pairs()
    got, checked = lm.loglikelihood(_requests("loglikelihood", pairs)), 0
    for (c, k), (ll, _) in zip(pairs, got):
        ctx, cont = (lm.tok_encode(c), lm.tok_encode(k)) if c else ([lm.prefix_token_id], lm.tok_encode(k))
        if c and c + k != c.rstrip() + k:      # lm-eval moves a context's trailing space into the continuation
            continue
        whole = lm.tok_encode(c + k)
        if c and whole[:len(ctx)] != ctx:
            continue
        cont = whole[len(ctx):] if c else cont
        assert ll == pytest.approx(by_loss(model, ctx, cont, 64), abs=1e-4)
        assert ll == pytest.approx(by_log_softmax(model, ctx, cont), abs=1e-4)
        checked += 1
    assert checked >= 8


def test_truncation(tokenizer_files):
    from smollm.hf import load_tokenizer
    model, tok = _model(tokenizer_files[1], "model/positional=alibi"), load_tokenizer(tokenizer_files[0])
    ctx, cont = tok.encode("\n".join(TEXTS * 4)), tok.encode(" = 1")
    assert len(ctx) > 100
    lm = adapter_class()(model=model, tok=tok, device="cpu")
    (ll, _), = lm._loglikelihood_tokens([(None, ctx, cont)])
    assert ll == pytest.approx(by_log_softmax(model, ctx, cont), abs=1e-4)           # the last 64 inputs, by hand
    assert ll != pytest.approx(by_log_softmax(model, ctx[-20:], cont), abs=1e-3)     # and they matter
    short = adapter_class()(model=model, tok=tok, device="cpu", max_length=32)
    (ll32, _), = short._loglikelihood_tokens([(None, ctx, cont)])
    assert ll32 == pytest.approx(by_log_softmax(model, ctx[-(32 - len(cont) + 1):], cont), abs=1e-4)
    strict = adapter_class()(model=model, tok=tok, device="cpu", truncation=False)
    with pytest.raises(EvalError, match="longer than the model's context of 64 tokens and truncation=False"):
        strict.loglikelihood(_requests("loglikelihood", [("\n".join(TEXTS * 4), " = 1")]))
    with pytest.raises(EvalError, match="truncation=False"):
        strict.generate_until(_requests("generate_until", [("\n".join(TEXTS * 4), {"until": ["\n"], "max_gen_toks": 8})]))
    assert strict.loglikelihood(_requests("loglikelihood", [(TEXTS[0], " = 1")]))   # a short one is fine


def test_errors(tokenizer_files, tmp_path):
    empty = run_folder(tmp_path / "empty", tokenizer_files, checkpoint=False)
    with pytest.raises(FileNotFoundError, match="checkpoint .latest. not found; there are: none"):
        adapter_class()(path=str(empty), device="cpu")
    with pytest.raises(EvalError, match="unknown task .'smollm_pystdlib_nope'.: smollm's offline tasks are"):
        evaluate(str(empty), "smollm_pystdlib_nope")
    with pytest.raises(EvalError, match="batch_size='auto'"):
        adapter_class()(path=str(run_folder(tmp_path / "run", tokenizer_files)), batch_size="auto", device="cpu")
    with pytest.raises(EvalError, match="path=<a run folder"):
        adapter_class()()


@pytest.mark.slow
def test_unknown_task_among_lm_evals_own(tokenizer_files, tmp_path):
    "A name that is neither smollm's nor lm-eval's, found out after indexing lm-eval's tasks (half a minute)."
    with pytest.raises(EvalError, match="unknown task .'hellaswagg'."):
        evaluate(str(run_folder(tmp_path / "run", tokenizer_files)), "hellaswagg,smollm_pystdlib")


def test_smollm_eval_cli(tokenizer_files, tmp_path):
    run = run_folder(tmp_path / "run", tokenizer_files, "model.block_size=256")
    out = subprocess.run([str(BIN / "smollm-eval"), str(run), "--tasks", "smollm_pystdlib_line_order,smollm_pystdlib_ppl",
                          "--limit", "4", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "smollm_pystdlib_line_order" in out.stdout and "bits_per_byte" in out.stdout
    scores = json.loads((run / "eval.json").read_text())["tasks"]
    assert set(scores) == {"smollm_pystdlib_line_order", "smollm_pystdlib_ppl"} and 0 <= scores["smollm_pystdlib_line_order"]["acc"] <= 1


def test_smollm_eval_cli_errors(tokenizer_files, tmp_path):
    "Bad input ends smollm-eval with one line naming it (SystemExit with the message), not a traceback."
    from smollm.eval import main
    empty = run_folder(tmp_path / "empty", tokenizer_files, checkpoint=False)
    for args, what in [([str(tmp_path / "nowhere")], "FileNotFoundError: "),
                       ([str(empty)], "checkpoint (latest) not found; there are: none"),
                       ([str(empty), "--tasks", "smollm_pystdlib,smollm_nope"], "EvalError: unknown task ['smollm_nope']")]:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert str(e.value).startswith("smollm-eval: ") and what in str(e.value), e.value


def test_lm_eval_finds_the_smollm_model_by_name(tokenizer_files, tmp_path):
    "In a fresh process, after adapter_class(), lm-eval's simple_evaluate builds model='smollm' from its model_args string."
    run = run_folder(tmp_path / "run", tokenizer_files, "model.block_size=256")
    code = ("import smollm.eval as e; e.adapter_class(); from lm_eval import simple_evaluate; "
            "from lm_eval.tasks import TaskManager; "
            f"r = simple_evaluate(model='smollm', model_args='path={run},batch_size=2', device='cpu', limit=4, "
            "tasks=['smollm_pystdlib_line_order'], task_manager=TaskManager(include_path=str(e.tasks_dir()), "
            "include_defaults=False)); print(type(r['config']['model']), e.summarize(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'smollm_pystdlib_line_order': {'acc'" in out.stdout, out.stdout


@pytest.mark.slow
def test_lm_eval_command_line_finds_the_smollm_model(tokenizer_files, tmp_path):
    """lm-eval's own command line, as smollm-lm-eval, runs --model smollm on a run folder and an offline task (slow:
    lm-eval's command line indexes all of its own tasks first)."""
    run = run_folder(tmp_path / "run", tokenizer_files, "model.block_size=256")
    out = subprocess.run([str(BIN / "smollm-lm-eval"), "--model", "smollm", "--model_args", f"path={run}", "--device", "cpu",
                          "--tasks", "smollm_pystdlib_next_line", "--limit", "4", "--batch_size", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "smollm_pystdlib_next_line" in out.stdout and "acc" in out.stdout


def test_offline_tasks_are_package_data():
    "Every file of smollm/tasks is matched by pyproject.toml's package-data globs (so wheels and installs carry it)."
    import fnmatch
    import tomllib
    globs = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["smollm"]
    files = [p.relative_to(tasks_dir().parent).as_posix() for p in tasks_dir().iterdir()]
    assert len(local_tasks()) == 3 and len(files) == 6
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)


def test_training_ends_with_the_downstream_evaluation(tmp_path, capsys):
    "eval.tasks in the training config: the finished run is evaluated, eval.json beside run.json, the table printed."
    from smollm.train import train
    cfg = compose(["model=tiny", "model.block_size=128", "data=pystdlib", "data.max_files=20", "data.vocab_size=300",
                   f"data.cache_dir={tmp_path / 'cache'}", "trainer.batch_size=2", "trainer.progress=false",
                   "schedule.warmup_steps=1", "trainer.eval_every=2", "trainer.eval_batches=1", "trainer.max_steps=2",
                   "trainer.samples=0", "eval.tasks=[smollm_pystdlib_line_order]", "eval.limit=4", "eval.batch_size=2"])
    out = train(cfg, tmp_path / "run")
    assert out["status"] == "done"
    scores = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(scores["tasks"]) == ["smollm_pystdlib_line_order"] and scores["limit"] == 4
    assert "downstream scores in" in capsys.readouterr().out
    from smollm.report import report
    md, _ = report(tmp_path / "run")                                   # smollm-report: beside the validation loss
    assert f"| {scores['tasks']['smollm_pystdlib_line_order']['acc']:.3f} ± n/a |" in md, md
    assert train(compose(["model=tiny", "data=mqar", "data.vocab_size=64", "trainer.max_steps=1", "trainer.batch_size=2",
                          "trainer.progress=false", "trainer.eval_batches=1", "trainer.eval_every=1",
                          "eval.tasks=[smollm_pystdlib]"]), tmp_path / "mqar")["status"] == "done"
    assert "eval.tasks=['smollm_pystdlib']: not evaluated" in capsys.readouterr().out    # MQAR has no tokenizer
    assert not (tmp_path / "mqar" / "eval.json").exists()
