"""MLA against an independent implementation: transformers' DeepSeek-V3 attention (multi-head latent attention as
DeepSeek-V2 defines it), with the same weights, in fp32 on the CPU: the full forward with RoPE on the shared rotary
key, causal, with full-rank queries and with low-rank ones (q_lora_rank).

The tests at the end plant one bug each (a latent norm skipped) and require the comparison to fail.
"""
import pytest
import torch
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from smollm.attention import MLA
from smollm.positional import RoPE

DIM, HEADS, HEAD_DIM, KV_RANK, ROPE_DIM, THETA = 48, 4, 12, 16, 8, 10000.0
B, T = 2, 9
# the submodules both implementations name alike (DeepSeek's names), with or without low-rank queries
SHARED = ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
Q_PARTS = {None: ["q_proj"], 20: ["q_a_proj", "q_a_layernorm", "q_b_proj"]}


def pair(q_lora_rank, seed=0):
    "A smollm MLA with random weights (norm weights too), and transformers' DeepSeek-V3 attention holding the same."
    torch.manual_seed(seed)
    ours = MLA(DIM, HEADS, head_dim=HEAD_DIM, kv_lora_rank=KV_RANK, q_lora_rank=q_lora_rank,
               qk_rope_head_dim=ROPE_DIM)
    cfg = DeepseekV3Config(hidden_size=DIM, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                           qk_nope_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, qk_rope_head_dim=ROPE_DIM,
                           kv_lora_rank=KV_RANK, q_lora_rank=q_lora_rank, attention_bias=False,
                           rope_interleave=False,   # the rotate-half layout smollm's RoPE uses
                           rope_parameters={"rope_type": "default", "rope_theta": THETA},
                           max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    theirs = DeepseekV3Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for name in SHARED + Q_PARTS[q_lora_rank]:
            mine, hf = getattr(ours, name), getattr(theirs, name)
            if name.endswith("layernorm"):
                mine.weight.copy_(1 + 0.3 * torch.randn_like(mine.weight))
                hf.variance_epsilon = mine.eps   # HF builds these norms with its default eps, not the config's
            hf.weight.copy_(mine.weight)
    return ours, theirs, DeepseekV3RotaryEmbedding(cfg)


def forward_both(ours, theirs, rotary, x, pos, rope=None):
    "Both outputs (B, T, DIM) on x (B, T, DIM) at positions pos (T,), causal; `rope`: smollm's RoPE by default."
    rope = rope or RoPE(DIM, HEADS, ROPE_DIM, max_seq_len=64, theta=THETA)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]   # additive causal mask (1, 1, T, T)
    with torch.no_grad():
        got = ours(x, rope, pos)
        want = theirs(x, rotary(x, pos[None]), mask)[0]
    return got, want


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(B, T, DIM, generator=g)


@pytest.mark.parametrize("q_lora_rank", list(Q_PARTS), ids=["full_rank_q", "low_rank_q"])
@pytest.mark.parametrize("step", [1, 3], ids=["pos_0_1_2", "pos_5_8_11"])
def test_mla_matches_deepseek_v3(q_lora_rank, step):
    ours, theirs, rotary = pair(q_lora_rank)
    pos = torch.arange(T) if step == 1 else 5 + step * torch.arange(T)   # gaps change every relative distance
    got, want = forward_both(ours, theirs, rotary, inputs(), pos)
    assert got.shape == want.shape == (B, T, DIM)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_skipped_rotation_fails_the_comparison(monkeypatch):
    "The comparison sees RoPE on the shared rotary key: with the rotation skipped it fails."
    ours, theirs, rotary = pair(None)
    rope = RoPE(DIM, HEADS, ROPE_DIM, max_seq_len=64, theta=THETA)
    monkeypatch.setattr(rope, "rotate", lambda q, k, pos: (q, k))
    got, want = forward_both(ours, theirs, rotary, inputs(), torch.arange(T), rope)
    assert (got - want).abs().max() > 1e-3


@pytest.mark.parametrize("q_lora_rank,norm", [(None, "kv_a_layernorm"), (20, "kv_a_layernorm"),
                                             (20, "q_a_layernorm")])
def test_a_skipped_latent_norm_fails_the_comparison(q_lora_rank, norm, monkeypatch):
    "The bug the absorbed-form test missed: a latent norm skipped (the identity in its place) must not pass."
    ours, theirs, rotary = pair(q_lora_rank)
    monkeypatch.setattr(getattr(ours, norm), "forward", lambda t: t)
    got, want = forward_both(ours, theirs, rotary, inputs(), torch.arange(T))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - want).abs().max() > 1e-2   # and by far, not by rounding
