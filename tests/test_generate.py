"""smollm.generate: the same greedy tokens as transformers' generate, the cache against recomputation, left padding
against unpadded rows, end of sequence, sampling, bad input, and the two console scripts."""
import io
import json
import sys

import pytest
import torch

from smollm.config import compose
from smollm.attention import GrowingCache, StaticCache
from smollm.generate import chat_cli, generate, generate_cli
from smollm.runs import load_model
from smollm.config import build_model

V = 128
BASE = ["model=tiny", "model.mlp_hidden=96", "model.init_std=0.1"]


def tiny(*overrides, vocab=V):
    torch.manual_seed(0)
    return build_model(compose(BASE + [f"data.vocab_size={vocab}", *overrides]).model).eval()


def left_pad(rows, pad=0):
    "Prompts of different lengths -> (ids (B, T) left-padded with `pad`, attention_mask (B, T))."
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


# --- against transformers

HF_MODELS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_key_value_heads=1)),
}


@pytest.mark.parametrize("arch", list(HF_MODELS))
def test_greedy_equals_transformers(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    from smollm.hf import from_hf
    cls, cfg_cls, kw = HF_MODELS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, initializer_range=0.1, **kw)
    hf = getattr(transformers, cls)(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    rows = [torch.randint(1, V, (n,)) for n in (9, 4, 6)]
    new = 24   # with the prompt, past Mistral's window of 8
    for ids, mask in [left_pad(rows[:1]), left_pad(rows)]:
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
        assert torch.equal(generate(ours, ids, new, attention_mask=mask), ref)
    if arch == "mistral":   # the compiled step with a static cache, past the window, left-padded
        assert torch.equal(generate(ours, ids, new, attention_mask=mask, compile=True), ref)


# --- the cache, padding and stopping on smollm's own components

VARIANTS = {
    "gqa": [],
    "window_pattern": ["++model.attention.window=6", "model.layer_pattern=SG"],
    "alibi": ["model/positional=alibi"],
    "t5": ["model/positional=t5"],
    "mla": ["model/attention=mla"],
    "qk_norm_sinks": ["model/attention=sinks", "model.attention.qk_norm=true"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_equals_recompute(variant):
    model = tiny(*VARIANTS[variant])
    ids = torch.randint(0, V, (2, 5))
    out = generate(model, ids, 14)
    assert torch.equal(out, generate(model, ids, 14, use_cache=False))
    with torch.no_grad():   # and the greedy picks are the full model's argmax at every step
        assert torch.equal(model(out[:, :-1])[:, 4:].argmax(-1), out[:, 5:])


@pytest.mark.parametrize("variant", ["gqa", "window_pattern", "alibi", "mla"])
def test_left_padding_equals_unpadded(variant):
    model = tiny(*VARIANTS[variant])
    rows = [torch.randint(0, V, (n,)) for n in (3, 10, 7)]
    ids, mask = left_pad(rows, pad=5)
    for use_cache in (True, False):
        out = generate(model, ids, 10, attention_mask=mask, use_cache=use_cache)
        for i, r in enumerate(rows):
            alone = generate(model, r[None], 10)
            assert torch.equal(out[i, ids.shape[1]:], alone[0, len(r):]), (i, use_cache)


def test_eos_per_row():
    model = tiny()
    ids = torch.randint(0, V, (3, 4))
    free = generate(model, ids, 16)
    eos = [int(free[0, 6]), int(free[1, 4])]          # row 0 ends at its 3rd new token (or earlier), row 1 at its 1st
    out = generate(model, ids, 16, eos_id=eos, pad_id=-1)
    cuts = []
    for i in range(3):   # each row: its free-running tokens up to the first EOS, then padding
        gen = free[i, 4:].tolist()
        cuts.append(min([gen.index(e) + 1 for e in eos if e in gen], default=len(gen)))
    assert out.shape[1] == 4 + max(cuts)              # the loop ends when the last row does
    for i in range(3):
        assert out[i, 4:].tolist() == free[i, 4:4 + cuts[i]].tolist() + [-1] * (max(cuts) - cuts[i])


def test_sampling():
    model = tiny()
    ids = torch.randint(0, V, (2, 4))
    draw = lambda seed, **kw: generate(model, ids, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert torch.equal(draw(3, top_k=1), generate(model, ids, 10))
    assert torch.equal(draw(3, top_p=1e-6), generate(model, ids, 10))


def test_bad_input():
    model = tiny()
    ids = torch.randint(0, V, (2, 4))
    for kw, err in [(dict(attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])), r"rows \[0\] are not left-padded"),
                    (dict(attention_mask=torch.ones(2, 3)), "must match input_ids"),
                    (dict(top_p=1.5), "top_p=1.5 must be in"), (dict(top_k=0), "top_k=0"),
                    (dict(temperature=-1.0), "temperature=-1.0")]:
        with pytest.raises(ValueError, match=err):
            generate(model, ids, 3, **kw)
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, T\) integer tensor"):
        generate(model, ids[0], 3)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, ids, -1)
    with pytest.raises(ValueError, match=r"token ids \[-100, 128\] outside the model's vocabulary 0..127"):
        generate(model, torch.tensor([[-100, 3, 128]]), 3)


