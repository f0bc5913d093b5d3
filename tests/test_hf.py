"""smollm.hf against transformers: tiny random checkpoints that transformers itself writes load with its logits,
smollm models written by to_hf load in transformers with ours, and bad checkpoints fail with clear errors."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Lfm2Config,  # noqa: E402
                          Lfm2ForCausalLM, Mamba2Config, Mamba2ForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                          OlmoeConfig, OlmoeForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM, SmolLM3Config, SmolLM3ForCausalLM)

from smollm.config import compose  # noqa: E402
from smollm.hf import CheckpointError, from_hf, load_tokenizer, to_hf  # noqa: E402
from smollm.config import build_model  # noqa: E402

V = 128
SIZE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1, pad_token_id=None)


def hf_checkpoint(path, cls, config_cls, **kw):
    "A random transformers model saved to `path`; returns it (fp32, eval)."
    torch.manual_seed(0)
    model = cls(config_cls(**(SIZE | kw))).eval()
    model.save_pretrained(path)
    return model


def assert_each_matters(path, hf, undos):
    "Each `undo` (a change to a fresh from_hf(path) model) breaks the logits' agreement with hf: the feature it undoes matters."
    for undo in undos:
        ours = from_hf(path)
        undo(ours)
        with pytest.raises(AssertionError):
            assert_same_logits(ours, hf)


def assert_same_logits(ours, hf, T=40, atol=1e-5):
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


LLAMA_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "theta_head_dim": dict(num_key_value_heads=2, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    "mlp_bias": dict(num_key_value_heads=2, mlp_bias=True),
    "llama3": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "linear": dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
    "yarn": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16}),
    "dynamic": dict(num_key_value_heads=2, max_position_embeddings=32,   # the sequence (40) outgrows 32
                    rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_parity(tmp_path, case):
    hf = hf_checkpoint(tmp_path, LlamaForCausalLM, LlamaConfig, **LLAMA_CASES[case])
    ours = from_hf(tmp_path)
    assert ours.embed.weight.dtype == torch.float32
    assert (ours.lm_head.weight is ours.embed.weight) == bool(LLAMA_CASES[case].get("tie_word_embeddings"))
    assert_same_logits(ours, hf)
    if "rope_type" in LLAMA_CASES[case].get("rope_parameters", {}) and case != "theta_head_dim":
        from smollm.positional import RopeScaling   # the scaling matters: plain RoPE gives other logits
        ours.positional.scaling, ours.positional._inv_cache = RopeScaling(), {}
        with pytest.raises(AssertionError):
            assert_same_logits(ours, hf)


def test_mistral_sliding_window(tmp_path):
    hf = hf_checkpoint(tmp_path, MistralForCausalLM, MistralConfig, num_key_value_heads=2, sliding_window=8)
    ours = from_hf(tmp_path)
    assert [blk.attn.window for blk in ours.layers] == [8, 8]
    assert_same_logits(ours, hf, T=40)   # 5 windows long: a wrong window shows
    # the window matters here: without it the logits differ
    for blk in ours.layers:
        blk.attn.window = None
    with pytest.raises(AssertionError):
        assert_same_logits(ours, hf, T=40)


@pytest.mark.parametrize("sliding", [False, True])
def test_qwen2_bias(tmp_path, sliding):
    kw = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1) if sliding else {}
    hf = hf_checkpoint(tmp_path, Qwen2ForCausalLM, Qwen2Config, num_key_value_heads=2, **kw)
    ours = from_hf(tmp_path)
    assert ours.layers[0].attn.q_proj.bias is not None and ours.layers[0].attn.o_proj.bias is None
    assert [blk.attn.window for blk in ours.layers] == ([None, 8] if sliding else [None, None])
    assert_same_logits(ours, hf)


TINYLLAMA_4X = {   # TinyLlama-1.1B-Chat-v1.0's config.json (transformers 4.35), at a tiny size
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 176,
    "max_position_embeddings": 64, "model_type": "llama", "num_attention_heads": 8, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0", "use_cache": True, "vocab_size": V}


def test_transformers_4x_config(tmp_path):
    hf_checkpoint(tmp_path, LlamaForCausalLM, LlamaConfig, **{k: TINYLLAMA_4X[k] for k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings")})
    (tmp_path / "config.json").write_text(json.dumps(TINYLLAMA_4X))
    assert from_hf(tmp_path).embed.weight.dtype == torch.bfloat16     # torch_dtype, as transformers' dtype="auto"
    ours = from_hf(tmp_path, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert (ours.dim, ours.layers[0].attn.n_kv_heads, ours.layers[0].mlp_norm.eps) == (64, 2, 1e-5)
    assert_same_logits(ours, hf)


def test_sharded_and_bin(tmp_path):
    hf = hf_checkpoint(tmp_path / "full", LlamaForCausalLM, LlamaConfig, num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_logits(from_hf(tmp_path / "sharded"), hf)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)   # old checkpoints store it: skipped
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    assert_same_logits(from_hf(tmp_path / "bin"), hf)


# --- to_hf: smollm models out to transformers

BASE = ["model=tiny", f"data.vocab_size={V}", "model.mlp_hidden=96", "model.init_std=0.1"]
TO_HF_CASES = {
    "llama_gqa": ([], "llama"),
    "llama_mha_tied": (["model/attention=mha", "model.tie_embeddings=true"], "llama"),
    "llama_mqa_theta": (["model/attention=mqa", "model.positional.theta=500000.0"], "llama"),
    "llama_head_dim": (["model.head_dim=32"], "llama"),
    "llama_mlp_bias": (["model.mlp.bias=true"], "llama"),
    "llama3": (["model/positional=rope_llama3", "model.positional.scaling.original_max_seq_len=16",
                "model.positional.scaling.factor=4.0"], "llama"),
    "yarn": (["model/positional=rope_yarn", "model.positional.scaling.original_max_seq_len=16"], "llama"),
    "mistral": (["model/attention=sliding_window", "model.attention.window=8"], "mistral"),
    "qwen2": (["model.attention.qkv_bias=true"], "qwen2"),
    "qwen2_pattern": (["++model.attention.window=8", "model.layer_pattern=SG"], "qwen2"),
    "qwen3": (["model/attention=qk_norm", "model.head_dim=32"], "qwen3"),
    "qwen3_pattern": (["model/attention=qk_norm", "++model.attention.window=8", "model.layer_pattern=SG"], "qwen3"),
}


@pytest.mark.parametrize("case", list(TO_HF_CASES))
def test_to_hf_round_trip(tmp_path, case):
    overrides, model_type = TO_HF_CASES[case]
    ours = build_model(compose(BASE + overrides).model).eval()
    to_hf(ours, tmp_path, eos_token_id=2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == model_type and cfg["eos_token_id"] == 2
    hf = transformers_own(tmp_path)
    assert_same_logits(ours, hf)
    assert_same_logits(from_hf(tmp_path), hf)   # and back into smollm


def test_to_hf_interrupted(tmp_path, monkeypatch):
    "An export that fails half-way leaves the folder's previous checkpoint whole."
    import safetensors.torch
    first = build_model(compose(BASE).model).eval()
    to_hf(first, tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    torch.manual_seed(1)
    with pytest.raises(OSError, match="disk full"):
        to_hf(build_model(compose(BASE).model), tmp_path)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before    # no temporary file left either
    assert_same_logits(first, AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval())


def test_overwrite_in_place(tmp_path):
    "from_hf's parameters own their memory: writing back into the folder they came from is safe."
    hf = hf_checkpoint(tmp_path, LlamaForCausalLM, LlamaConfig, num_key_value_heads=2)
    ours = from_hf(tmp_path)
    to_hf(ours, tmp_path)
    assert_same_logits(ours, hf)
    assert_same_logits(from_hf(tmp_path), hf)


NO_HF = {   # overrides -> the component the error must name
    "model/norm=layernorm": "norm: LayerNorm",
    "model/norm=dyt": "norm: DyT",
    "model/positional=alibi": "positional: ALiBi",
    "model/positional=learned": "positional: LearnedAbsolute",
    "model/positional=t5": "positional: T5Bias",
    "model/mlp=gelu": "mlp: GELUMLP",
    "model/attention=mla": "attn: MLA",
    "model/attention=qk_norm model.attention.qkv_bias=true": "attention: qk_norm with qkv_bias",
    "model/attention=softcap": "attn.softcap",
    "model/attention=sinks": "attn.sinks",
    "model.placement=post": "placement='post'",
    "model.layer_pattern=GN model/attention=qk_norm": "NoPE layers with QK-norm",
    "model/mlp=moe model.mlp.n_shared=1": "mlp.n_shared: 1",
    "model/attention=qk_norm_all": "attention.qk_norm_scope: all has no Hugging Face equivalent (only OLMoE",   # dense: OLMo-2
    "model/attention=qk_norm_all model/mlp=moe model.head_dim=32": "attention.qk_norm_scope: all",
    "model/mlp=moe model.mlp.norm_topk=false": "mlp.norm_topk: False",
    "model.layer_pattern=CG": "short convolutions with attention without QK-norm",
    "+model/mixer@model.mixers.M=mamba2 model.layer_pattern=MG model/mlp=none": "Mamba2 layers with attention",
    "model/mlp=none": "mlp: none has no",
    "+model/mixer@model.mixers.M=mamba2 model.layer_pattern=M model/mlp=none ++model.mixers.M.norm_eps=1e-6":
        "layers.attn.norm: eps=1e-06",
    "model.norm.unit_offset=true": "norm: RMSNorm with unit_offset",
    "model.value_residual=true": "layers.1.attn: parameters",
    "model/attention=differential": "layers.0.attn: DiffAttention",
    "model.positional.fraction=0.5": "positional.fraction: 0.5",
}


@pytest.mark.parametrize("override", list(NO_HF))
def test_to_hf_refuses(tmp_path, override):
    model = build_model(compose(BASE + override.split()).model)
    with pytest.raises(CheckpointError, match="has no Hugging Face equivalent") as e:
        to_hf(model, tmp_path)
    assert NO_HF[override] in str(e.value)
    assert not (tmp_path / "config.json").exists()


# --- issue 13's families: experts (Mixtral, Qwen3-MoE), a conv/attention hybrid (LFM2), NoPE layers (SmolLM3)

MOE = dict(num_key_value_heads=2, num_experts_per_tok=2)
FAMILY_CASES = {   # name -> (model class, config class, config fields)
    "mixtral": (MixtralForCausalLM, MixtralConfig, MOE | dict(num_local_experts=4, intermediate_size=32)),
    "mixtral_window_tied": (MixtralForCausalLM, MixtralConfig, MOE | dict(
        num_local_experts=4, intermediate_size=32, sliding_window=8, tie_word_embeddings=True)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig, MOE | dict(num_experts=4, moe_intermediate_size=32, head_dim=32)),
    "qwen3_moe_norm_topk": (Qwen3MoeForCausalLM, Qwen3MoeConfig, MOE | dict(
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=True)),
    "olmoe": (OlmoeForCausalLM, OlmoeConfig, MOE | dict(num_experts=4, intermediate_size=32)),
    "olmoe_mha_norm_topk_tied": (OlmoeForCausalLM, OlmoeConfig, dict(
        num_key_value_heads=4, num_experts=6, num_experts_per_tok=3, intermediate_size=16, norm_topk_prob=True,
        tie_word_embeddings=True)),
    "lfm2": (Lfm2ForCausalLM, Lfm2Config, dict(num_key_value_heads=2, num_hidden_layers=4, norm_eps=1e-5,
                                                layer_types=["conv", "conv", "full_attention", "conv"], block_multiple_of=16)),
    "lfm2_bias_kernel": (Lfm2ForCausalLM, Lfm2Config, dict(
        num_key_value_heads=2, layer_types=["conv", "full_attention"], conv_bias=True, conv_L_cache=4,
        block_auto_adjust_ff_dim=False, tie_word_embeddings=False)),
    "smollm3": (SmolLM3ForCausalLM, SmolLM3Config, dict(num_key_value_heads=2, num_hidden_layers=4)),
    "mamba2": (Mamba2ForCausalLM, Mamba2Config, dict(
        hidden_size=32, num_heads=8, head_dim=8, state_size=8, n_groups=2, chunk_size=8, layer_norm_epsilon=1e-5)),
    "mamba2_limit_bias_tied": (Mamba2ForCausalLM, Mamba2Config, dict(
        hidden_size=32, num_heads=4, head_dim=16, state_size=4, n_groups=1, chunk_size=16, conv_kernel=3, use_bias=True,
        time_step_limit=(0.0, 0.05), tie_word_embeddings=True)),
    "smollm3_window": (SmolLM3ForCausalLM, SmolLM3Config, dict(
        num_key_value_heads=2, num_hidden_layers=4, use_sliding_window=True, sliding_window=8, mlp_bias=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
}


def transformers_own(folder):
    """The folder loaded by transformers' own class for its model_type. AutoModelForCausalLM is what users call, but
    a package may register its own class in transformers' place: flash-linear-attention (the extra fla, which the
    mixer tests import) maps mamba2 to its Triton-only Mamba2, and then the Auto class returns that one."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model_type = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_family_parity(tmp_path, case):
    "transformers writes a tiny random checkpoint; from_hf reads it with its logits; to_hf writes it back, and both agree."
    cls, config_cls, kw = FAMILY_CASES[case]
    hf = hf_checkpoint(tmp_path / "hf", cls, config_cls, **kw)
    ours = from_hf(tmp_path / "hf")
    assert_same_logits(ours, hf)
    to_hf(ours, tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == hf.config.model_type
    back = transformers_own(tmp_path / "back")
    assert type(back) is cls
    assert_same_logits(ours, back)
    assert_same_logits(from_hf(tmp_path / "back"), hf)


def test_families_read_what_matters(tmp_path):
    "The parity tests can fail: each family's own setting, undone in the loaded model, changes the logits."
    def undone(case, undo):
        cls, config_cls, kw = FAMILY_CASES[case]
        hf = hf_checkpoint(tmp_path / case, cls, config_cls, **kw)
        ours = from_hf(tmp_path / case)
        assert_same_logits(ours, hf)
        undo(ours)
        with pytest.raises(AssertionError):
            assert_same_logits(ours, hf)
    undone("qwen3_moe_norm_topk", lambda m: [setattr(b.mlp, "norm_topk", False) for b in m.layers])
    undone("olmoe", lambda m: [setattr(b.mlp, "norm_topk", True) for b in m.layers])      # OLMoE does not renormalise
    undone("olmoe", lambda m: [b.attn.q_norm.weight.data.mul_(torch.linspace(0.5, 1.5, 64)) for b in m.layers])
    undone("mixtral_window_tied", lambda m: [setattr(b.attn, "window", None) for b in m.layers])
    undone("smollm3", lambda m: setattr(m, "nope_layers", frozenset()))
    undone("mamba2_limit_bias_tied", lambda m: [setattr(b.attn, "dt_limit", (0.0, float("inf"))) for b in m.layers])
    undone("lfm2", lambda m: m.layers[0].attn.conv_weight.data.copy_(m.layers[0].attn.conv_weight.flip(-1)))  # taps reversed
    ours = from_hf(tmp_path / "lfm2")
    assert [type(b.attn).__name__ for b in ours.layers] == ["ShortConv", "ShortConv", "Attention", "ShortConv"]
    assert ours.layers[0].mlp.gate_proj.out_features == 64     # LFM2's 2/3 of intermediate_size=96, to 16s
    assert ours.lm_head.weight is ours.embed.weight             # LFM2 ties by default


def test_families_refused(tmp_path):
    "What smollm cannot express fails with what it lacks, before any weight is read."
    hf_checkpoint(tmp_path, OlmoeForCausalLM, OlmoeConfig, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for extra, err in [({"model_type": "gpt_oss"}, "'gpt_oss' cannot be expressed.*biases on o_proj.*swiglu_limit"),
                       ({"clip_qkv": 8.0}, "clip_qkv=8.0: OLMoE clamps q, k and v"),
                       ({"head_dim": 8}, "head_dim=8: OLMoE's q_norm is hidden_size=64 wide"),
                       ({"model_type": "mamba2", "num_heads": 3, "head_dim": 8}, "num_heads=3 is not expand"),
                       ({"model_type": "qwen3_moe", "mlp_only_layers": [1]}, "all have the same MLP"),
                       ({"model_type": "qwen3_moe", "attention_bias": True}, "attention_bias=true gives o_proj"),
                       ({"model_type": "smollm3", "num_hidden_layers": 4, "use_sliding_window": True,
                         "sliding_window": 8}, "layer 3 is 'sliding_attention' without RoPE")]:
        (tmp_path / "config.json").write_text(json.dumps(cfg | extra))
        with pytest.raises(CheckpointError, match=err):
            from_hf(tmp_path)


def test_moe_bias_refused(tmp_path):
    "smollm's auxiliary-loss-free routing bias goes out only while it is zero: HF routers have none."
    model = build_model(compose(BASE + ["model/mlp=moe", "model.mlp.expert_hidden=32"]).model)
    to_hf(model, tmp_path / "zero")
    model.layers[1].mlp.expert_bias[0] = 0.5
    with pytest.raises(CheckpointError, match="layers.1.mlp.expert_bias: nonzero has no Hugging Face equivalent"):
        to_hf(model, tmp_path / "biased")


FAMILY_TO_HF = {   # smollm overrides -> the model type they go out as
    "mixtral": (["model/mlp=moe", "model.mlp.expert_hidden=32", "model.mlp.n_experts=4"], "mixtral"),
    "qwen3_moe": (["model/mlp=moe", "model.mlp.expert_hidden=16", "model.mlp.n_experts=6", "model.mlp.top_k=3",
                   "model.mlp.norm_topk=false", "model/attention=qk_norm"], "qwen3_moe"),
    "olmoe": (["model/mlp=moe", "model.mlp.expert_hidden=16", "model.mlp.n_experts=6", "model.mlp.top_k=3",
               "model.mlp.norm_topk=false", "model/attention=qk_norm_all"], "olmoe"),
    "lfm2": (["model/attention=qk_norm", "model.n_layers=3", "model.layer_pattern=CCG", "model.mixers.C.bias=true"],
             "lfm2"),
    "smollm3": (["model.n_layers=4", "++model.attention.window=8", "model.layer_pattern=SGSN"], "smollm3"),
    "mamba2": (["model/mlp=none", "+model/mixer@model.mixers.M=mamba2", "model.layer_pattern=M",
                "model.mixers.M.n_groups=2", "model.mixers.M.bias=true"], "mamba2"),
    "qwen3_next": (["+model/mixer@model.mixers.D=gated_deltanet", "model.layer_pattern=DG", "model.n_layers=4",
                    "model/attention=qk_norm", "model.attention.output_gate=true", "+model/norm@model.attention.norm=rmsnorm",
                    "model.attention.norm.unit_offset=true", "model.norm.unit_offset=true", "++model.mixers.D.norm_eps=1e-5",
                    "model.positional.fraction=0.25"], "qwen3_next"),
    "qwen3_next_moe": (["+model/mixer@model.mixers.D=gated_deltanet", "model.layer_pattern=DG", "model.n_layers=2",
                        "model/attention=qk_norm", "model.attention.output_gate=true",
                        "+model/norm@model.attention.norm=rmsnorm", "model.attention.norm.unit_offset=true",
                        "model.norm.unit_offset=true", "++model.mixers.D.norm_eps=1e-5", "model.positional.fraction=0.25",
                        "model/mlp=moe", "model.mlp.expert_hidden=16", "model.mlp.n_shared=1",
                        "model.mlp.shared_gate=true", "model.mlp.norm_topk=false"], "qwen3_next"),
}


@pytest.mark.parametrize("case", list(FAMILY_TO_HF))
def test_family_to_hf(tmp_path, case, monkeypatch):
    overrides, model_type = FAMILY_TO_HF[case]
    ours = build_model(compose(BASE + overrides).model).eval()
    with torch.no_grad():   # norm weights that are not all ones, so that a misplaced norm shows
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    to_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    if model_type == "qwen3_next":
        _torch_gated_delta_rule(monkeypatch)
    hf = transformers_own(tmp_path)
    assert_same_logits(ours, hf)
    assert_same_logits(from_hf(tmp_path), hf)


# --- bad input


@pytest.fixture
def llama_dir(tmp_path):
    hf_checkpoint(tmp_path, LlamaForCausalLM, LlamaConfig, num_key_value_heads=2)
    return tmp_path


def test_missing_files(tmp_path, llama_dir):
    with pytest.raises(CheckpointError, match="is not a folder"):
        from_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json in"):
        from_hf(tmp_path / "empty")
    (llama_dir / "model.safetensors").rename(llama_dir / "weights.txt")
    with pytest.raises(CheckpointError, match=r"no weights in .*expected model.safetensors.*weights.txt"):
        from_hf(llama_dir)


def test_missing_shard(tmp_path):
    hf = hf_checkpoint(tmp_path, LlamaForCausalLM, LlamaConfig, num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shards that are not in the folder.*{shard.name}"):
        from_hf(tmp_path / "sharded")


def test_dtype_by_name(llama_dir):
    assert from_hf(llama_dir, dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8' is not a floating-point torch dtype"):
        from_hf(llama_dir, dtype="int8")
    with pytest.raises(ValueError, match="dtype='bf16' is not"):
        from_hf(llama_dir, dtype="bf16")


def test_corrupt_files(llama_dir):
    "Files that are there but broken: each raises a CheckpointError naming the file, never a raw parser error."
    st, cfg = llama_dir / "model.safetensors", llama_dir / "config.json"
    good, good_cfg = st.read_bytes(), cfg.read_text()
    st.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors is not a safetensors file: its first 8 bytes"):
        from_hf(llama_dir)
    st.write_bytes(good[:len(good) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated: tensor"):
        from_hf(llama_dir)
    st.write_bytes(good)
    cfg.write_text(good_cfg[:-10])
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        from_hf(llama_dir)
    cfg.write_text(good_cfg)
    st.unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="pytorch_model.bin could not be read by torch.load"):
        from_hf(llama_dir)


def test_unknown_model_type(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt_neox"}))
    with pytest.raises(CheckpointError, match=r"model_type='gpt_neox' is not supported; supported: \('llama'"):
        from_hf(llama_dir)


def test_bad_tensors(llama_dir):
    f = llama_dir / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    del sd["model.layers.1.mlp.up_proj.weight"], sd["lm_head.weight"]
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        from_hf(llama_dir)
    msg = str(e.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight, lm_head.weight" in msg
    assert "unexpected tensors: model.layers.0.self_attn.q_norm.weight" in msg
    assert "shape mismatches: model.layers.0.self_attn.k_proj.weight [64, 64] (expected [32, 64])" in msg


def test_unsupported_config_fields(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    for extra, err in [({"hidden_act": "gelu"}, "hidden_act='gelu'"),
                       ({"attention_bias": True}, "attention_bias=true gives o_proj a bias"),
                       ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope' is not supported"),
                       ({"rope_parameters": {"rope_type": "llama3", "factor": 2.0, "smoothing": 1.0}},
                        r"fields smollm does not read: \['smoothing'\]")]:
        (llama_dir / "config.json").write_text(json.dumps(cfg | extra))
        with pytest.raises(CheckpointError, match=err):
            from_hf(llama_dir)


# --- tokenizer


ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


def write_tokenizer(path, template=ZEPHYR):
    "A small byte-level BPE with Llama's special tokens and a chat template, as tokenizer.json + tokenizer_config.json."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello there, how are you?", "I am a tiny model. Nice to meet you!"] * 20, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": template}))


def test_tokenizer_matches_transformers(tmp_path):
    write_tokenizer(tmp_path)
    ours = load_tokenizer(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "system", "content": "You are nice."}, {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "how are you?"}, {"role": "user", "content": "I am a tiny model"}]
    for gen in (True, False):
        assert ours.apply_chat_template(chat, add_generation_prompt=gen) == ref.apply_chat_template(
            chat, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == ref.encode(
            ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False), add_special_tokens=False)
    text = "hello there, I am a tiny model!"
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == text
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, None)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path)
    write_tokenizer(tmp_path, template="{{ raise_exception('only user turns') }}")
    with pytest.raises(CheckpointError, match="chat template: only user turns"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")   # the newer file wins
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    (tmp_path / "tokenizer_config.json").write_text("{'bos_token': 1")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json could not be read by the tokenizers library"):
        load_tokenizer(tmp_path)


# --- Qwen3-Next: Gated DeltaNet layers, gated attention with partial rotary and (1 + w) RMSNorms

Q3N = dict(num_hidden_layers=4, num_key_value_heads=2, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
           linear_key_head_dim=16, linear_value_head_dim=8, mlp_only_layers=[0, 1, 2, 3])   # dense MLPs


def _torch_gated_delta_rule(monkeypatch):
    "transformers' Qwen3-Next module, its Gated DeltaNet ops unwrapped to the torch path (not fla's Triton kernels)."
    import inspect
    qn = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                 "causal_conv1d_update"):
        monkeypatch.setattr(qn, name, inspect.unwrap(getattr(qn, name)))
    return qn


Q3N_MOE = {k: v for k, v in Q3N.items() if k != "mlp_only_layers"} | dict(   # the default: experts on every layer
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32)


def _qwen3_next(tmp_path, monkeypatch, fields):
    qn = _torch_gated_delta_rule(monkeypatch)
    torch.manual_seed(0)
    hf = qn.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**(SIZE | fields))).eval()
    with torch.no_grad():   # zero-centred weights that are not zero, so that (1 + w) against w shows
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path


