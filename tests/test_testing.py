"""smollm.testing can fail: components broken on purpose, one way each (a layer that sees the future, a cache path
that differs from the full forward, a parameter that gets no gradient or a non-finite one, a constructor or a
forward off the contract, a state that grows), and each is caught by the check it breaks, with a message naming the
component, the check, and the measured value against the tolerance. smollm's own components pass the same checks
in their families' test files, through the same functions."""
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from smollm.attention import Attention
from smollm.config import build_model, compose
from smollm.mixers import Mixer, ShortConv
from smollm.mlp import MLP, SwiGLU
from smollm.norms import Norm, RMSNorm
from smollm.positional import Positional
from smollm.testing import (CHECKS, CheckFailed, check_attention, check_component, check_config, check_mixer,
                            check_mlp, check_model, check_norm, check_positional, results_table)


def caught(run, component: str, check: str, *words: str) -> CheckFailed:
    "Run `run`, which must raise CheckFailed for `component` and `check`, its message holding `words`."
    with pytest.raises(CheckFailed) as e:
        run()
    err, msg = e.value, str(e.value)
    assert isinstance(err, AssertionError)
    assert (err.component, err.check) == (component, check), msg
    assert msg.startswith(f"{component}: {check} check failed: ") and "measured" in msg and "tolerance" in msg, msg
    for w in words:
        assert w in msg, msg
    return err


# ---- a layer that peeks at the future ----------------------------------------------------------------------

class Bidirectional(Attention):
    "Attention without the causal mask."
    def forward(self, x, positional, pos, cache=None, key_mask=None):
        B, T, _ = x.shape
        heads = lambda t: t.view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        q, k = positional.rotate(q, k, pos)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class NextToken(Mixer):
    "A mixer that adds the next token's projection: a peek of one position."
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, positional=None, pos=None, cache=None, key_mask=None, doc=None):
        return self.proj(x) + F.pad(x[:, 1:], (0, 0, 0, 1))


def test_a_peek_at_the_future_is_caught():
    err = caught(lambda: check_attention(Bidirectional, n_kv_heads=2), "Bidirectional", "causality",
                 "moved the output at an earlier position")
    assert err.measured > err.tolerance == 1e-6
    caught(lambda: check_mixer(NextToken), "NextToken", "causality", "changing the token at position 5 of 10")
    caught(lambda: check_component(NextToken, checks=["causality"]), "NextToken", "causality")


def test_a_norm_that_mixes_tokens_is_caught():
    class TokenMean(Norm):
        def __init__(self, dim, eps=1e-5):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return self.weight * (x - x.mean(-2, keepdim=True))
    caught(lambda: check_norm(TokenMean), "TokenMean", "position-wise", "moved the output at another position")


def test_a_layer_that_ignores_its_input_cannot_pass_for_causal():
    class Constant(Mixer):
        def __init__(self, dim):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(dim))

        def forward(self, x, positional=None, pos=None, cache=None, key_mask=None, doc=None):
            return self.b.expand_as(x)
    caught(lambda: check_mixer(Constant, checks=["causality"]), "Constant", "causality", "did not move its own output")


# ---- a cache path that differs from the full forward ---------------------------------------------------------

class NoCache(Attention):
    "Writes nothing to its cache and attends to the new tokens only."
    def forward(self, x, positional, pos, cache=None, key_mask=None, **kw):
        return super().forward(x, positional, pos, None, key_mask)


class Growing(ShortConv):
    "A short convolution whose 'state' keeps every input: right outputs, a state that grows."
    def forward(self, x, positional=None, pos=None, cache=None, key_mask=None, doc=None):
        if cache is not None:
            seen = torch.cat([cache.tensors.get("seen", x[:, :0]), x], 1)
            cache.tensors["seen"], cache.n = seen, cache.n + x.shape[1]
            return super().forward(seen)[:, -x.shape[1]:]
        return super().forward(x)


def test_a_cache_path_that_differs_is_caught():
    err = caught(lambda: check_attention(NoCache, checks=["decoding"]), "NoCache", "decoding",
                 "a prefill of 1 tokens, then one at a time", "atol 1e-05 + rtol 0.0001")
    assert err.measured > err.tolerance
    caught(lambda: check_mixer(Growing, checks=["decoding"]), "Growing", "decoding", "bytes the state grew by")
    check_mixer(ShortConv, checks=["decoding"])              # the same convolution with its fixed state passes


def test_a_model_with_a_broken_layer_fails_the_model_check():
    m = build_model(compose(["model=tiny", "data.vocab_size=256"]).model)
    check_model(m, checks=["decoding"])
    a = m.layers[1].attn
    broken = NoCache(64, 4, 2)
    broken.load_state_dict(a.state_dict())
    m.layers[1].attn = broken
    caught(lambda: check_model(m, checks=["decoding"]), "Transformer", "decoding", "a prefill of 5 tokens")
    check_model(m, checks=["causality", "gradients"])        # it is causal, and it learns: only decoding broke


# ---- parameters that do not learn ---------------------------------------------------------------------------

class Unused(Attention):
    def __init__(self, dim, n_heads, n_kv_heads=None, head_dim=None, **kw):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, **kw)
        self.extra_proj = nn.Linear(dim, dim)               # made, never called


class SqrtZero(Norm):
    "RMSNorm plus sqrt(w - 1) x, zero at w = 1: a gradient of inf there."
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) + (self.weight - 1).sqrt() * x


def test_a_parameter_without_a_gradient_is_caught_and_may_be_exempted():
    err = caught(lambda: check_attention(Unused), "Unused", "gradients", "extra_proj.weight, extra_proj.bias")
    assert (err.measured, err.tolerance) == (2, 0)
    check_attention(Unused, no_grad=["extra_proj.weight", "extra_proj.bias"])
    caught(lambda: check_norm(SqrtZero), "SqrtZero", "gradients", "non-finite gradient entries, in weight")