# --- the static cache and the compiled decoding step

@pytest.mark.parametrize("variant", list(VARIANTS) + ["eager"])
def test_static_cache_equals_full_forward(variant):
    model = tiny(*(VARIANTS.get(variant) or ["model.attention.backend=eager"]))
    ids = torch.randint(0, V, (2, 13))
    cache = model.new_cache(capacity=16)          # 3 slots never written: the mask must hide them
    with torch.no_grad():
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 13)]
        assert int(cache[0].length) == 13
        torch.testing.assert_close(torch.cat(steps, 1), model(ids), rtol=1e-5, atol=1e-5)


def test_static_cache_errors():
    with pytest.raises(ValueError, match="capacity=0 is not valid: a positive integer"):
        StaticCache(0)
    c = StaticCache(4)
    c.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"3 tokens \+ 2 new > capacity=4"):
        c.update(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    with pytest.raises(ValueError, match=r"= 70 tokens, but the positional encoding LearnedAbsolute has 64 positions"):
        generate(tiny("model/positional=learned"), torch.randint(0, V, (1, 6)), 64, compile=True)
    with pytest.raises(ValueError, match="compile=True .* needs use_cache=True"):
        generate(tiny(), torch.randint(0, V, (1, 3)), 2, compile=True, use_cache=False)


@pytest.mark.parametrize("variant", ["gqa", "window_pattern", "alibi", "mla"])
def test_compiled_generate_equals_eager(variant):
    "compile=True (static cache, torch.compile'd step) decodes a left-padded batch token for token as eager does."
    from torch._dynamo.utils import counters
    model = tiny(*VARIANTS[variant])
    rows = [torch.randint(0, V, (n,)) for n in (3, 9)]
    ids, mask = left_pad(rows)
    new = 20                                       # past the window of 6
    eager = generate(model, ids, new, attention_mask=mask)
    torch._dynamo.reset()                          # compile afresh, so the counter below sees this test's trace
    counters.clear()
    assert torch.equal(generate(model, ids, new, attention_mask=mask, compile=True), eager)
    assert counters["stats"]["calls_captured"] > 0   # dynamo really traced the step (not a silent eager fallback)
    assert torch.equal(generate(model, ids[1:], new, compile=True), eager[1:])   # no padding: key_mask None
    with torch.no_grad():                          # trained further: the compiled step reads the new weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    retrained = generate(model, ids, new, attention_mask=mask)
    assert not torch.equal(retrained, eager)
    assert torch.equal(generate(model, ids, new, attention_mask=mask, compile=True), retrained)


def test_growing_cache_grows():
    c, k = GrowingCache(), torch.randn(1, 2, 7, 4)
    for t in range(7):
        ks, vs = c.update(k[:, :, t:t + 1], 2 * k[:, :, t:t + 1])
        assert torch.equal(ks, k[:, :, :t + 1]) and torch.equal(vs, 2 * k[:, :, :t + 1])
    assert c.buffers[0].shape[2] == 8                  # doubled from 1: amortised O(1) copies per token
    p = c.buffers[0].data_ptr()
    c.update(k[:, :, :1], k[:, :, :1])                 # room left: written in place, no new buffer
    assert c.buffers[0].data_ptr() == p and c.length == 8


# --- the console scripts


@pytest.fixture
def checkpoint(tmp_path):
    "A smollm model written by to_hf, with a byte-level BPE tokenizer and TinyLlama-Chat's Zephyr-style template."
    pytest.importorskip("transformers")
    from test_hf import write_tokenizer
    from smollm.hf import to_hf
    to_hf(tiny(vocab=320), tmp_path, bos_token_id=1, eos_token_id=2)   # the BPE has about 300 tokens
    write_tokenizer(tmp_path)
    return tmp_path


def run_cli(fn, argv, stdin, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert fn(argv) is None   # a console script's return value is its exit status
    return capsys.readouterr().out


def test_generate_cli(checkpoint, monkeypatch, capsys):
    from smollm.hf import load_tokenizer
    tok, model = load_tokenizer(checkpoint), load_model(checkpoint)
    prompt = "hello there, how"
    ids = torch.tensor([tok.encode(prompt)])
    ref = generate(model, ids, 12, eos_id=2)[0, ids.shape[1]:].tolist()
    ref = tok.decode(ref[:ref.index(2)] if 2 in ref else ref)
    out = run_cli(generate_cli, [str(checkpoint), "--prompt", prompt, "--max-new-tokens", "12"], "",
                  monkeypatch, capsys)
    assert out == prompt + ref + "\n"


def test_chat_cli(checkpoint, monkeypatch, capsys):
    from smollm.hf import load_tokenizer
    tok, model = load_tokenizer(checkpoint), load_model(checkpoint)
    turns = ["hello there", "how are you?"]
    messages, replies = [{"role": "system", "content": "You are nice."}], []
    for turn in turns:   # the reference conversation, one greedy reply per turn
        messages.append({"role": "user", "content": turn})
        ids = torch.tensor([tok.apply_chat_template(messages, tokenize=True)])
        gen = generate(model, ids, 10, eos_id=2)[0, ids.shape[1]:].tolist()
        replies.append(tok.decode(gen[:gen.index(2)] if 2 in gen else gen))
        messages.append({"role": "assistant", "content": replies[-1].strip()})
    argv = [str(checkpoint), "--system", "You are nice.", "--max-new-tokens", "10"]
    out = run_cli(chat_cli, argv, "\n".join(turns) + "\n", monkeypatch, capsys)
    assert out == "".join(r + "\n" for r in replies)
    # --compile: static caches and the compiled step; the second turn is longer, so its capacity may differ
    assert run_cli(chat_cli, argv + ["--compile"], "\n".join(turns) + "\n", monkeypatch, capsys) == out


def test_load_model_errors(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)   # a run folder without its config.yaml and checkpoints
    with pytest.raises(FileNotFoundError, match="smollm-train run folder with config.yaml"):
        load_model(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download TinyLlama/TinyLlama-1.1B-Chat-v1.0"):
        load_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")


def test_cli_bad_input(checkpoint, tmp_path, monkeypatch, capsys):
    "A bad folder or an empty prompt ends the command with one line that names it (SystemExit), no traceback."
    for fn, name in ((generate_cli, "smollm-generate"), (chat_cli, "smollm-chat")):
        with pytest.raises(SystemExit, match=f"^{name}: FileNotFoundError: {tmp_path / 'nope'} is not a checkpoint"):
            run_cli(fn, [str(tmp_path / "nope"), "--prompt", "hi"] if fn is generate_cli else [str(tmp_path / "nope")],
                    "", monkeypatch, capsys)
    with pytest.raises(SystemExit, match="^smollm-chat: ValueError: top_p=1.5 must be in"):
        run_cli(chat_cli, [str(checkpoint), "--top-p", "1.5"], "hi\n", monkeypatch, capsys)
    with pytest.raises(SystemExit, match="^smollm-generate: ValueError: compile=True .* needs use_cache=True"):
        run_cli(generate_cli, [str(checkpoint), "--prompt", "hi", "--compile", "--no-cache"], "", monkeypatch, capsys)
    with pytest.raises(SystemExit, match="^smollm-generate: the prompt encodes to no tokens"):
        run_cli(generate_cli, [str(checkpoint)], "", monkeypatch, capsys)          # nothing on stdin
    (checkpoint / "tokenizer.json").write_text("{not json")
    with pytest.raises(SystemExit, match="^smollm-generate: CheckpointError: .*tokenizer.json could not be read"):
        run_cli(generate_cli, [str(checkpoint), "--prompt", "hi"], "", monkeypatch, capsys)