@pytest.fixture
def qwen3_next(tmp_path, monkeypatch):
    "A tiny random Qwen3-Next (DDDG, partial rotary 1/4, norm weights not zero) saved by transformers; (model, path)."
    return _qwen3_next(tmp_path, monkeypatch, Q3N)


@pytest.fixture
def qwen3_next_moe(tmp_path, monkeypatch):
    "The same with experts on every layer and a gated shared expert two experts wide; (model, path)."
    return _qwen3_next(tmp_path, monkeypatch, Q3N_MOE)


def test_qwen3_next_moe_parity(qwen3_next_moe):
    hf, tmp = qwen3_next_moe
    ours = from_hf(tmp / "hf")
    mlp = ours.layers[0].mlp
    assert (type(mlp).__name__, mlp.n_experts, mlp.top_k, mlp.n_shared, mlp.expert_hidden, mlp.norm_topk) == \
        ("MoE", 4, 2, 2, 16, True)
    assert mlp.shared_gate is not None and mlp.aux_loss_weight == 0.001
    assert_same_logits(ours, hf)
    to_hf(ours, tmp / "back")
    cfg = json.loads((tmp / "back" / "config.json").read_text())
    assert (cfg["mlp_only_layers"], cfg["num_experts"], cfg["shared_expert_intermediate_size"]) == ([], 4, 32)
    back = AutoModelForCausalLM.from_pretrained(tmp / "back", dtype=torch.float32).eval()
    assert type(back.model.layers[0].mlp).__name__ == "Qwen3NextSparseMoeBlock"
    assert_same_logits(ours, back)
    assert_same_logits(from_hf(tmp / "back"), hf)
    assert_each_matters(tmp / "hf", hf, (lambda m: [setattr(b.mlp, "shared_gate", None) for b in m.layers],  # the gate,
                                         lambda m: [setattr(b.mlp, "shared", None) for b in m.layers]))      # the shared expert


