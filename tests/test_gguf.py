"""smollm.gguf against independent readers: transformers loads the exported .gguf (dequantizing it) with smollm's
logits and rebuilds its tokenizer with the same ids, GGUFReader reads the metadata back, llama.cpp itself (through
llama-cpp-python, when installed) decodes the same greedy tokens; models llama.cpp cannot run are refused before
anything is written, the write is atomic, and smollm-export works end to end on a run folder and an HF folder."""
import json
import sys

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from smollm.config import build_model, compose  # noqa: E402
from smollm.data import SPECIAL_TOKENS, train_bpe  # noqa: E402
from smollm.gguf import GGUFError, export_cli, to_gguf  # noqa: E402
from smollm.hf import HFTokenizer, load_tokenizer, to_hf  # noqa: E402

V = 320          # embedding rows; the BPE has about 300 tokens, so the last rows get [PAD] tokens
TEXT = "Hello, мир! 你好 👋 café"
CORPUS = ["Hello, world! Привет, мир! 你好世界 café naïve 👋 def f(x): return x + 1", "The cat sat on the mat."] * 30
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ARCHS = {   # smollm overrides -> the llama.cpp architecture they export as
    "llama": ([], "llama"),
    "llama_mha_tied": (["model/attention=mha", "model.tie_embeddings=true"], "llama"),
    "llama_head_dim": (["model.head_dim=32"], "llama"),
    "qwen2": (["model.attention.qkv_bias=true"], "qwen2"),
    # transformers' GGUF loader takes Qwen3's head_dim from Qwen3Config's default (128): the file's is not read
    "qwen3": (["model/attention=qk_norm", "model.head_dim=128"], "qwen3"),
}
# max |logit difference| against smollm allowed per storage type, for logits of size about 4 here: f32 is the
# same arithmetic; f16 rounds each weight to 11 bits, bf16 to 8, q8_0 to 255 levels per block of 32 (smollm-export's report
# in the closing note has the measured figures)
TOL = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2, "q8_0": 0.25}


@pytest.fixture(scope="module")
def tok():
    "smollm's own tokenizer (a byte-level BPE from train_bpe) with its special tokens and a chat template."
    bpe = train_bpe(iter(CORPUS), 300)
    return HFTokenizer(bpe, TEMPLATE, {"bos_token": SPECIAL_TOKENS["bos"], "eos_token": SPECIAL_TOKENS["eos"]})


def tiny(*overrides):
    "A tiny smollm model whose norms, biases and weights are far from their init, so that a misplaced tensor shows."
    torch.manual_seed(0)
    m = build_model(compose(["model=tiny", f"data.vocab_size={V}", "model.init_std=0.1", *overrides]).model).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    return m


