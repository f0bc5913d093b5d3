"""The token-mixer contract, for every mixer in MIXERS: causality, state decoding equal to the full forward, a
gradient for every parameter, left padding, packed documents; and each mixer's forms agreeing."""
import pytest
import torch

from smollm.config import ConfigError, build_model, compose, options
from smollm.generate import generate
from smollm.mixers import Mixer, ShortConv, short_conv, short_conv_ref, short_conv_step
from smollm.testing import check_mixer, check_model

DIM = 16
TINY = ["model=tiny", "data.vocab_size=128", "model.n_layers=4"]


def configured(option):
    "A mixer as the option's yaml (conf/model/mixer) makes it, at width DIM."
    from hydra.utils import instantiate
    cfg = compose([*TINY, f"model/mixer@model.mixers.C={option}"]).model.mixers.C
    return lambda: instantiate(cfg)(dim=DIM)


MIXERS = {o: configured(o) for o in options("model/mixer")}          # a new yaml joins the matrix by itself
MIXERS["short_conv_k4_bias"] = lambda: ShortConv(DIM, kernel_size=4, bias=True)


@pytest.fixture(params=list(MIXERS))
def mixer(request):
    torch.manual_seed(0)
    m = MIXERS[request.param]().double()
    for p in m.parameters():          # biases start at zero: make them count
        torch.nn.init.normal_(p, 0, 0.3)
    return m


def x_of(B=2, T=10, seed=1):
    return torch.randn(B, T, DIM, dtype=torch.double, generator=torch.Generator().manual_seed(seed))


def test_is_a_mixer(mixer):
    assert isinstance(mixer, Mixer) and mixer.family == "mixer"
    assert mixer.refusal("doc_mask") is None and mixer.refusal("key_mask") is None
    assert "cannot apply" in mixer.refusal("window")


# the kit's checks (smollm.testing) at float64 with torch.testing's float64 tolerances: rtol = atol = 1e-7
KIT = dict(dim=DIM, T=10, dtype=torch.double, atol=1e-7, rtol=1e-7, causal_atol=1e-7, reach=1e-3)


def test_causal(mixer):
    check_mixer(mixer, checks=["causality"], **KIT)


@pytest.mark.parametrize("prefill", [1, 4])
def test_state_decoding_equals_full_forward(mixer, prefill):
    check_mixer(mixer, checks=["decoding"], prefill=(prefill,), **KIT)    # and the state keeps its size


def test_every_parameter_gets_a_gradient(mixer):
    check_mixer(mixer, checks=["gradients"], **KIT)


def test_keeps_the_contract(mixer):
    check_mixer(mixer, checks=["contract"], **KIT)


def test_left_padding(mixer):
    x, pad = x_of(B=1, T=6), 3
    ref = mixer(x, None, None)
    padded = torch.cat([x_of(B=1, T=pad, seed=7) * 5, x], 1)           # junk in the padding
    mask = torch.tensor([[False] * pad + [True] * 6])
    torch.testing.assert_close(mixer(padded, None, None, key_mask=mask)[:, pad:], ref)
    state = mixer.new_cache()                                          # and decoding after a padded prefill
    y = [mixer(padded[:, :pad + 2], None, None, state, key_mask=mask[:, :pad + 2])[:, pad:]]
    for t in range(pad + 2, pad + 6):
        y.append(mixer(padded[:, t:t + 1], None, None, state, key_mask=mask[:, :t + 1]))
    torch.testing.assert_close(torch.cat(y, 1), ref)


def test_documents_reset_the_state(mixer):
    a, b = x_of(B=1, T=4, seed=2), x_of(B=1, T=5, seed=3)
    doc = torch.tensor([[0] * 4 + [1] * 5])
    y = mixer(torch.cat([a, b], 1), None, None, doc=doc)
    torch.testing.assert_close(y, torch.cat([mixer(a, None, None), mixer(b, None, None)], 1))
    with pytest.raises(ValueError, match="doc"):
        mixer(a, None, None, mixer.new_cache(), doc=doc[:, :4])


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("packed", [False, True])
def test_short_conv_forms_agree_forward_and_backward(k, packed):
    g = torch.Generator().manual_seed(k)
    u = torch.randn(2, 9, 5, dtype=torch.double, generator=g, requires_grad=True)
    w = torch.randn(5, 1, k, dtype=torch.double, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.double, generator=g, requires_grad=True)
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 9]) if packed else None
    dy = torch.randn(2, 9, 5, dtype=torch.double, generator=g)

    def grads(f):
        y = f()
        return [y, *torch.autograd.grad(y, (u, w, b), dy)]
    ref = grads(lambda: short_conv_ref(u, w, b, doc))
    forms = {"training": lambda: short_conv(u, w, b, doc)}
    if not packed:   # the recurrent form, one token at a time (a cache holds one document)
        def recurrent():
            last, ys = u.new_zeros(2, k - 1, 5), []
            for t in range(9):
                y, last = short_conv_step(u[:, t:t + 1], last, w, b)
                ys.append(y)
            return torch.cat(ys, 1)
        forms["recurrent"] = recurrent
    for name, f in forms.items():
        for got, want, what in zip(grads(f), ref, ("y", "du", "dw", "db")):
            torch.testing.assert_close(got, want, msg=f"{name} form, {what}")