def test_qwen3_next_moe_decoding(qwen3_next_moe):
    hf, tmp = qwen3_next_moe
    assert_same_decoding(from_hf(tmp / "hf"), hf)
    assert_same_decoding(from_hf(tmp / "hf"), hf, pad=3)


def test_qwen3_next_moe_refused(qwen3_next_moe):
    _, tmp = qwen3_next_moe
    cfg = json.loads((tmp / "hf" / "config.json").read_text())
    for extra, err in [({"mlp_only_layers": [0, 1]}, r"mlp_only_layers=\[0, 1\].*some layers have a dense MLP"),
                       ({"decoder_sparse_step": 2}, "decoder_sparse_step=2: some layers have a dense MLP"),
                       ({"shared_expert_intermediate_size": 24}, "shared_expert_intermediate_size=24 is not a multiple")]:
        (tmp / "hf" / "config.json").write_text(json.dumps(cfg | extra))
        with pytest.raises(CheckpointError, match=err):
            from_hf(tmp / "hf")
    plain = build_model(compose(BASE + ["model/mlp=moe", "model.mlp.n_shared=1", "model.mlp.shared_gate=true",
                                        "model.mlp.expert_hidden=16"]).model)   # Llama attention: not Qwen3-Next's
    with pytest.raises(CheckpointError, match="gated shared expert, but not as Qwen3-Next has them"):
        to_hf(plain, tmp / "plain")


