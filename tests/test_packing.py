"""Packed rows (Transformer's `doc` argument): several documents in one row of the batch, without cross-talk.

Every positional encoding of conf/model/positional x every attention option of conf/model/attention (plus a few
combinations), on every backend that declares the doc_mask capability: a packed batch gives each document the
logits it gets alone, and the packed loss's gradients are the token-weighted sum of the documents' own. The
references are the model itself, run on each document alone (no doc argument, the code path of unpacked rows).
"""
import functools

import pytest
import torch

import smollm.attention
import smollm.model
from smollm.attention import BACKENDS, supporting
from smollm.config import build_model, compose, options
from smollm.errors import ArgumentError
from smollm.positional import RoPE, doc_positions

TINY = ("model=tiny", "data.vocab_size=97")
V = 97

ATTN = {name: (f"model/attention={name}",) for name in options("model/attention")}
ATTN["sliding_window"] += ("model.attention.window=3",)          # a window that bites inside a document
ATTN.update({
    "all_options": ("model/attention=gqa", "model.attention.qkv_bias=true", "model.attention.qk_norm=true",
                    "model.attention.output_gate=true", "model.attention.sinks=true", "++model.attention.window=4"),
    "pattern_SN": ("model/attention=sinks", "++model.attention.window=3", "model.layer_pattern=SN"),
    "value_residual": ("model/attention=gqa", "model.value_residual=true"),
    "mla_q_lora_window": ("model/attention=mla", "model.attention.q_lora_rank=24", "model.attention.kv_lora_rank=16",
                          "model.attention.window=4"),
})
POS = options("model/positional")

# row 0: three documents of 5, 4 and 7 tokens; row 1: two of 9 and 7
LENGTHS = [[5, 4, 7], [9, 7]]
T = 16


def packed_doc(lengths=LENGTHS) -> torch.Tensor:
    "doc (B, T) for rows of documents of the given lengths: [[0]*5 + [1]*4 + [2]*7, ...]."
    return torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])


def spans(lengths=LENGTHS):
    "(row, start, end) of every document."
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            yield b, start, start + n
            start += n


def ids(B=2, n=T, seed=1):
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(None)
def _compose(overrides: tuple):
    return compose(TINY + overrides)


def model(attn="gqa", pos="rope", backend=None, **attention):
    "A tiny eval-mode model of attention option `attn` and positional option `pos` (seed 0), on `backend` if set."
    cfg = _compose(ATTN[attn]).copy()
    cfg.model.positional = _compose((f"model/positional={pos}",)).model.positional
    if backend is not None:
        cfg.model.attention.backend = backend
    for key, value in attention.items():
        cfg.model.attention[key] = value
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


def packing_backends(m) -> list[str]:
    "The backends that apply a document mask and everything else the model's first layer uses."
    need = m.layers[0].attn.needs(m.positional) | {"doc_mask"}
    return [name for name, b in BACKENDS.items() if need <= b.supports]


# ---- a packed row is its documents alone -----------------------------------------------------------------------

@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attn", ATTN)
def test_packed_logits_equal_each_document_alone(attn, pos):
    ref = model(attn, pos, backend="eager")
    backends = packing_backends(ref)
    assert backends, f"no backend packs {attn} with {pos}"
    x, doc = ids(), packed_doc()
    for backend in backends:
        m = model(attn, pos, backend=backend)
        m.load_state_dict(ref.state_dict())
        with torch.no_grad():
            packed = m(x, doc=doc)
            for b, s, e in spans():
                torch.testing.assert_close(packed[b:b + 1, s:e], m(x[b:b + 1, s:e]), atol=1e-5, rtol=1e-4,
                                           msg=lambda msg: f"{backend}, row {b}, tokens {s}:{e}: {msg}")
            # the checks can fail: without the mask (one document per row) the later documents differ
            unmasked = m(x, doc=torch.zeros_like(doc))
            assert (unmasked[0, 5:9] - packed[0, 5:9]).abs().max() > 1e-4, backend
            assert (unmasked[1, 9:] - packed[1, 9:]).abs().max() > 1e-4, backend