def test_short_conv_matches_transformers_lfm2():
    lfm2 = pytest.importorskip("transformers.models.lfm2.modeling_lfm2")
    from transformers import Lfm2Config
    cfg = Lfm2Config(hidden_size=DIM, conv_L_cache=3, conv_bias=True, num_hidden_layers=1, layer_types=["conv"],
                     vocab_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    theirs = lfm2.Lfm2ShortConv(cfg, 0).double()
    ours = ShortConv(DIM, kernel_size=3, bias=True).double()
    with torch.no_grad():
        ours.in_proj.load_state_dict(theirs.in_proj.state_dict())
        ours.out_proj.load_state_dict(theirs.out_proj.state_dict())
        ours.conv_weight.copy_(theirs.conv.weight)
        ours.conv_bias.copy_(theirs.conv.bias)
    x = x_of()
    torch.testing.assert_close(ours(x, None, None), theirs.slow_forward(x) if hasattr(theirs, "slow_forward")
                               else theirs(x))


# ---- in a model: every option of model/mixer, bound to a letter of the layer pattern ----


def hybrid(option, pattern="CCCG", *more):
    torch.manual_seed(0)
    return build_model(compose([*TINY, f"model/mixer@model.mixers.C={option}", f"model.layer_pattern={pattern}",
                                *more]).model)


@pytest.mark.parametrize("option", options("model/mixer"))
def test_every_mixer_option_builds_trains_and_is_a_mixer(option):
    model = hybrid(option)
    assert [isinstance(b.attn, Mixer) for b in model.layers] == [True, True, True, False]
    assert model.layers[0].attn.family == "mixer"     # its parameters count as the mixer family's
    check_model(model, x=torch.randint(0, 128, (2, 13)), checks=["gradients"], name=option)
    assert model.packing_refusal() is None
    assert model.param_counts()["mixer"] > 0


@pytest.mark.parametrize("option", options("model/mixer"))
@pytest.mark.parametrize("pattern", ["CCCG", "C"])
def test_generate_decodes_with_the_state(option, pattern):
    model = hybrid(option, pattern, "model.init_std=0.5").eval()    # large weights: every layer moves the argmax
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with_state = generate(model, ids, 6, attention_mask=mask)
    recomputed = generate(model, ids, 6, attention_mask=mask, use_cache=False)
    assert torch.equal(with_state, recomputed)
    alone = generate(model, ids[:1, 2:], 6)                         # the padded row decodes as if unpadded
    assert torch.equal(with_state[:1, 2:], alone)


def test_mixer_letters_are_checked():
    with pytest.raises(ConfigError, match=r"layer_pattern='CX'.*C \(the mixer ShortConv of model.mixers.C\)"):
        compose([*TINY, "model.layer_pattern=CX"])
    with pytest.raises(ConfigError, match="model.mixers.G"):
        compose([*TINY, "+model/mixer@model.mixers.G=short_conv"])
    with pytest.raises(ConfigError, match="model.mixers.C.kernel_size=1 is not valid"):
        compose([*TINY, "model.layer_pattern=CG", "model.mixers.C.kernel_size=1"])
    m = build_model(compose([*TINY, "+model/mixer@model.mixers.X=short_conv", "model.mixers.X.kernel_size=4",
                             "model.layer_pattern=CXGG"]).model)
    assert [getattr(b.attn, "kernel_size", None) for b in m.layers] == [3, 4, None, None]


@pytest.mark.parametrize("option", options("model/mixer"))
def test_model_decoding_with_state_equals_full_forward(option):
    model = hybrid(option, "CCCG", "model.init_std=0.5").double().eval()
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
    full = model(ids, key_mask=mask)
    cache = model.new_cache()
    steps = [model(ids[:, :4], cache, key_mask=mask[:, :4])]
    steps += [model(ids[:, t:t + 1], cache, key_mask=mask[:, :t + 1]) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1)[1], full[1])
    torch.testing.assert_close(torch.cat(steps, 1)[0, 3:], full[0, 3:])


@pytest.mark.parametrize("option", options("model/mixer"))
def test_static_state_decoding_equals_full_forward(option):
    # what a compiled decoding step reads: new_cache(capacity) gives static states (0-dim tensor length, in place)
    model = hybrid(option, "CCCG", "model.init_std=0.5").double().eval()
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.cat([torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9]), torch.ones(2, 7, dtype=torch.long)], 1)
    full = model(ids, key_mask=mask[:, :9])
    cache = model.new_cache(capacity=16)
    steps = [model(ids[:, :2], cache, key_mask=mask), model(ids[:, 2:4], cache, key_mask=mask)]   # padding in both
    tensors = {n: t.data_ptr() for n, t in cache[0].tensors.items()}
    steps += [model(ids[:, t:t + 1], cache, key_mask=mask) for t in range(4, 9)]
    assert torch.is_tensor(cache[0].length) and int(cache[0].length) == 9
    assert {n: t.data_ptr() for n, t in cache[0].tensors.items()} == tensors, "a static state is written in place"
    torch.testing.assert_close(torch.cat(steps, 1)[1], full[1])
    torch.testing.assert_close(torch.cat(steps, 1)[0, 3:], full[0, 3:])


@pytest.mark.slow
@pytest.mark.parametrize("option", options("model/mixer"))
def test_generate_compiled_with_the_state(option):
    model = hybrid(option, "CCCG", "model.init_std=0.5").eval()
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(generate(model, ids, 8, attention_mask=mask, compile=True),
                       generate(model, ids, 8, attention_mask=mask))
