"""Sampling policy of `smollm.generate.sample_next` against plain math: which tokens top-k and top-p keep, and
how often each is drawn (temperature, renormalisation), with a chi-square bound on seeded draws.

Each check is a function of the sampler, so that the tests below also run it on copies of `sample_next` with
one planted bug each and require it to fail: a check that passes a wrong sampler checks nothing.
"""
import math

import pytest
import torch

import smollm.generate as gen

N = 20_000  # draws per check: one row per draw, all in one call
# chi-square quantiles at 1 - 1e-4 by degrees of freedom: a correct sampler fails one seed in 10^4
CHI2_BOUND = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88}


def draws(sample, logits, seed=0, **kw):
    "N draws of `sample` on the logits (V,), repeated as N rows: the token ids (N,)."
    g = torch.Generator().manual_seed(seed)
    return sample(logits.expand(N, -1).clone(), generator=g, **kw)


def assert_frequencies(tokens, probs):
    "The draws `tokens` (N,) follow `probs` (V,): only tokens of nonzero probability, each as often as expected."
    support = set(torch.nonzero(probs > 0).flatten().tolist())
    seen = set(tokens.unique().tolist())
    assert seen == support, f"tokens drawn {sorted(seen)}, expected exactly {sorted(support)}"
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    idx = sorted(support)
    expected = N * probs.double()[idx]
    chi2 = ((counts[idx] - expected) ** 2 / expected).sum().item()
    if len(idx) > 1:
        assert chi2 < CHI2_BOUND[len(idx) - 1], f"chi-square {chi2:.1f} on {len(idx) - 1} dof: counts {counts[idx].tolist()}, expected {expected.tolist()}"


def check_top_p(sample):
    # [0.5, 0.3, 0.2] at top_p=0.6: the smallest set whose mass reaches 0.6 is {0, 1} (0.8); renormalised 5/8, 3/8
    p = torch.tensor([0.5, 0.3, 0.2])
    assert_frequencies(draws(sample, p.log(), temperature=1.0, top_p=0.6), torch.tensor([5 / 8, 3 / 8, 0]))
    # the same probabilities in another order: the kept set follows the probabilities, not the positions
    q = torch.tensor([0.2, 0.5, 0.3])
    assert_frequencies(draws(sample, q.log(), temperature=1.0, top_p=0.6), torch.tensor([0, 5 / 8, 3 / 8]))
    # 0.85 needs all three (0.5 + 0.3 < 0.85); 0.4 only the first (0.5 >= 0.4)
    assert_frequencies(draws(sample, p.log(), temperature=1.0, top_p=0.85), p)
    assert_frequencies(draws(sample, p.log(), temperature=1.0, top_p=0.4), torch.tensor([1.0, 0, 0]))


def check_top_k(sample):
    logits = torch.tensor([0.3, 2.0, -1.0, 1.2, 0.9, -0.4])
    keep = torch.tensor([False, True, False, True, True, False])   # the 3 largest logits
    p = torch.where(keep, logits.exp(), 0.0)
    assert_frequencies(draws(sample, logits, temperature=1.0, top_k=3), p / p.sum())
    assert_frequencies(draws(sample, logits, temperature=1.0, top_k=6), logits.softmax(-1))


def check_temperature(sample):
    logits = torch.tensor([0.3, 2.0, -1.0, 1.2, 0.9])
    for t in (0.5, 1.0, 2.0):
        p = torch.tensor([math.exp(z / t) for z in logits.tolist()])   # softmax(z / t), written out
        assert_frequencies(draws(sample, logits, temperature=t), p / p.sum())
    assert torch.equal(draws(sample, logits, temperature=0.0), torch.full((N,), 1))   # 0: the argmax


CHECKS = [check_top_p, check_top_k, check_temperature]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_sample_next(check):
    check(gen.sample_next)


# ------------------------------------------------------------------------------ mutants: the checks can fail

def mutant(temperature_op="div", kth_cmp="lt", drop_rule="before", unsort=True):
    "A copy of sample_next's policy with one planted bug chosen by the arguments (the defaults are correct)."
    def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature if temperature_op == "div" else logits.float() * temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth if kth_cmp == "lt" else logits <= kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            before = probs.cumsum(-1) - probs if drop_rule == "before" else probs.cumsum(-1)
            drop = before >= top_p
            drop[:, 0] = False
            logits = logits.masked_fill(drop.scatter(-1, order, drop) if unsort else drop, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
    return sample


def test_the_mutant_copy_is_faithful():
    "With no bug planted, the copy passes every check (so a failure below is the planted bug's)."
    for check in CHECKS:
        check(mutant())


@pytest.mark.parametrize("check,bug", [
    (check_top_p, dict(drop_rule="including")),    # drops the token whose mass reaches p: {0} instead of {0, 1}
    (check_top_p, dict(unsort=False)),              # the kept set by sorted position, not mapped back to tokens
    (check_top_k, dict(kth_cmp="le")),              # drops the k-th token too
    (check_temperature, dict(temperature_op="mul")),  # multiplies by the temperature instead of dividing
], ids=["top_p_including", "top_p_unsorted", "top_k_off_by_one", "temperature_mul"])
def test_checks_catch_planted_bugs(check, bug):
    with pytest.raises(AssertionError):
        check(mutant(**bug))