@pytest.mark.parametrize("attn", ["gqa", "mla", "sinks"])
def test_packed_logits_with_uneven_batch_rows(attn):
    "Rows of one token per document, one document per row, and a lone document at the end."
    m = model(attn)
    lengths = [[1] * 6, [6], [5, 1]]
    x, doc = ids(3, 6), packed_doc(lengths)
    with torch.no_grad():
        packed = m(x, doc=doc)
        for b, s, e in spans(lengths):
            torch.testing.assert_close(packed[b:b + 1, s:e], m(x[b:b + 1, s:e]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn,pos", [("gqa", "rope"), ("sinks", "alibi"), ("sliding_window", "t5")])
def test_doc_with_a_key_mask(attn, pos):
    "A key hidden by key_mask stays hidden in a packed row: the first document without its first token's key."
    x, doc = ids(), packed_doc()
    key_mask = torch.ones(2, T, dtype=torch.bool)
    key_mask[0, 0] = False
    for backend in packing_backends(model(attn, pos, backend="eager")):
        m = model(attn, pos, backend=backend)
        with torch.no_grad():
            packed = m(x, key_mask=key_mask, doc=doc)
            alone = m(x[:1, :5], key_mask=key_mask[:1, :5])
            torch.testing.assert_close(packed[:1, 1:5], alone[:, 1:], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(packed[:, 5:], m(x, doc=doc)[:, 5:], atol=1e-6, rtol=1e-5)
            assert (packed[:1, 1:5] - m(x, doc=doc)[:1, 1:5]).abs().max() > 1e-4


def targets(x, doc, ignore_index=-100):
    "Next-token targets of x within each document: ignore_index at each document's last token."
    y = x.roll(-1, 1)
    last = torch.ones_like(doc, dtype=torch.bool)
    last[:, :-1] = doc[:, 1:] != doc[:, :-1]
    return y.masked_fill(last, ignore_index)


@pytest.mark.parametrize("attn,pos", [("gqa", "rope"), ("mha", "alibi"), ("mla", "rope"), ("sliding_window", "t5"),
                                      ("sinks", "learned"), ("mqa", "sinusoidal"), ("qk_norm", "nope")])
def test_packed_loss_gradients_are_the_documents_weighted_sum(attn, pos):
    x, doc = ids(), packed_doc()
    y = targets(x, doc)
    m = model(attn, pos).train()
    params = [p for p in m.parameters()]
    packed = torch.autograd.grad(m.loss(x, y, doc=doc), params, allow_unused=True)
    n_total = sum(e - s - 1 for _, s, e in spans())                  # each document's last token has no target
    want = [torch.zeros_like(p) for p in params]
    loss = 0.0
    for b, s, e in spans():
        xd, yd = x[b:b + 1, s:e - 1], x[b:b + 1, s + 1:e]          # the document alone, shifted by hand
        ld = m.loss(xd, yd)
        w = (e - s - 1) / n_total
        loss += w * ld.item()
        for acc, g in zip(want, torch.autograd.grad(ld, params, allow_unused=True)):
            if g is not None:
                acc += w * g
    assert m.loss(x, y, doc=doc).item() == pytest.approx(loss, rel=1e-5)
    for (name, p), got, ref in zip(m.named_parameters(), packed, want):
        got = torch.zeros_like(p) if got is None else got
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4, msg=lambda msg: f"{name}: {msg}")
    # and an unmasked row (one document per row) trains on other gradients
    unmasked = torch.autograd.grad(m.loss(x, y, doc=torch.zeros_like(doc)), params, allow_unused=True)
    assert max((a - b).abs().max().item() for a, b in zip(unmasked, packed) if a is not None) > 1e-5


def test_positions_restart_at_each_document(monkeypatch):
    # RoPE is relative, so the logits alone cannot tell row positions from document positions: ask the hook
    m = model("gqa", "rope")
    seen = []
    rotate = m.positional.rotate
    monkeypatch.setattr(m.positional, "rotate", lambda q, k, pos: seen.append(pos) or rotate(q, k, pos))
    with torch.no_grad():
        m(ids(), doc=packed_doc())
    want = torch.tensor([list(range(5)) + list(range(4)) + list(range(7)), list(range(9)) + list(range(7))])
    assert len(seen) == len(m.layers) and all(torch.equal(p, want) for p in seen)


# ---- doc=None is the unpacked model ------------------------------------------------------------------------------

@pytest.mark.parametrize("attn,pos", [("gqa", "rope"), ("sinks", "alibi"), ("mla", "t5"), ("sliding_window", "learned")])
def test_one_document_per_row_is_the_plain_forward(attn, pos):
    m = model(attn, pos)
    x = ids()
    y = x.roll(-1, 1)
    zeros = torch.zeros_like(x)
    with torch.no_grad():
        torch.testing.assert_close(m(x, doc=zeros), m(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m.loss(x, y, doc=zeros), m.loss(x, y), atol=1e-6, rtol=1e-5)


def test_doc_none_does_no_mask_work(monkeypatch):
    m = model("sinks", "alibi")
    x = ids()
    with torch.no_grad():
        want = m(x)

    def boom(*args, **kwargs):
        raise AssertionError("doc=None must not build a document mask or per-document positions")
    monkeypatch.setattr(smollm.attention, "document_mask", boom)
    monkeypatch.setattr(smollm.model, "doc_positions", boom)
    with torch.no_grad():
        assert torch.equal(m(x), want)
        with pytest.raises(AssertionError, match="doc=None must not"):   # and the patch does reach the packed path
            m(x, doc=torch.zeros_like(x))


# ---- refusals -----------------------------------------------------------------------------------------------------

def test_fused_backend_refuses_doc_naming_the_backends_that_can():
    m = model("gqa", "rope", backend="fused")
    x, doc = ids(), packed_doc()
    can = ", ".join(supporting("doc_mask"))
    assert can and "fused" not in can
    with pytest.raises(ArgumentError, match=rf"backend='fused' cannot apply a document mask .*; backends that can: {can}$"):
        m(x, doc=doc)
    assert m.packing_refusal() == (f"layer 0's attention: backend='fused' cannot apply a document mask for packed rows "
                                   f"(doc); backends that can: {can}")
    with torch.no_grad():
        m(x)                                                       # unpacked, fused runs as before


def test_packing_refusal_names_the_layer():
    m = build_model(compose(TINY + ("model.n_layers=3",)).model)
    assert m.packing_refusal() is None
    m.layers[2].attn.backend = "fused"
    assert m.packing_refusal().startswith("layer 2's attention: backend='fused' cannot apply a document mask")
    m.layers[1].attn.backend = "fused"
    assert m.packing_refusal().startswith("layer 1's attention:")   # the first layer that cannot


def test_doc_with_a_cache_is_refused():
    m = model()
    x, doc = ids(), packed_doc()
    with pytest.raises(ArgumentError, match="None when decoding with a cache"):
        m(x, m.new_cache(), doc=doc)
    with pytest.raises(ArgumentError, match="None when decoding with a cache"):
        m.layers[0].attn(torch.randn(2, T, 64), m.positional, doc_positions(doc), m.layers[0].attn.new_cache(), doc=doc)


def test_doc_is_checked():
    m = model()
    x = ids()
    with pytest.raises(ArgumentError, match=r"document indices of input_ids' shape \(2, 16\)"):
        m(x, doc=packed_doc()[:, :8])
    with pytest.raises(ArgumentError, match="never decrease"):
        m(x, doc=packed_doc().flip(1))
    with pytest.raises(ArgumentError, match=r"an integer tensor \(B, T\)"):
        m(x, doc=packed_doc().float())


# ---- the fused RoPE op at per-row positions -------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_per_row_positions_through_the_triton_op(fraction):
    pytest.importorskip("triton")
    doc = packed_doc()
    rows = doc_positions(doc)
    q, k = torch.randn(2, 4, T, 16), torch.randn(2, 2, T, 16)
    r = RoPE(64, 4, 16, 64, fraction=fraction)
    r.impl = "torch"
    want = r.rotate(q, k, rows)
    for b in range(2):                                             # row by row at (T,) positions: the same
        one = r.rotate(q[b:b + 1], k[b:b + 1], rows[b])
        torch.testing.assert_close(want[0][b:b + 1], one[0]); torch.testing.assert_close(want[1][b:b + 1], one[1])
    r.impl, r._memo = "triton", None
    got = r.rotate(q, k, rows)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