def test_qwen3_next_parity(qwen3_next):
    hf, tmp = qwen3_next
    ours = from_hf(tmp / "hf")
    assert [type(b.attn).__name__ for b in ours.layers] == ["GatedDeltaNet"] * 3 + ["Attention"]
    assert ours.positional.fraction == 0.25 and ours.norm.unit_offset
    assert_same_logits(ours, hf)
    to_hf(ours, tmp / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp / "back", dtype=torch.float32).eval()
    assert type(back).__name__ == "Qwen3NextForCausalLM"
    assert_same_logits(ours, back)
    assert_same_logits(from_hf(tmp / "back"), hf)
    assert_each_matters(tmp / "hf", hf, (lambda m: setattr(m.layers[3].attn, "gate_proj", None),          # the output gate,
                                         lambda m: setattr(m.positional, "fraction", 1.0),                 # the partial rotary,
                                         lambda m: setattr(m.layers[0].attn_norm, "unit_offset", False)))  # the (1 + w) weights


def test_qwen3_next_refused(qwen3_next):
    _, tmp = qwen3_next
    cfg = json.loads((tmp / "hf" / "config.json").read_text())
    (tmp / "hf" / "config.json").write_text(json.dumps(cfg | {"mlp_only_layers": [0, 1]}))   # layers 2, 3 MoE
    with pytest.raises(CheckpointError, match="some layers have a dense MLP, and smollm's layers all have the same MLP"):
        from_hf(tmp / "hf")
    gated = build_model(compose(BASE + ["model.attention.output_gate=true"]).model)
    with pytest.raises(CheckpointError, match="not as Qwen3-Next has them"):
        to_hf(gated, tmp / "gated")
    eps = [o for o in FAMILY_TO_HF["qwen3_next"][0] if "norm_eps" not in o]   # the mixer's 1e-6, the model's 1e-5
    with pytest.raises(CheckpointError, match="layers.attn.norm: eps=1e-06 has no Hugging Face equivalent"):
        to_hf(build_model(compose(BASE + eps).model), tmp / "eps")


