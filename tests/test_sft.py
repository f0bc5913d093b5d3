"""SFT end to end at a tiny size: the loss mask (prompt targets take no loss or gradient, each assistant turn's EOS
does), loss_on=all, the Zephyr template, an HF tokenizer's own template, packing without cross-talk, bad rows,
init_from a run folder and an HF folder, and `smollm-train data=chat` followed by `smollm-chat`."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smollm.config import ConfigError, build_model, compose
from smollm.data import DataError
from smollm.hf import HFTokenizer, load_tokenizer, to_hf
from smollm.runs import load_run, read_config
from smollm.sft import ChatData, ZEPHYR_TEMPLATE, encode_chat, to_example
from smollm.train import set_up, train

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ["model=tiny", "data=chat", "data.vocab_size=512", "trainer.batch_size=4", "trainer.progress=false",
        "trainer.eval_batches=2", "trainer.samples=1", "trainer.sample_tokens=8"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome!"}]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def source(cache):
    return ChatData(vocab_size=512, cache_dir=str(cache))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, cache):
    "A tiny SFT run on the sample conversations (its folder)."
    run_dir = tmp_path_factory.mktemp("sft_run")
    train(compose(TINY + ["trainer.max_steps=4", "trainer.eval_every=4", f"data.cache_dir={cache}"]), run_dir)
    return run_dir


def tiny_model(vocab, block_size=64):
    return build_model(compose(["model=tiny", f"data.vocab_size={vocab}", f"model.block_size={block_size}"]).model)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_zephyr_text(source):
    text = source.chat.apply_chat_template(CHAT, add_generation_prompt=False)
    assert text == ("<|system|>\nBe brief.<|eos|>\n<|user|>\nWhat is 2 + 3?<|eos|>\n<|assistant|>\n2 + 3 = 5.<|eos|>\n"
                    "<|user|>\nThanks!<|eos|>\n<|assistant|>\nYou're welcome!<|eos|>\n")
    assert source.chat_template == ZEPHYR_TEMPLATE


def test_prompt_targets_take_no_loss_or_gradient(source):
    "Changing the next tokens at prompt positions leaves loss and gradients alone; changing an assistant one does not."
    ids, trained = encode_chat(source.chat, CHAT)
    x, y = map(torch.from_numpy, to_example(ids, trained))
    nxt = torch.from_numpy(ids[1:]).clone()                       # every position's true next token
    prompt = ~torch.from_numpy(trained[1:])
    other = (nxt + 7) % source.vocab_size
    model = tiny_model(source.vocab_size)

    def loss_and_grads(labels):
        model.zero_grad()
        yy = torch.where(torch.from_numpy(trained[1:]), labels, torch.tensor(-100))
        loss = model.loss(x[None], yy[None])
        loss.backward()
        return loss.item(), grads(model)

    base_loss, base_grads = loss_and_grads(nxt)
    assert torch.equal(torch.where(torch.from_numpy(trained[1:]), nxt, torch.tensor(-100)), y)
    # an independent reference: the mean of -log p(next token) over the assistant positions only
    logp = torch.log_softmax(model(x[None])[0].double(), -1)
    ref = -logp[~prompt, nxt[~prompt]].mean().item()
    assert abs(base_loss - ref) < 1e-5
    l2, g2 = loss_and_grads(torch.where(prompt, other, nxt))      # the prompt positions' labels changed
    assert l2 == base_loss and all(torch.equal(a, b) for a, b in zip(base_grads, g2))
    first = int(torch.nonzero(~prompt)[0])
    changed = nxt.clone(); changed[first] = other[first]
    l3, g3 = loss_and_grads(changed)
    assert abs(l3 - base_loss) > 1e-4 and not all(torch.equal(a, b) for a, b in zip(base_grads, g3))


def test_each_assistant_turn_ends_with_a_trained_eos(source):
    ids, trained = encode_chat(source.chat, CHAT)
    eos = source.eos_id
    assert (ids == eos).sum() == 5                                # every turn ends with EOS ...
    assert (trained & (ids == eos)).sum() == 2                    # ... the two assistant ones are trained
    runs = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(int), [0]])))   # [start, end) of trained runs
    texts = [source.decode(ids[s:e]) for s, e in zip(runs[::2], runs[1::2])]
    assert texts == ["2 + 3 = 5.<|eos|>", "You're welcome!<|eos|>"]


def test_loss_on_all_takes_every_token(cache):
    src = ChatData(vocab_size=512, cache_dir=str(cache), loss_on="all")
    x, y = src.batch("val", 0, 4, 64, 0)
    for r in range(4):
        n = int((x[r] != src.pad_id).sum())                       # the conversation's inputs, then padding
        assert (y[r, :n] != -100).all() and (y[r, n:] == -100).all()
        assert torch.equal(y[r, :n - 1], x[r, 1:n])
    with pytest.raises(DataError, match="sft.loss_on='some'"):
        ChatData(loss_on="some")


def test_packed_rows_have_no_cross_talk(cache):
    "Through the data source: each conversation of a packed row gets the logits and per-token losses it gets alone."
    src = ChatData(vocab_size=512, cache_dir=str(cache), pack=True)
    model = tiny_model(src.vocab_size, 128).eval()
    x, y, doc = src.batch("train", 5, 2, 128, seed=0)
    assert (doc.amax(1) >= 3).all()                                 # at least three conversations in every row
    with torch.no_grad():
        logits, plain = model(x, doc=doc), model(x)
        losses, targets = [], 0
        for r in range(2):
            for d in doc[r].unique().tolist():
                sel = doc[r] == d
                if (y[r][sel] == -100).all(): continue               # the padding after the last conversation
                alone = model(x[r][sel][None])[0]
                torch.testing.assert_close(logits[r][sel], alone, atol=1e-5, rtol=1e-5)
                if d > 0: assert not torch.allclose(plain[r][sel], alone, atol=1e-3)   # without doc they would mix
                ce = torch.nn.functional.cross_entropy(alone, y[r][sel], ignore_index=-100, reduction="sum")
                losses.append(ce); targets += int((y[r][sel] != -100).sum())
        assert abs(model.loss(x, y, doc=doc).item() - (sum(losses) / targets).item()) < 1e-5


def test_packing_is_refused_where_the_backend_cannot_mask(tmp_path, cache):
    with pytest.raises(ConfigError, match="sft.pack=true: layer 0's attention: .*fused"):
        set_up(compose(TINY + ["sft.pack=true", "model.attention.backend=fused", f"data.cache_dir={cache}"]), tmp_path)
    summary = train(compose(TINY + ["sft.pack=true", "trainer.max_steps=2", "trainer.eval_every=2",
                                    f"data.cache_dir={cache}"]), tmp_path / "packed")
    assert summary["status"] == "done" and summary["val_loss"] < 10


def write_hf_tokenizer(folder, template):
    "A tiny Hugging Face tokenizer folder: characters as tokens, ChatML marks as special tokens, its own template."
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    chars = sorted(set("".join(m["content"] for m in CHAT) + "\nsystemuserassistant"))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>", *chars])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<unk>", "chat_template": template}))
    return folder


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_hf_template_masks_exactly_the_assistant_contents(tmp_path):
    folder = write_hf_tokenizer(tmp_path / "tok", CHATML)
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    src = ChatData([tmp_path / "c.jsonl"], tokenizer=str(folder), cache_dir=str(tmp_path))
    assert src.chat_template == CHATML and src.eos_id == src.tokenizer.token_to_id("<|im_end|>")
    ids, trained = encode_chat(src.chat, CHAT)
    text = src.decode(ids)
    assert text.replace(" ", "") == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?"
                                     "<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n<|im_start|>user\n"
                                     "Thanks!<|im_end|>\n<|im_start|>assistant\nYou're welcome!<|im_end|>\n").replace(" ", "")
    pieces = [src.tokenizer.id_to_token(int(i)) for i in ids[trained]]
    assert "".join(pieces) == "2 + 3 = 5.<|im_end|>You're welcome!<|im_end|>"
    x, y = src.batch("train", 0, 1, 128, 0)
    assert "".join(src.tokenizer.id_to_token(int(i)) for i in y[0][y[0] != -100]) == "".join(pieces)


def with_generation_tags(template_open, close, prompt):
    "A template in transformers' dialect whose {% generation %} blocks mark each assistant turn's content and end."
    return ("{% for m in messages %}{{ " + template_open + " }}{% if m['role'] == 'assistant' %}{% generation %}"
            "{{ m['content'] + " + close + " }}{% endgeneration %}{% else %}{{ m['content'] + " + close + " }}{% endif %}"
            "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ " + prompt + " }}{% endif %}")


def metaspace_folder(folder):
    "A sentencepiece-style BPE (Metaspace, as Llama's and TinyLlama's tokenizer.json), Zephyr's marks as plain text."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    texts = [m["content"] for m in CHAT] * 20 + ["<|user|> <|assistant|> <|system|>\n"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


@pytest.mark.parametrize("kind", ["chatml_chars", "trained_bpe_zephyr", "metaspace_zephyr"])
def test_masks_match_transformers_assistant_masks(kind, sft_run, tmp_path):
    "An independent reference: transformers' return_assistant_tokens_mask, from the same text marked by {% generation %}."
    from transformers import PreTrainedTokenizerFast
    zephyr_tags = with_generation_tags("'<|' + m['role'] + '|>\\n'", "eos_token", "'<|assistant|>\\n'")
    if kind == "chatml_chars":
        folder, tagged = write_hf_tokenizer(tmp_path / "tok", CHATML), with_generation_tags(
            "'<|im_start|>' + m['role'] + '\\n'", "'<|im_end|>'", "'<|im_start|>assistant\\n'")
    else:
        folder, tagged = (sft_run if kind == "trained_bpe_zephyr" else metaspace_folder(tmp_path / "tok")), zephyr_tags
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    src = ChatData([tmp_path / "c.jsonl"], tokenizer=str(folder), cache_dir=str(tmp_path))
    ids, trained = encode_chat(src.chat, CHAT)
    tagged_ids, tagged_trained = encode_chat(HFTokenizer(src.tokenizer, tagged, src.chat.special), CHAT)
    assert np.array_equal(tagged_ids, ids) and np.array_equal(tagged_trained, trained)   # smollm reads the tags too
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=src.chat.special["eos_token"])
    assert hf.apply_chat_template(CHAT, chat_template=tagged, tokenize=False) == src.chat.apply_chat_template(
        CHAT, add_generation_prompt=False)                          # the same text, tags aside
    ref = hf.apply_chat_template(CHAT, chat_template=tagged, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    assert list(ref["input_ids"]) == ids.tolist()
    assert list(ref["assistant_masks"]) == trained.astype(int).tolist()
    assert trained.sum() > 0 and not trained.all()


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    shifty = "{% for m in messages %}{{ m['role'] + ':' + m['content'] + ('!' if loop.last else '') }}{% endfor %}"
    folder = write_hf_tokenizer(tmp_path / "tok", shifty)
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError, match="renders the turns before assistant turn 2 differently"):
        ChatData([tmp_path / "c.jsonl"], tokenizer=str(folder), cache_dir=str(tmp_path)).prepare()


@pytest.mark.parametrize("row, where", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "row 1: messages[0].role is 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 1: no message has role 'assistant'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
     "row 1: messages[0].content (user) is empty"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "row 1: messages[0].content is NoneType"),
    ({"text": "no messages"}, "row 1: field 'messages' is None")])
def test_bad_rows_name_file_row_and_field(tmp_path, row, where):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        ChatData([f], cache_dir=str(tmp_path)).prepare()
    assert str(f) in str(e.value) and where in str(e.value)


def test_init_from_a_run_folder_and_an_hf_folder(sft_run, cache, tmp_path):
    base, _ = load_run(sft_run)
    src_loss = None
    for folder in (sft_run, to_hf(base, tmp_path / "hf")):
        if folder != sft_run:                                      # the HF folder gets the run's tokenizer files
            for f in ("tokenizer.json", "tokenizer_config.json"): shutil.copy(sft_run / f, folder / f)
        cfg = compose(TINY + [f"init_from={folder}", "model.dim=32", f"data.cache_dir={cache}", "trainer.max_steps=1"])
        run = set_up(cfg, tmp_path / f"ft_{folder.name}")
        assert run.cfg.model.dim == 64 and run.source.tokenizer_folder == str(Path(folder).resolve())
        x, y = run.val[0]
        with torch.no_grad():
            got, want = run.model.loss(x, y).item(), base.loss(x, y).item()
        assert abs(got - want) < 1e-5, folder
        assert run.source.chat_template == ZEPHYR_TEMPLATE
    train(cfg, tmp_path / "ft")
    assert read_config(tmp_path / "ft").model.dim == 64              # config.yaml records the model actually trained
    short = set_up(compose(TINY + [f"init_from={sft_run}", "sft.block_size=32", f"data.cache_dir={cache}"]), tmp_path / "s")
    assert short.val[0][0].shape == (4, 32) and short.cfg.model.block_size == 64
    with pytest.raises(ConfigError, match="sft.block_size=128 is not valid: an integer from 1 to model.block_size=64"):
        set_up(compose(TINY + [f"init_from={sft_run}", "sft.block_size=128"]), tmp_path / "s")
    load_run(tmp_path / "ft")
    with pytest.raises(ConfigError, match="init_from=.* is neither a smollm-train run folder"):
        set_up(compose(TINY + [f"init_from={tmp_path}"]), tmp_path / "x")


def test_init_from_gives_a_token_corpus_the_checkpoints_tokenizer(tmp_path, cache):
    corpus = tmp_path / "corpus"; corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 23} is number {j}." for j in range(80)))
    base = ["model=tiny", "data=text_files", f"data.paths=[{corpus}]", "data.vocab_size=300", "data.val_fraction=0.3",
            f"data.cache_dir={cache}", "trainer.progress=false", "trainer.batch_size=2", "trainer.eval_batches=1",
            "trainer.samples=0", "trainer.max_steps=2", "trainer.eval_every=2"]
    train(compose(base), tmp_path / "pre")
    run = set_up(compose(base + [f"init_from={tmp_path / 'pre'}", "data.vocab_size=8192"]), tmp_path / "ft")
    assert run.cfg.data.tokenizer_path == str(tmp_path / "pre" / "tokenizer.json")
    assert run.cfg.data.vocab_size == run.cfg.model.vocab_size == 300
    pre, _ = load_run(tmp_path / "pre")
    x, y = run.val[0]
    with torch.no_grad():
        assert abs(run.model.loss(x, y).item() - pre.loss(x, y).item()) < 1e-5


def test_run_folder_records_the_chat_template(sft_run):
    tc = json.loads((sft_run / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == ZEPHYR_TEMPLATE and tc["eos_token"] == "<|eos|>"
    tok = load_tokenizer(sft_run)
    assert tok.apply_chat_template(CHAT[1:2]) == "<|user|>\nWhat is 2 + 3?<|eos|>\n<|assistant|>\n"


def test_smollm_train_then_smollm_chat(tmp_path):
    "The console scripts: a short SFT run on the sample data, then a chat with it on stdin."
    run_dir = tmp_path / "run"
    out = subprocess.run([str(BIN / "smollm-train"), *TINY, "trainer.max_steps=3", f"data.cache_dir={tmp_path}",
                          f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "chat (" in out.stdout and "loss on assistant tokens" in out.stdout
    chat = subprocess.run([str(BIN / "smollm-chat"), str(run_dir), "--max-new-tokens", "5"], input="What is 2 + 3?\nHi!\n",
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.count("\n") >= 2                           # each answer ends its line


@pytest.mark.slow
@pytest.mark.parametrize("pack", [False, True])
def test_ddp_on_chat_data_matches_one_process(pack, cache, tmp_path):
    """Uneven counts of targets over micro-batches and ranks: 2 DDP ranks give one process's losses and weights, since
    the step's loss is the mean over all its targets (smollm.train.target_shares), not a mean of means."""
    import os
    from smollm.runs import read_metrics
    args = TINY + [f"data.cache_dir={cache}", f"sft.pack={str(pack).lower()}", "trainer.max_steps=4",
                   "trainer.global_batch_size=8", "trainer.grad_accum=2", "trainer.log_every=1", "trainer.eval_every=2",
                   "trainer.samples=0"]
    train(compose(args), tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "smollm.train", *args,
                        "trainer.parallel=ddp", f"hydra.run.dir={tmp_path / 'two'}"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one" / "metrics.csv"), read_metrics(tmp_path / "two" / "metrics.csv")
    for ra, rb in zip(a, b, strict=True):
        for k in ("train_loss", "val_loss"):
            if ra[k] is not None: assert abs(ra[k] - rb[k]) < 1e-5, (k, ra, rb)
    wa, wb = load_run(tmp_path / "one")[0].state_dict(), load_run(tmp_path / "two")[0].state_dict()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