def hf_logits(folder, name, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_transformers_logits(tmp_path, tok, arch, dtype):
    overrides, gguf_arch = ARCHS[arch]
    model = tiny(*overrides)
    f = to_gguf(model, tok, tmp_path / f"{arch}.gguf", dtype=dtype)
    r = gguf.GGUFReader(f)
    assert r.fields["general.architecture"].contents() == gguf_arch
    ids = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ours = model(ids)
    diff = (hf_logits(tmp_path, f.name, ids) - ours).abs().max().item()
    assert diff <= TOL[dtype], f"{arch} {dtype}: max |logit difference| {diff:.3g} > {TOL[dtype]}"


def test_quantized_types(tmp_path, tok):
    "q8_0 quantizes the matrices and keeps norms and 1-D tensors in f32, as llama.cpp's converter does; f16 halves them."
    model = tiny("model.attention.qkv_bias=true")
    types = {}
    for dtype in ("f16", "q8_0"):
        r = gguf.GGUFReader(to_gguf(model, tok, tmp_path / f"m-{dtype}.gguf", dtype=dtype))
        types[dtype] = {t.name: t.tensor_type.name for t in r.tensors}
    for dtype, matrix in (("f16", "F16"), ("q8_0", "Q8_0")):
        t = types[dtype]
        assert t["blk.0.attn_q.weight"] == t["token_embd.weight"] == t["output.weight"] == matrix
        assert t["blk.0.attn_norm.weight"] == t["output_norm.weight"] == t["blk.0.attn_q.bias"] == "F32"
    assert (tmp_path / "m-q8_0.gguf").stat().st_size < 0.6 * (tmp_path / "m-f16.gguf").stat().st_size


def test_tokenizer_round_trip(tmp_path, tok):
    "transformers rebuilds the tokenizer from the file alone: the same ids for a multilingual string, and the template."
    to_gguf(tiny(), tok, tmp_path / "m.gguf")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ids = tok.encode(TEXT)
    assert len(ids) > 8 and ids == ref.encode(TEXT, add_special_tokens=False)
    assert ref.decode(ids) == TEXT
    assert ref.convert_ids_to_tokens(tok.eos_id) == SPECIAL_TOKENS["eos"] and tok.eos_id in ref.all_special_ids
    assert ref.chat_template == TEMPLATE


def byte_level(pre: str):
    "A byte-level BPE trained on CORPUS whose text splits as llama.cpp's pre-tokenizer `pre` does."
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from smollm.gguf import LLAMA3_SPLIT, QWEN2_SPLIT
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = {
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])}[pre]
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS + ["1234567 + 89 = 1234656\n\n  indented   spaces"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return HFTokenizer(t, None, {"eos_token": "<|endoftext|>"})


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers(tmp_path, pre):
    "Each pre-tokenizer is named as llama.cpp knows it, and splits text (digits, spaces, newlines) as ours does."
    bl = byte_level(pre)
    to_gguf(tiny(), bl, tmp_path / "m.gguf")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"].contents() == pre
    text = TEXT + " 1234567 + 89 = 1234656\n\n  indented   spaces"
    if pre != "smollm":   # transformers has no split for SmolLM's pre-tokenizer and falls back to GPT-2's
        ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
        assert ref.encode(text, add_special_tokens=False) == bl.encode(text)
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == bl.encode(text)
    llm.close()


def sentencepiece_tokenizer():
    "A TinyLlama-style tokenizer (spaces as '▁', byte fallback to <0x..> tokens, <s> added in front)."
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return HFTokenizer(t, TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def test_sentencepiece_tokenizer(tmp_path):
    "A sentencepiece-style BPE is llama.cpp's `llama` vocabulary, with scores, byte tokens and BOS added."
    sp = sentencepiece_tokenizer()
    to_gguf(tiny("data.vocab_size=400"), sp, tmp_path / "sp.gguf")
    r = gguf.GGUFReader(tmp_path / "sp.gguf")
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is True
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert types[sp.tokenizer.token_to_id("<0x41>")] == gguf.TokenType.BYTE
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    assert r.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    text = "the cat sat, café 你"   # 你 is not in the vocabulary: byte tokens
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    assert ref.encode(text, add_special_tokens=False) == sp.encode(text, False)
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(str(tmp_path / "sp.gguf"), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == sp.encode(text)   # with <s> in front
    llm.close()


def test_metadata(tmp_path, tok):
    "GGUFReader reads back the hyperparameters, the tokenizer and its chat template."
    model = tiny("model/attention=qk_norm", "model.positional.theta=500000.0")
    f = to_gguf(model, tok, tmp_path / "q3.gguf", dtype="q8_0", name="tiny qwen3")
    r = gguf.GGUFReader(f)
    field = lambda k: r.fields[k].contents()   # noqa: E731
    assert field("general.architecture") == "qwen3" and field("general.name") == "tiny qwen3"
    assert (field("qwen3.block_count"), field("qwen3.embedding_length"), field("qwen3.feed_forward_length")) == (2, 64, 128)
    assert (field("qwen3.attention.head_count"), field("qwen3.attention.head_count_kv")) == (4, 2)
    assert (field("qwen3.attention.key_length"), field("qwen3.rope.dimension_count")) == (16, 16)
    assert field("qwen3.context_length") == 64 and field("qwen3.rope.freq_base") == 500000.0
    assert field("qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("tokenizer.chat_template") == TEMPLATE
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == V and tokens[:260] == [tok.tokenizer.id_to_token(i) for i in range(260)]
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_id and field("tokenizer.ggml.bos_token_id") == tok.bos_id
    assert "blk.1.attn_q_norm.weight" in {t.name for t in r.tensors}
    assert "output.weight" in {t.name for t in r.tensors}


def test_llama3_rope_factors(tmp_path, tok):
    "Llama 3.1's RoPE scaling goes in as rope_freqs: llama.cpp divides each plain frequency by its factor."
    model = tiny("model/positional=rope_llama3", "model.positional.scaling.original_max_seq_len=16",
                 "model.positional.scaling.factor=4.0")
    r = gguf.GGUFReader(to_gguf(model, tok, tmp_path / "l3.gguf"))
    factors = torch.tensor(next(t for t in r.tensors if t.name == "rope_freqs.weight").data.copy())
    plain = 1 / model.positional.theta ** (torch.arange(0, 16, 2) / 16)
    torch.testing.assert_close(plain / factors, model.positional.inv_freq(16))
    assert factors[-1] == 4 and factors.min() >= 1   # the slowest pairs divided by the factor, none sped up


REFUSED = {   # overrides -> what the error names
    "model/positional=alibi": "positional: ALiBi",
    "model/norm=dyt": "norm: DyT",
    "model/attention=mla": "attn: MLA",
    "model/positional=learned": "positional: LearnedAbsolute",
    "model/positional=nope": "positional: NoPE",
    "model.placement=post": "placement='post'",
    "model/attention=softcap": "softcap: on",
    "model/mlp=gelu": "mlp: GELUMLP",
    "model/attention=sliding_window model.attention.window=8": "attention.window: 8",
    "model/positional=rope_yarn model.positional.scaling.truncate=false": "positional.scaling: yarn",
    "model/positional=rope_dynamic": "positional.scaling: dynamic",
    "model.positional.fraction=0.5": "positional.fraction: 0.5",
}


@pytest.mark.parametrize("overrides", list(REFUSED))
def test_refusals_write_nothing(tmp_path, tok, overrides):
    with pytest.raises(GGUFError, match="no llama.cpp") as e:
        to_gguf(tiny(*overrides.split()), tok, tmp_path / "m.gguf")
    assert REFUSED[overrides] in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_tokenizer_and_dtype_write_nothing(tmp_path, tok):
    with pytest.raises(GGUFError, match="ids up to .* for a model of vocab_size=64"):
        to_gguf(tiny("data.vocab_size=64"), tok, tmp_path / "m.gguf")
    with pytest.raises(GGUFError, match="dtype='q4_0'"):
        to_gguf(tiny(), tok, tmp_path / "m.gguf", dtype="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write(tmp_path, tok, monkeypatch):
    "A write that fails half-way leaves the previous file whole and no temporary file."
    first = to_gguf(tiny(), tok, tmp_path / "m.gguf")
    before = first.read_bytes()

    def half(self, *a, **k):
        self.fout[0].write(b"\x00" * 100)   # some tensor bytes, then the disk fills up
        raise OSError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half)
    with pytest.raises(OSError, match="disk full"):
        to_gguf(tiny("model/attention=mha"), tok, tmp_path / "m.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and first.read_bytes() == before


# --- smollm-export


def save_tokenizer_files(tok, folder):
    "tokenizer.json and tokenizer_config.json (special tokens, chat template) in `folder`, as a run writes them; `folder`."
    folder.mkdir(parents=True, exist_ok=True)
    tok.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok.special | {"chat_template": TEMPLATE}))
    return folder


@pytest.fixture
def run_dir(tmp_path, tok):
    "A smollm-train run folder: config.yaml, one checkpoint, the tokenizer files (as a run writes them)."
    from smollm.runs import save_checkpoint, save_config
    from smollm.train import adamw
    model = tiny()
    run = tmp_path / "run"
    save_config(compose(["model=tiny", f"data.vocab_size={V}", "model.init_std=0.1"]), run)
    save_checkpoint(run / "checkpoints", 1, model, adamw(model), {"step": 1})
    save_tokenizer_files(tok, run)
    return run, model


def test_cli_run_folder(run_dir, tmp_path, tok, capsys):
    run, model = run_dir
    assert export_cli([str(run), "--format", "gguf", "--dtype", "f16", "--out", str(tmp_path / "out" / "m.gguf")]) is None
    assert "wrote" in capsys.readouterr().out
    ids = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        ours = model(ids)
    assert (hf_logits(tmp_path / "out", "m.gguf", ids) - ours).abs().max() <= TOL["f16"]
    r = gguf.GGUFReader(tmp_path / "out" / "m.gguf")
    assert r.fields["tokenizer.chat_template"].contents() == TEMPLATE   # from the run's tokenizer_config.json
    assert r.fields["general.name"].contents() == "run"
    export_cli([str(run), "--format", "hf", "--out", str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-5, rtol=0)
    assert load_tokenizer(tmp_path / "hf").chat_template == TEMPLATE


def test_cli_hf_folder(tmp_path, tok):
    "A checkpoint transformers wrote goes out as GGUF with transformers' own logits."
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)).eval()
    ref.save_pretrained(tmp_path / "qwen")
    save_tokenizer_files(tok, tmp_path / "qwen")
    export_cli([str(tmp_path / "qwen"), "--out", str(tmp_path / "out" / "q.gguf")])
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(hf_logits(tmp_path / "out", "q.gguf", ids), want, atol=1e-4, rtol=0)


def test_cli_errors(run_dir, tmp_path, monkeypatch):
    run, _ = run_dir
    for argv, says in [(["--dtype", "q4_0"], "--dtype='q4_0' is not valid for gguf"),
                       (["--format", "hf", "--dtype", "q8_0"], "--dtype='q8_0' is not valid for hf")]:
        with pytest.raises(SystemExit, match=says):
            export_cli([str(run), "--out", str(tmp_path / "x"), *argv])
    with pytest.raises(SystemExit, match="not a checkpoint"):
        export_cli([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.gguf")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.gguf").exists()


def test_cli_lora(run_dir, tmp_path, tok):
    """A LoRA run (its checkpoint: the adapter on the base run): as GGUF it is refused without --merge, and with it the
    merged weights go out; as an HF folder without --merge, the base goes out with the adapter beside it, in peft's format."""
    lora = pytest.importorskip("smollm.lora")
    from omegaconf import OmegaConf
    from smollm.runs import load_model, read_config, save_checkpoint, save_config
    from smollm.train import adamw
    base, _ = run_dir
    cfg = OmegaConf.merge(read_config(base), {"init_from": str(base), "sft": {"lora": {
        "rank": 4, "alpha": 8, "targets": None, "dropout": 0.0}}})
    model = lora.for_training(load_model(base), cfg.sft.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)   # peft starts B at zero: an adapter that changes nothing would prove nothing
    run = tmp_path / "lora_run"
    save_config(cfg, run)
    save_checkpoint(run / "checkpoints", 1, model, adamw(model), {"step": 1})
    save_tokenizer_files(tok, run)
    ids = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        want = model.eval()(ids)
    with pytest.raises(SystemExit, match="LoRA run .* pass --merge"):
        export_cli([str(run), "--out", str(tmp_path / "m.gguf")])
    assert not (tmp_path / "m.gguf").exists()
    export_cli([str(run), "--merge", "--out", str(tmp_path / "m.gguf")])
    got = hf_logits(tmp_path, "m.gguf", ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with torch.no_grad():
        base_logits = load_model(base)(ids)
    assert (got - base_logits).abs().max() > 1e-2   # the adapter is in: not the base's logits
    # --format hf without --merge: the base and, beside it, the adapter in peft's format
    import shutil
    from peft import PeftModel
    export_cli([str(run), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    shutil.copytree(tmp_path / "hf", tmp_path / "base_only", ignore=shutil.ignore_patterns("adapter_*"))
    with torch.no_grad():
        auto = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()   # peft: base + adapter
        torch.testing.assert_close(auto(ids).logits, want, atol=1e-4, rtol=0)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base_only", dtype=torch.float32).eval()
        torch.testing.assert_close(plain(ids).logits, base_logits, atol=1e-4, rtol=0)
        adapted = PeftModel.from_pretrained(plain, tmp_path / "hf").eval()
        torch.testing.assert_close(adapted(ids).logits, want, atol=1e-4, rtol=0)


# --- llama.cpp itself


def test_llama_cpp_greedy(tmp_path, tok):
    """llama.cpp loads the file, gives smollm's logits (up to its f16 KV cache's rounding) and decodes
    smollm's greedy tokens; its tokenizer gives smollm's ids. The closest check to LM Studio loading the file."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from smollm.generate import generate
    prompt = tok.encode("Hello, world! The cat")
    for overrides, _ in ARCHS.values():
        model = tiny(*overrides)
        f = to_gguf(model, tok, tmp_path / "m.gguf")
        want = generate(model, torch.tensor([prompt]), 16)[0].tolist()
        llm = llama_cpp.Llama(str(f), n_ctx=64, verbose=False, n_threads=1, logits_all=True)
        llm.eval(prompt)
        with torch.no_grad():
            ours = model(torch.tensor([prompt]))[0]
        assert (torch.tensor(llm.scores[:len(prompt)]) - ours).abs().max() < 1e-2, overrides
        got = list(prompt)
        while len(got) < len(want):
            got.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            llm.eval([got[-1]])
        assert got == want, overrides
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tok.encode(TEXT)
        # the chat template travels in the file: llama.cpp formats chats with it, its special tokens whole
        assert llm.chat_format == "chat_template.default"
        chat = [{"role": "user", "content": "Hello!"}]
        rendered = tok.apply_chat_template(chat)
        as_read = load_tokenizer(save_tokenizer_files(tok, tmp_path / "tok"))   # as a run folder's tokenizer reads
        assert as_read.encode(rendered)[-4:] == [tok.eos_id, tok.encode("\n")[0], *tok.encode("<|assistant|>\n")][-4:]
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == as_read.encode(rendered)
        llm.close()


SCALINGS = {   # RoPE scalings llama.cpp has, on the architectures that read them; the context (64) is 4 x 16
    "linear": ["model/positional=rope_linear"],
    "llama3": ["model/positional=rope_llama3", "model.positional.scaling.factor=4.0"],
    "yarn": ["model/positional=rope_yarn"],
    "yarn_attention_factor": ["model/positional=rope_yarn", "model.positional.scaling.attention_factor=1.3"],
    "yarn_qwen3": ["model/positional=rope_yarn", "model/attention=qk_norm"],
    "linear_qwen2": ["model/positional=rope_linear", "model.attention.qkv_bias=true"],
}


@pytest.mark.parametrize("case", list(SCALINGS))
def test_llama_cpp_rope_scalings(tmp_path, tok, case):
    "llama.cpp applies each scaling as smollm does, where dropping the scaling changes the logits by far more."
    llama_cpp = pytest.importorskip("llama_cpp")
    from smollm.positional import RopeScaling
    model = tiny(*SCALINGS[case], "++model.positional.scaling.original_max_seq_len=16")
    llm = llama_cpp.Llama(str(to_gguf(model, tok, tmp_path / "m.gguf")), n_ctx=64, verbose=False, n_threads=1,
                          logits_all=True)
    ids = list(range(10, 60))
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
        model.positional.scaling, model.positional._inv_cache = RopeScaling(), {}
        plain = model(torch.tensor([ids]))[0]
    assert (torch.tensor(llm.scores[:len(ids)]) - ours).abs().max() < 1e-2
    assert (plain - ours).abs().max() > 0.3
    llm.close()


@pytest.mark.parametrize("overrides", ["model.mlp.bias=true", "model/attention=sliding_window model.attention.window=64"])
def test_llama_cpp_llama_variants(tmp_path, tok, overrides):
    """Llama with MLP biases (llama.cpp reads them; transformers' GGUF loader does not) and Mistral with a window as
    long as the context (llama.cpp's llama, which attends to the whole context) run in llama.cpp as in smollm."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny(*overrides.split())
    f = to_gguf(model, tok, tmp_path / "m.gguf")
    assert gguf.GGUFReader(f).fields["general.architecture"].contents() == "llama"
    llm = llama_cpp.Llama(str(f), n_ctx=64, verbose=False, n_threads=1, logits_all=True)
    ids = list(range(10, 60))
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    assert (torch.tensor(llm.scores[:len(ids)]) - ours).abs().max() < 1e-2
    llm.close()