def assert_same_decoding(ours, hf, T=10, steps=8, atol=1e-4, full=False, pad=0):
    """transformers decodes greedily with its cache; smollm, fed the same tokens one at a time with its own cache
    (a RecurrentState for the mixers), gives the same logits at every step: transformers' decoding logits, or with
    `full` those of its full forward over the tokens decoded. `pad`: the second prompt is left-padded by that many."""
    prompt = torch.randint(0, V, (2, T))
    mask = torch.ones_like(prompt)
    mask[1, :pad] = 0
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
        cache, key_mask = ours.new_cache(), mask.bool()
        mine = [ours(prompt, cache=cache, key_mask=key_mask)[:, -1]]
        for s in range(steps - 1):
            key_mask = torch.cat([key_mask, torch.ones(2, 1, dtype=torch.bool)], 1)
            mine.append(ours(out.sequences[:, T + s, None], cache=cache, key_mask=key_mask)[:, -1])
        theirs = hf(out.sequences[:, :-1]).logits[:, T - 1:] if full else torch.stack(out.logits, 1)
    torch.testing.assert_close(torch.stack(mine, 1), theirs, atol=atol, rtol=0)


@pytest.mark.parametrize("case", [c for c in FAMILY_CASES if "bias" not in c or "mamba2" in c])
def test_family_decoding(tmp_path, case):
    """Decoding with a cache or a recurrent state agrees with transformers' own cached decoding, step by step.
    transformers' Mamba2 clamps dt to time_step_limit in its full forward but not in its one-token step (smollm
    clamps in both; see nbs/07b_ssd): with a limit, smollm's decoding is checked against the full forward."""
    cls, config_cls, kw = FAMILY_CASES[case]
    hf = hf_checkpoint(tmp_path, cls, config_cls, **kw)
    limited = "time_step_limit" in kw
    assert_same_decoding(from_hf(tmp_path), hf, full=limited)
    if limited:   # and transformers' own decoding does drift from its full forward there
        with pytest.raises(AssertionError):
            assert_same_decoding(from_hf(tmp_path), hf)