def test_a_zero_initialised_gate_is_named_and_init_std_lifts_it():
    class ZeroOut(Mixer):
        def __init__(self, dim):
            super().__init__()
            self.inner, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)
            nn.init.zeros_(self.out.weight)

        def forward(self, x, positional=None, pos=None, cache=None, key_mask=None, doc=None):
            return self.out(torch.tanh(self.inner(x)).cumsum(1))      # (no cache: only gradients are checked)
    caught(lambda: check_mixer(ZeroOut, checks=["gradients"]), "ZeroOut", "gradients", "inner.weight", "init_std")
    check_mixer(ZeroOut, checks=["gradients"], init_std=0.3)


# ---- off the contract --------------------------------------------------------------------------------------

def test_a_bad_constructor_signature_is_caught():
    class Heads(Attention):
        def __init__(self, dim, heads, kv_heads=None, head_dim=None):
            super().__init__(dim, heads, kv_heads, head_dim)
    caught(lambda: check_attention(Heads), "Heads", "contract",
           "leading arguments ('dim', 'heads', 'kv_heads', 'head_dim'), not ('dim', 'n_heads', 'n_kv_heads', 'head_dim')",
           "tolerance attention: cls(dim, n_heads, n_kv_heads, head_dim, ...)")

    class Groups(Norm):
        def __init__(self, dim, groups, eps=1e-5):
            super().__init__()

        def forward(self, x):
            return x
    caught(lambda: check_norm(Groups), "Groups", "contract", "the argument 'groups' has no default")

    class NoEps(Norm):
        def __init__(self, dim):
            super().__init__()

        def forward(self, x):
            return x
    caught(lambda: check_norm(NoEps), "NoEps", "contract", "no keyword 'eps'")

    class Forward(MLP):
        gated = False

        def __init__(self, dim, hidden):
            super().__init__()

        def forward(self, x, mask):
            return x
    caught(lambda: check_mlp(Forward, checks=["contract"]), "Forward", "contract", "forward's argument 'mask' has no default")

    class NoKeyMask(Attention):                             # a Block calls every layer with key_mask=...
        def forward(self, x, positional, pos, cache=None):
            return super().forward(x, positional, pos, cache)
    caught(lambda: check_attention(NoKeyMask), "NoKeyMask", "contract", "forward has no keyword 'key_mask'")


def test_a_wrong_output_and_a_missing_protocol_are_caught():
    class Wide(SwiGLU):
        def forward(self, x):
            return torch.cat([super().forward(x), x], -1)
    caught(lambda: check_mlp(Wide), "Wide", "contract", "output (2, 7, 32) torch.float32, expected (2, 7, 16)")

    class Bare(nn.Module):
        family = "mixer"

        def __init__(self, dim):
            super().__init__()

        def forward(self, x, positional, pos, cache=None, key_mask=None):
            return x
    caught(lambda: check_component(Bare), "Bare", "contract", "new_cache, check_positional, refusal")

    class Absolute(Positional):
        def bias(self, q_pos, k_pos):
            return (0.1 * q_pos[:, None] + 0 * k_pos[None, :]).float().expand(self.n_heads, -1, -1)
    caught(lambda: check_positional(Absolute), "Absolute.bias", "contract", "moved when every position moved by 7")


def test_results_and_entry_points():
    results = check_component(RMSNorm)
    assert [r.check for r in results] == ["contract", "contract", "position-wise", "gradients"]
    assert results_table(results).count("\n") == len(results) + 1
    assert check_component({"_target_": "smollm.norms.DyT", "_partial_": True}, checks=["gradients"])[0].check == "gradients"
    with pytest.raises(ValueError, match="family=None is not valid"):
        check_component(nn.Linear)
    with pytest.raises(ValueError, match="checks=.* is not valid"):
        check_norm(RMSNorm, checks=["speed"])
    assert set(CHECKS) == {"contract", "causality", "position-wise", "decoding", "gradients"}


# ---- a user's attention, found through Hydra's search path ---------------------------------------------------

USER_MODULE = '''
import torch
from smollm.attention import Attention


class GainAttention(Attention):
    "Attention whose output is scaled by one learned gain."
    def __init__(self, dim, n_heads, n_kv_heads=None, head_dim=None, **kw):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, **kw)
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, positional, pos, cache=None, key_mask=None, **kw):
        return self.gain * super().forward(x, positional, pos, cache, key_mask, **kw)


class Peeking(Attention):
    "A copy that cheats: it adds the next token."
    def forward(self, x, positional, pos, cache=None, key_mask=None, **kw):
        nxt = torch.nn.functional.pad(x[:, 1:], (0, 0, 0, 1))
        return super().forward(x, positional, pos, cache, key_mask, **kw) + nxt
'''


@pytest.fixture
def user_conf(tmp_path, monkeypatch):
    "A user's folder: my_attention.py and conf/model/attention/{gain,peeking}.yaml."
    (tmp_path / "my_attention_mod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    group = tmp_path / "conf" / "model" / "attention"
    group.mkdir(parents=True)
    for name, cls in (("gain", "GainAttention"), ("peeking", "Peeking")):
        (group / f"{name}.yaml").write_text(f"defaults:\n  - gqa\n  - _self_\n_target_: my_attention_mod.{cls}\n")
    return [f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]


def test_a_users_config_is_checked_through_the_search_path(user_conf):
    results = check_config([*user_conf, "model/attention=gain"])
    assert "model.attention (GainAttention)" in {r.component for r in results}
    caught(lambda: check_config([*user_conf, "model/attention=peeking"]), "model (tiny)", "causality")
