"""Merge methods on small hand-made tensors; expected values computed by hand in the tests."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import MergeError
from evomerge.merge.methods import METHODS, UnknownMethodError, get_method
from evomerge.merge.methods.consensus import sign_consensus_mask
from evomerge.merge.methods.dare_linear import dare_linear
from evomerge.merge.methods.dare_ties import dare_ties
from evomerge.merge.methods.linear import linear
from evomerge.merge.methods.sparsify import bernoulli, keep_count, magnitude, magnitude_mask
from evomerge.merge.methods.task_arithmetic import task_arithmetic
from evomerge.merge.methods.ties import ties
from evomerge.architecture import BY_NAME
from evomerge.merge.parameter_space import merge_tensor

LLAMA = BY_NAME["llama"]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- linear -----------------------------------------------------------------
def test_linear_hand_values() -> None:
    a, b = t(1, 2, -3), t(3, -2, 1)
    # (1*1 + 3*3)/4, (1*2 + 3*-2)/4, (1*-3 + 3*1)/4
    assert torch.equal(linear([a, b], [1.0, 3.0]), t(2.5, -1.0, 0.0))
    assert torch.equal(linear([a, b], [1.0, 3.0], normalize=False), t(10, -4, 0))
    assert torch.equal(linear(torch.stack([a, b]), [1.0, 3.0]), t(2.5, -1.0, 0.0))


def test_linear_one_model_is_that_model() -> None:
    x = torch.randn(5, 7)
    assert torch.allclose(linear([x], [0.37]), x, rtol=1e-6, atol=0)


def test_linear_zero_weight_sum_is_not_guarded() -> None:
    # mergekit divides by the raw weight sum: 0 -> inf / NaN.
    out = linear([t(1, 0), t(2, 0)], [1.0, -1.0])
    assert math.isinf(out[0].item()) and math.isnan(out[1].item())


def test_linear_keeps_dtype() -> None:
    x = torch.randn(8, dtype=torch.bfloat16)
    assert linear([x, x], [0.5, 0.5]).dtype == torch.bfloat16


# -- task arithmetic ------------------------------------------------------------
def test_task_arithmetic_hand_values() -> None:
    base = t(1, 1, 1)
    d1, d2 = t(1, -2, 0.5), t(-1, 4, 0.5)
    # base + 0.5*d1 + 0.25*d2
    assert torch.equal(task_arithmetic(base, [d1, d2], [0.5, 0.25]), t(1.25, 1.0, 1.375))
    # normalize: mixed / 0.75 = [0.25, 0, 0.375] / 0.75
    expected = t(1 + 0.25 / 0.75, 1.0, 1 + 0.375 / 0.75)
    assert torch.allclose(task_arithmetic(base, [d1, d2], [0.5, 0.25], normalize=True), expected)
    # lambda scales the mixed delta
    assert torch.equal(task_arithmetic(base, [d1, d2], [0.5, 0.25], lambda_=2.0), t(1.5, 1.0, 1.75))


def test_task_arithmetic_normalize_with_zero_weight_sum_returns_unnormalized() -> None:
    base, d1, d2 = t(1, 1), t(1, 2), t(3, 5)
    assert torch.equal(task_arithmetic(base, [d1, d2], [0.0, 0.0], normalize=True), base)
    # |sum| < 1e-8 -> divisor 1: base + d1 - d2
    assert torch.equal(task_arithmetic(base, [d1, d2], [1.0, -1.0], normalize=True), t(-1, -2))


def test_task_arithmetic_no_deltas_is_base() -> None:
    base = t(1, 2)
    assert torch.equal(task_arithmetic(base, [], []), base)


# -- consensus ------------------------------------------------------------------
def test_sign_election_sum_and_count() -> None:
    wd = torch.stack([t(-5, 1, 0, 2), t(1, -1, 0, -1), t(1, -1, 0, -3)])
    # sum: [-3, -1, 0, -2] -> signs [-, -, + (tie), -]
    expected_sum = torch.tensor([[True, False, False, False], [False, True, False, True], [False, True, False, True]])
    assert torch.equal(sign_consensus_mask(wd, "sum"), expected_sum)
    # count: votes [+1, -1, 0, -1] -> signs [+, -, +, -]
    expected_count = torch.tensor([[False, False, False, False], [True, True, False, True], [True, True, False, True]])
    assert torch.equal(sign_consensus_mask(wd, "count"), expected_count)
    assert torch.equal(sign_consensus_mask(wd, "sum", int8_mask=True), expected_sum)


# -- TIES -------------------------------------------------------------------------
def test_ties_hand_values_no_trim() -> None:
    base = torch.zeros(4)
    d1, d2 = t(3, -1, 0.5, -2), t(-1, 2, 0.25, -4)
    # sums [2, 1, 0.75, -6] -> signs +, +, +, -
    # agreeing: entry0 d1 only, entry1 d2 only, entry2 both, entry3 both
    # mixed [3, 2, 0.75, -6]; divisor [1, 1, 2, 2]
    out = ties(base, [d1, d2], [1.0, 1.0], [1.0, 1.0])
    assert torch.equal(out, t(3, 2, 0.375, -3))
    out = ties(base, [d1, d2], [1.0, 1.0], [1.0, 1.0], normalize=False)
    assert torch.equal(out, t(3, 2, 0.75, -6))


def test_ties_hand_values_with_trim_and_weights() -> None:
    base = t(10, 10, 10, 10)
    d1, d2 = t(3, -1, 0.5, -2), t(-1, 2, 0.25, -4)
    # density 0.5 of 4 -> keep 2: d1 -> [3, 0, 0, -2], d2 -> [0, 2, 0, -4]
    # weights [2, 1]: wd1 [6, 0, 0, -4], wd2 [0, 2, 0, -4]; sums [6, 2, 0, -8] -> +, +, +, -
    # mixed [6, 2, 0, -8]; divisor [2, 1, 0 -> 1, 3]
    out = ties(base, [d1, d2], [2.0, 1.0], [0.5, 0.5])
    assert torch.allclose(out, t(13, 12, 10, 10 - 8 / 3))


def test_ties_one_model_density_one_no_normalize() -> None:
    base, delta = torch.randn(6, 5), torch.randn(6, 5)
    out = ties(base, [delta], [0.7], [1.0], normalize=False)
    assert torch.allclose(out, base + 0.7 * delta)
    # normalize divides by the agreeing weight: the weight cancels
    assert torch.allclose(ties(base, [delta], [0.7], [1.0]), base + delta)


def test_ties_all_zero_weights_normalized_is_base() -> None:
    base = torch.randn(10)
    out = ties(base, [torch.randn(10), torch.randn(10)], [0.0, 0.0], [0.5, 0.5])
    assert torch.equal(out, base)


def test_ties_rescale_keeps_l1_norm() -> None:
    base, delta = torch.zeros(1000), torch.randn(1000)
    out = ties(base, [delta], [1.0], [0.3], normalize=False, rescale=True)
    assert (out != 0).sum().item() == 300
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)


# -- magnitude -------------------------------------------------------------------
def test_keep_count_follows_mergekit_truncation() -> None:
    assert keep_count(0.29, 100) == 28  # 0.29 * 100 == 28.999999999999996
    assert keep_count(0.5, 4) == 2
    assert keep_count(0.001, 10) == 1  # a positive density keeps at least one
    assert keep_count(0.0, 10) == 0
    assert keep_count(1.5, 10) == 10


def test_magnitude_keeps_largest() -> None:
    x = torch.randn(37, 11)
    k = keep_count(0.3, x.numel())
    keep = magnitude_mask(x, k)
    assert keep.sum().item() == k
    threshold = sorted(x.abs().flatten().tolist(), reverse=True)[k - 1]
    assert torch.equal(keep, x.abs() >= threshold)
    assert torch.equal(magnitude(x, 0.3), torch.where(keep, x, torch.zeros_like(x)))


def test_magnitude_ties_at_threshold_keep_lowest_indices() -> None:
    x = t(1, -2, 1, 1, -1, 0.5)
    # keep 3 of 6: |-2| plus the first two (indices 0, 2) of the four magnitude-1 entries
    assert torch.equal(magnitude(x, 0.5), t(1, -2, 1, 0, 0, 0))


def test_magnitude_edge_densities() -> None:
    x = torch.randn(10)
    assert magnitude(x, 1.0) is x
    assert torch.equal(magnitude(x, 0.0), torch.zeros(10))
    assert (magnitude(x, 0.01) != 0).sum().item() == 1


# -- DARE -------------------------------------------------------------------------
def test_bernoulli_keep_rate_and_rescale() -> None:
    x = torch.ones(200_000)
    kept = bernoulli(x, 0.3, generator=gen(0))
    assert kept.mean().item() == pytest.approx(0.3, abs=0.005)
    rescaled = bernoulli(x, 0.3, rescale=True, generator=gen(0))
    nonzero = rescaled[rescaled != 0]
    # mergekit's rescale restores the L1 norm exactly: ~1/density per kept entry
    assert rescaled.sum().item() == pytest.approx(200_000, rel=1e-5)
    assert nonzero[0].item() == pytest.approx(1 / 0.3, rel=0.02)
    assert torch.equal(rescaled != 0, kept != 0)


def test_bernoulli_density_one_draws_nothing() -> None:
    g = gen(3)
    state = g.get_state()
    x = torch.randn(50)
    assert bernoulli(x, 1.0, generator=g) is x
    assert torch.equal(g.get_state(), state)


def test_dare_is_reproducible_with_a_seeded_generator() -> None:
    base, deltas = torch.randn(64, 16), [torch.randn(64, 16) for _ in range(3)]
    args = (base, deltas, [0.5, 0.3, 0.2], [0.4, 0.6, 0.8])
    assert torch.equal(dare_ties(*args, generator=gen(7)), dare_ties(*args, generator=gen(7)))
    assert not torch.equal(dare_ties(*args, generator=gen(7)), dare_ties(*args, generator=gen(8)))
    assert torch.equal(dare_linear(*args, generator=gen(7)), dare_linear(*args, generator=gen(7)))


def test_dare_linear_hand_combination() -> None:
    base, d1, d2 = torch.randn(100), torch.randn(100), torch.randn(100)
    g = gen(11)
    m1 = torch.bernoulli(torch.full((100,), 0.5), generator=g)
    m2 = torch.bernoulli(torch.full((100,), 0.25), generator=g)
    k1 = d1 * m1 * (d1.abs().sum() / (d1 * m1).abs().sum())
    k2 = d2 * m2 * (d2.abs().sum() / (d2 * m2).abs().sum())
    expected = base + 0.6 * k1 + 0.9 * k2
    out = dare_linear(base, [d1, d2], [0.6, 0.9], [0.5, 0.25], generator=gen(11))
    assert torch.allclose(out, expected, atol=1e-6)


def test_dare_ties_density_one_is_ties_without_trim() -> None:
    base, deltas = torch.randn(30), [torch.randn(30), torch.randn(30)]
    out = dare_ties(base, deltas, [0.5, 0.8], [1.0, 1.0], normalize=True)
    assert torch.equal(out, ties(base, deltas, [0.5, 0.8], [1.0, 1.0]))


def test_bf16_dtypes_are_preserved() -> None:
    base = torch.randn(40, dtype=torch.bfloat16)
    deltas = [torch.randn(40, dtype=torch.bfloat16) for _ in range(2)]
    for fn in (ties, dare_ties, dare_linear):
        assert fn(base, deltas, [0.5, 0.5], [0.5, 0.5]).dtype == torch.bfloat16


# -- registry and dispatcher --------------------------------------------------------
def test_registry_defaults_follow_mergekit() -> None:
    def default(method: str, name: str) -> object:
        return METHODS[method].global_parameters[name].default

    assert default("linear", "normalize") is True
    assert default("task_arithmetic", "normalize") is False
    assert default("ties", "normalize") is True and default("ties", "rescale") is False
    assert default("dare_ties", "normalize") is False and default("dare_ties", "rescale") is True
    assert default("dare_linear", "normalize") is False and default("dare_linear", "rescale") is True
    for m in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
        assert default(m, "lambda") == 1.0 and default(m, "int8_mask") is False
        assert METHODS[m].model_parameters["density"].default == 1.0
        assert METHODS[m].needs_base
    assert all(METHODS[m].model_parameters["weight"].required for m in METHODS if m not in ("slerp", "model_stock"))
    assert not METHODS["model_stock"].model_parameters and default("model_stock", "filter_wise") is False
    assert not METHODS["linear"].needs_base
    assert [m for m in METHODS if METHODS[m].random] == ["dare_ties", "dare_linear", "della", "della_linear"]
    assert METHODS["breadcrumbs"].model_parameters["gamma"].default == 0.01
    assert METHODS["della"].model_parameters["epsilon"].default == 0.15
    assert default("della", "normalize") is True and default("della_linear", "normalize") is False
    assert METHODS["slerp"].global_parameters["t"].required and not METHODS["slerp"].model_parameters


def test_unknown_method_lists_known() -> None:
    with pytest.raises(KeyError) as err:
        get_method("slurp")
    assert isinstance(err.value, (UnknownMethodError, MergeError))
    assert "slurp" in str(err.value) and "dare_ties" in str(err.value) and "ties" in str(err.value)


def test_merge_tensor_applies_defaults_and_skips_base() -> None:
    base = torch.randn(20)
    d1, d2 = torch.randn(20), torch.randn(20)
    params = [{"weight": 0.5, "density": 0.5}, {"weight": 1.0}, {"weight": 0.7, "density": 0.8}]
    out = merge_tensor("ties", base, [d1, None, d2], params, {})
    assert torch.equal(out, ties(base, [d1, d2], [0.5, 0.7], [0.5, 0.8], normalize=True))
    stacked = merge_tensor("ties", base, torch.stack([d1, d2]), [params[0], params[2]], {})
    assert torch.equal(stacked, out)
    params = [{"weight": 1.0, "density": 0.1}, {"weight": 2.0}]  # density: accepted, no effect
    out = merge_tensor("task_arithmetic", base, [d1, d2], params, {"lambda": 0.5})
    assert torch.allclose(out, base + 0.5 * (d1 + 2 * d2))


def test_merge_tensor_linear_uses_base_as_input() -> None:
    base, d1 = torch.randn(20), torch.randn(20)
    out = merge_tensor("linear", base, [None, d1], [{"weight": 1.0}, {"weight": 3.0}], {})
    assert torch.allclose(out, (base + 3 * (base + d1)) / 4, atol=1e-6)
    stacked = merge_tensor("linear", base, torch.stack([d1, -d1]), [{"weight": 1.0}, {"weight": 1.0}], {})
    assert torch.allclose(stacked, base, atol=1e-6)


def test_merge_tensor_dare_uses_the_generator() -> None:
    base, deltas = torch.randn(50), [torch.randn(50), torch.randn(50)]
    params = [{"weight": 0.5, "density": 0.5}] * 2
    out = merge_tensor("dare_ties", base, deltas, params, {}, gen(5))
    assert torch.equal(out, dare_ties(base, deltas, [0.5, 0.5], [0.5, 0.5], generator=gen(5)))


@pytest.mark.parametrize(
    ("params", "global_params", "message"),
    [
        ([{"density": 0.5}], {}, "missing required parameter 'weight'"),
        ([{"weight": 1.0, "densty": 0.5}], {}, "unknown parameter"),
        ([{"weight": 1.0, "density": 1.5}], {}, "outside"),
        ([{"weight": 1.0}], {"normalise": True}, "unknown parameter"),
        ([{"weight": 1.0}], {"normalize": 1.0}, "must be true or false"),
        ([{"weight": 1.0}], {"lambda": True}, "must be a number"),
    ],
)
def test_merge_tensor_rejects_bad_parameters(params, global_params, message) -> None:
    with pytest.raises(MergeError, match=message):
        merge_tensor("ties", torch.zeros(3), [torch.ones(3)], params, global_params)


def test_tensor_group() -> None:
    assert LLAMA.tensor_group("model.embed_tokens.weight", 4) == 0
    assert LLAMA.tensor_group("model.layers.0.self_attn.q_proj.weight", 4) == 1
    assert LLAMA.tensor_group("model.layers.3.mlp.up_proj.weight", 4) == 4
    assert LLAMA.tensor_group("model.norm.weight", 4) == 5
    assert LLAMA.tensor_group("lm_head.weight", 4) == 5
    with pytest.raises(MergeError):
        LLAMA.tensor_group("model.layers.4.mlp.up_proj.weight", 4)


# -- CPU fast paths: the same bits as torch's reference ops ------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (300, 130), (3, 4, 5)], ids=str)
def test_draw_bernoulli_is_torch_bernoulli(dtype, shape) -> None:
    from evomerge.merge.methods.sparsify import draw_bernoulli

    probs = (torch.rand(shape, generator=gen(0)) * 0.9 + 0.05).to(dtype)
    if dtype == torch.float16:  # torch's CPU Bernoulli has no float16 kernel: callers work in float32
        probs = probs.float()
    ours, g = draw_bernoulli(probs, gen(11)), gen(11)
    theirs = torch.bernoulli(probs, generator=g)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    # and the generator advanced by as much (the next draw is the same too)
    g2 = gen(11)
    draw_bernoulli(probs, g2)
    assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_row_ranks_equal_a_stable_argsort(dtype) -> None:
    from evomerge.merge.methods.sparsify import row_ranks

    x = torch.randn(37, 211, generator=gen(3)).abs().to(dtype)
    x[:, 5:40] = x[:, 0:1]  # many ties in every row: ranked by index
    x[0] = 0
    order = torch.sort(x, dim=1, stable=True).indices
    expected = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1]).expand_as(order))
    assert torch.equal(row_ranks(x), expected)
    three_d = x.reshape(37, 211, 1).expand(37, 211, 2).contiguous()  # the torch fallback
    assert torch.equal(row_ranks(three_d)[:, :, 0], expected)


def test_consensus_mask_matches_sign_equality() -> None:
    """TIES' election, computed without materialising signs, equals the textbook sign(x) == sign(sum)."""
    x = torch.randn(3, 500, generator=gen(5))
    x[x.abs() < 0.3] = 0
    x[:, :10] = torch.tensor([1.0, -1.0, 0.0]).reshape(3, 1)  # votes that sum to exactly 0: positive wins
    for method, votes in (("sum", x.sum(0)), ("count", x.sign().sum(0))):
        elected = torch.where(votes >= 0, 1.0, -1.0)
        assert torch.equal(sign_consensus_mask(x, method), x.sign() == elected)
        assert torch.equal(sign_consensus_mask(x, method, int8_mask=True), x.sign() == elected)