@pytest.mark.parametrize("case", ["mixtral_window_tied", "qwen3_moe", "olmoe", "lfm2", "smollm3", "mamba2"])
def test_family_decoding_left_padded(tmp_path, case):
    "A left-padded prompt decodes as transformers decodes it with its attention_mask (positions counted from the pad)."
    cls, config_cls, kw = FAMILY_CASES[case]
    hf = hf_checkpoint(tmp_path, cls, config_cls, **kw)
    assert_same_decoding(from_hf(tmp_path), hf, pad=3)


def test_qwen3_next_decoding(qwen3_next):
    hf, tmp = qwen3_next
    assert_same_decoding(from_hf(tmp / "hf"), hf)
    assert_same_decoding(from_hf(tmp / "hf"), hf, pad=3)


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe", "olmoe"])
def test_stacked_experts(tmp_path, case):
    "A state dict saved as transformers 5 holds it (experts stacked, Mixtral's block under mlp) loads the same."
    cls, config_cls, kw = FAMILY_CASES[case]
    hf = hf_checkpoint(tmp_path, cls, config_cls, **kw)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    (tmp_path / "model.safetensors").unlink()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_same_logits(from_hf(tmp_path), hf)
    sd.pop("model.layers.1.mlp.experts.down_proj")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.\w+\.experts\.0\.w?\w*"):
        from_hf(tmp_path)
