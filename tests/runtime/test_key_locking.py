"""Invariants 1, 2, 3 and 6 of docs/runtime.md for the pure tensor math in key_locking.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from perfusion_runtime.method.key_locking import (
    INFERENCE_TAU,
    apply_edit,
    coefficients,
    edited_projection,
    gate,
    inverse_covariance,
    make_basis,
    make_edit,
    project,
    second_moment,
    strength_to_beta,
)

DTYPES = [torch.float32, torch.float64]
D, OUT = 24, 16  # encoder width, projection output width


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}


def gaussian(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def anisotropic_moment(gen: torch.Generator, width: int, samples: int = 400) -> Tensor:
    """C of encodings with a mean and per-axis scales spread over three decades (like CLIP)."""
    scales = torch.logspace(-2, 1, width, dtype=torch.float64)
    mixing = torch.linalg.qr(gaussian(gen, width, width))[0]  # rotate so C is not diagonal
    encodings = (gaussian(gen, samples, width) * scales + gaussian(gen, width)) @ mixing
    return second_moment(encodings)


def concept_setup(
    seed: int, k: int, dtype: torch.dtype, width: int = D, out: int = OUT
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cinv [D, D], i_stars [K, D], weight [O, D], o_stars [K, O] in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    cinv = inverse_covariance(anisotropic_moment(gen, width)).to(dtype)
    i_stars = gaussian(gen, k, width, dtype=dtype)
    weight = gaussian(gen, out, width, dtype=dtype) / math.sqrt(width)
    o_stars = gaussian(gen, k, out, dtype=dtype)
    return cinv, i_stars, weight, o_stars


def reference_single(
    e: Tensor, weight: Tensor, i_star: Tensor, o_star: Tensor, cinv: Tensor, beta: float, tau: float
) -> Tensor:
    """Eq. 1 and 2 of docs/runtime.md written out in float64, independently of the module."""
    e, weight, i_star, o_star, m = (t.double() for t in (e, weight, i_star, o_star, cinv))
    s = (e @ m @ i_star) / (i_star @ m @ i_star)  # [...]
    gated = torch.sigmoid((s - beta) / tau)[..., None] * o_star
    return (e - s[..., None] * i_star) @ weight.T + gated


def reference_coefficients(e: Tensor, i_stars: Tensor, cinv: Tensor) -> Tensor:
    """a(e) from the normal equations (I C⁻¹ Iᵀ) a = I C⁻¹ e, in float64."""
    e, i_stars, m = e.double(), i_stars.double(), cinv.double()
    gram = i_stars @ m @ i_stars.T  # [K, K]
    return torch.linalg.solve(gram, i_stars @ m @ e.T).T  # [N, K]


def c_orthogonal_part(e: Tensor, i_stars: Tensor, cinv: Tensor) -> Tensor:
    """e minus its C⁻¹-orthogonal projection onto span{i*_k} (reference, float64)."""
    return e.double() - reference_coefficients(e, i_stars, cinv) @ i_stars.double()


# --- invariant 1 ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_invariant_1_at_i_star_returns_gated_target(dtype: torch.dtype) -> None:
    cinv, i_stars, weight, o_stars = concept_setup(1, 1, dtype)
    beta = strength_to_beta(0.5, "local")
    e = i_stars[0].expand(2, 3, D)  # the concept's input at every position of a batch
    h = edited_projection(e, weight, make_basis(i_stars, cinv), o_stars,
                          torch.tensor([beta], dtype=dtype), INFERENCE_TAU)
    expected = o_stars[0] / (1 + math.exp(-(1 - beta) / INFERENCE_TAU))  # σ((1 − β)/τ)·o*
    assert h.dtype == dtype
    torch.testing.assert_close(h, expected.expand(2, 3, OUT), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_invariant_1_with_several_concepts_gates_only_the_matching_one(dtype: torch.dtype) -> None:
    cinv, i_stars, weight, o_stars = concept_setup(2, 3, dtype)
    beta = torch.tensor([0.7, 0.6, 0.75], dtype=dtype)
    h = edited_projection(i_stars, weight, make_basis(i_stars, cinv), o_stars, beta, 0.1)
    on, off = torch.sigmoid((1 - beta) / 0.1), torch.sigmoid(-beta / 0.1)
    for k in range(3):
        weights = torch.where(torch.arange(3) == k, on, off)  # [K]
        torch.testing.assert_close(h[k], weights @ o_stars, **tolerance(dtype))


# --- invariant 2 ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3])
def test_invariant_2_c_orthogonal_input_passes_through(dtype: torch.dtype, k: int) -> None:
    cinv, i_stars, weight, o_stars = concept_setup(3, k, dtype)
    gen = torch.Generator().manual_seed(30)
    e = c_orthogonal_part(gaussian(gen, 5, D), i_stars, cinv).to(dtype)  # [5, D]
    beta = torch.full((k,), 0.7, dtype=dtype)
    basis = make_basis(i_stars, cinv)
    torch.testing.assert_close(coefficients(e, basis), torch.zeros(5, k, dtype=dtype),
                               **tolerance(dtype))
    h = edited_projection(e, weight, basis, o_stars, beta, INFERENCE_TAU)
    leak = torch.sigmoid(-beta / INFERENCE_TAU) @ o_stars  # Σ_k σ(−β_k/τ) o*_k
    torch.testing.assert_close(h, e @ weight.T + leak, **tolerance(dtype))


# --- invariant 3 ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_invariant_3_rescaling_C_changes_nothing(k: int) -> None:
    gen = torch.Generator().manual_seed(4)
    moment = anisotropic_moment(gen, D)
    i_stars, weight = gaussian(gen, k, D), gaussian(gen, OUT, D) / math.sqrt(D)
    o_stars, e = gaussian(gen, k, OUT), gaussian(gen, 7, D)
    cinv = inverse_covariance(moment)
    beta = torch.full((k,), 0.7)
    baseline = edited_projection(e, weight, make_basis(i_stars, cinv), o_stars, beta, 0.15)
    for scale in (1e-3, 7.5, 1e4):
        scaled = inverse_covariance(moment * scale)
        torch.testing.assert_close(scaled * scale, cinv, rtol=1e-5, atol=0.0)
        basis = make_basis(i_stars, scaled)
        torch.testing.assert_close(basis.readout, make_basis(i_stars, cinv).readout,
                                   rtol=1e-5, atol=1e-7)
        h = edited_projection(e, weight, basis, o_stars, beta, 0.15)
        torch.testing.assert_close(h, baseline, rtol=1e-5, atol=1e-6)


# --- invariant 6 ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_invariant_6_multi_concept_with_one_concept_equals_single_formula(
    dtype: torch.dtype,
) -> None:
    cinv, i_stars, weight, o_stars = concept_setup(6, 1, dtype)
    gen = torch.Generator().manual_seed(60)
    # random tokens, the concept's input itself, and mixtures of both
    e = torch.cat([gaussian(gen, 4, D), i_stars.double(), 0.5 * i_stars.double()
                   + gaussian(gen, 3, D)]).to(dtype)
    basis = make_basis(i_stars, cinv)
    s = (e.double() @ cinv.double() @ i_stars[0].double()) / (
        i_stars[0].double() @ cinv.double() @ i_stars[0].double())
    torch.testing.assert_close(coefficients(e, basis)[:, 0], s.to(dtype), **tolerance(dtype))
    h = edited_projection(e, weight, basis, o_stars, 0.7, INFERENCE_TAU)
    expected = reference_single(e, weight, i_stars[0], o_stars[0], cinv, 0.7, INFERENCE_TAU)
    torch.testing.assert_close(h, expected.to(dtype), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_invariant_6_projector_idempotent_and_fixes_each_i_star(dtype: torch.dtype) -> None:
    cinv, i_stars, _, _ = concept_setup(7, 4, dtype)
    basis = make_basis(i_stars, cinv)
    e = gaussian(torch.Generator().manual_seed(70), 9, D, dtype=dtype)
    projected = project(e, basis)
    torch.testing.assert_close(project(projected, basis), projected, **tolerance(dtype))
    torch.testing.assert_close(project(i_stars, basis), i_stars, **tolerance(dtype))
    torch.testing.assert_close(coefficients(i_stars, basis), torch.eye(4, dtype=dtype),
                               **tolerance(dtype))
    # the residual is C⁻¹-orthogonal to every i*_k: the projection is the C⁻¹ one
    residual_dots = (e - projected).double() @ cinv.double() @ i_stars.double().T  # [9, K]
    scale = (e.double() @ cinv.double() @ i_stars.double().T).abs().max().item()
    assert residual_dots.abs().max().item() <= tolerance(dtype)["atol"] * scale


def test_projection_coefficients_match_normal_equations() -> None:
    cinv, i_stars, _, _ = concept_setup(8, 3, torch.float64)
    e = gaussian(torch.Generator().manual_seed(80), 6, D)
    torch.testing.assert_close(coefficients(e, make_basis(i_stars, cinv)),
                               reference_coefficients(e, i_stars, cinv))


def test_dropping_cinv_changes_the_multi_concept_result() -> None:
    """The known public bug: projecting with the identity instead of C⁻¹ (docs/runtime.md)."""
    cinv, i_stars, weight, o_stars = concept_setup(9, 2, torch.float64)
    e = gaussian(torch.Generator().manual_seed(90), 6, D)
    beta = torch.tensor([0.7, 0.7], dtype=torch.float64)
    right = edited_projection(e, weight, make_basis(i_stars, cinv), o_stars, beta, 0.15)
    eye = torch.eye(D, dtype=torch.float64)
    dropped = edited_projection(e, weight, make_basis(i_stars, eye), o_stars, beta, 0.15)
    assert (right - dropped).abs().max() > 0.1 * right.abs().max()
    # with an isotropic C the metric is Euclidean and dropping C⁻¹ would be harmless
    isotropic = edited_projection(e, weight, make_basis(i_stars, 3.0 * eye), o_stars, beta, 0.15)
    torch.testing.assert_close(isotropic, dropped)


# --- shapes, dtypes, reuse ------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(), (5,), (2, 77), (2, 3, 4), (0, 3)])
@pytest.mark.parametrize("k", [1, 3])
def test_any_leading_batch_shape(lead: tuple[int, ...], k: int) -> None:
    cinv, i_stars, weight, o_stars = concept_setup(10, k, torch.float32)
    e = gaussian(torch.Generator().manual_seed(100), *lead, D, dtype=torch.float32)
    basis, beta = make_basis(i_stars, cinv), torch.full((k,), 0.7)
    h = edited_projection(e, weight, basis, o_stars, beta, INFERENCE_TAU)
    assert h.shape == (*lead, OUT)
    assert coefficients(e, basis).shape == (*lead, k)
    rows = edited_projection(e.reshape(-1, D), weight, basis, o_stars, beta, INFERENCE_TAU)
    torch.testing.assert_close(h.reshape(-1, OUT), rows)


def test_a_prebuilt_edit_matches_edited_projection_and_a_float_beta_broadcasts() -> None:
    cinv, i_stars, weight, o_stars = concept_setup(11, 2, torch.float32)
    e = gaussian(torch.Generator().manual_seed(110), 3, 77, D, dtype=torch.float32)
    basis = make_basis(i_stars, cinv)
    edit = make_edit(weight, basis, o_stars, 0.7, INFERENCE_TAU)
    expected = edited_projection(e, weight, basis, o_stars, torch.tensor([0.7, 0.7]), 0.15)
    torch.testing.assert_close(apply_edit(e, edit), expected)
    torch.testing.assert_close(apply_edit(e, edit), apply_edit(e, edit), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_activations_are_upcast_and_returned_in_their_dtype(
    low: torch.dtype,
) -> None:
    cinv, i_stars, weight, o_stars = concept_setup(12, 2, torch.float32)
    basis, beta = make_basis(i_stars, cinv), torch.tensor([0.7, 0.65])
    e = gaussian(torch.Generator().manual_seed(120), 2, 77, D).to(low)
    h = edited_projection(e, weight.to(low), basis, o_stars.to(low), beta, INFERENCE_TAU)
    assert h.dtype == low
    # the math ran in float32 on the (exactly representable) low-precision inputs
    in_float32 = edited_projection(e.float(), weight.to(low).float(), basis,
                                   o_stars.to(low).float(), beta, INFERENCE_TAU)
    torch.testing.assert_close(h, in_float32.to(low), rtol=0.0, atol=0.0)
    assert coefficients(e, basis).dtype == torch.float32
    # invariant 1 up to the rounding of i* itself to low precision
    at_star = edited_projection(i_stars.to(low), weight, basis, o_stars, beta, INFERENCE_TAU)
    on, off = torch.sigmoid((1 - beta) / INFERENCE_TAU), torch.sigmoid(-beta / INFERENCE_TAU)
    expected = torch.where(torch.eye(2, dtype=torch.bool), on, off) @ o_stars
    torch.testing.assert_close(at_star.float(), expected, rtol=0.0, atol=5e-2)


def test_sd15_sized_float32_keeps_invariant_1() -> None:
    """D = 768, O = 1280, 77 positions, a C with four decades of spread, all in float32."""
    gen = torch.Generator().manual_seed(13)
    width, out = 768, 1280
    scales = torch.logspace(-2, 2, width, dtype=torch.float64)
    moment = second_moment(gaussian(gen, 2000, width) * scales + 0.5 * gaussian(gen, width))
    cinv = inverse_covariance(moment)
    i_stars = (gaussian(gen, 2, width) * scales).float()
    weight = (gaussian(gen, out, width) / math.sqrt(width)).float()
    o_stars = gaussian(gen, 2, out).float()
    beta = torch.tensor([0.7, 0.7])
    e = torch.cat([i_stars[:1].expand(40, width), gaussian(gen, 37, width).float()])
    h = edited_projection(e, weight, make_basis(i_stars, cinv), o_stars, beta, INFERENCE_TAU)
    gates = torch.sigmoid(torch.tensor([0.3, -0.7]) / INFERENCE_TAU)
    torch.testing.assert_close(h[:40], (gates @ o_stars).expand(40, out), rtol=1e-3, atol=1e-3)


# --- hypothesis -----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    width=st.integers(min_value=2, max_value=12),
    data=st.data(),
    out=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_property_projection_and_edit_for_random_dims(
    width: int, data: st.DataObject, out: int, seed: int
) -> None:
    k = data.draw(st.integers(min_value=1, max_value=min(width - 1, 4)), label="k")
    cinv, i_stars, weight, o_stars = concept_setup(seed, k, torch.float64, width, out)
    basis = make_basis(i_stars, cinv)
    e = gaussian(torch.Generator().manual_seed(seed + 1), 3, width)
    tol = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(coefficients(e, basis),
                               reference_coefficients(e, i_stars, cinv), **tol)
    torch.testing.assert_close(project(i_stars, basis), i_stars, **tol)
    projected = project(e, basis)
    torch.testing.assert_close(project(projected, basis), projected, **tol)
    beta = torch.linspace(0.6, 0.8, k, dtype=torch.float64)
    at_stars = edited_projection(i_stars, weight, basis, o_stars, beta, INFERENCE_TAU)
    on, off = torch.sigmoid((1 - beta) / INFERENCE_TAU), torch.sigmoid(-beta / INFERENCE_TAU)
    expected = torch.where(torch.eye(k, dtype=torch.bool), on, off) @ o_stars  # row k: at i*_k
    torch.testing.assert_close(at_stars, expected, **tol)
    orthogonal = c_orthogonal_part(e, i_stars, cinv)
    torch.testing.assert_close(
        edited_projection(orthogonal, weight, basis, o_stars, beta, INFERENCE_TAU),
        orthogonal @ weight.T + off @ o_stars, **tol)


# --- make_basis rejects what it cannot project onto -----------------------------------------


def dependent_sets() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(14)
    a, b = gaussian(gen, D), gaussian(gen, D)
    return {
        "same concept twice": torch.stack([a, a]),
        "scaled copy": torch.stack([a, -2.5 * a]),
        "combination": torch.stack([a, b, 0.3 * a - 2.0 * b]),
        "zero": torch.stack([a, torch.zeros(D, dtype=torch.float64)]),
    }


@pytest.mark.parametrize("name", list(dependent_sets()))
def test_make_basis_rejects_linearly_dependent_i_stars(name: str) -> None:
    cinv = concept_setup(15, 1, torch.float32)[0]
    i_stars = dependent_sets()[name].float()
    with pytest.raises(ValueError, match=r"linearly dependent|is zero"):
        make_basis(i_stars, cinv)


def test_make_basis_rejects_more_concepts_than_dimensions() -> None:
    with pytest.raises(ValueError, match="linearly dependent"):
        make_basis(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.eye(4))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_make_basis_rejects_non_finite_input(bad: float) -> None:
    cinv, i_stars, _, _ = concept_setup(16, 2, torch.float32)
    broken = i_stars.clone()
    broken[1, 3] = bad
    with pytest.raises(ValueError, match="i_stars contains non-finite"):
        make_basis(broken, cinv)
    broken_cinv = cinv.clone()
    broken_cinv[2, 2] = bad
    with pytest.raises(ValueError, match="cinv contains non-finite"):
        make_basis(i_stars, broken_cinv)


def test_make_basis_rejects_bad_shapes_and_an_indefinite_metric() -> None:
    i_stars = torch.randn(2, D, generator=torch.Generator().manual_seed(17))
    with pytest.raises(ValueError, match=r"shape \[K, D\]"):
        make_basis(i_stars[0], torch.eye(D))
    with pytest.raises(ValueError, match=r"cinv must have shape"):
        make_basis(i_stars, torch.eye(D + 1))
    with pytest.raises(ValueError, match="not positive definite"):
        make_basis(i_stars, -torch.eye(D))


def test_edit_rejects_mismatched_shapes() -> None:
    cinv, i_stars, weight, o_stars = concept_setup(18, 2, torch.float32)
    basis = make_basis(i_stars, cinv)
    with pytest.raises(ValueError, match="weight must have shape"):
        make_edit(weight[:, :-1], basis, o_stars, 0.7, 0.15)
    with pytest.raises(ValueError, match="o_stars must have shape"):
        make_edit(weight, basis, o_stars[:1], 0.7, 0.15)
    with pytest.raises(ValueError, match="beta must be"):
        make_edit(weight, basis, o_stars, torch.tensor([0.7, 0.7, 0.7]), 0.15)
    with pytest.raises(ValueError, match="tau must be"):
        make_edit(weight, basis, o_stars, 0.7, 0.0)
    with pytest.raises(ValueError, match=r"e must have shape \[\.\.\., 24\]"):
        edited_projection(torch.zeros(3, D + 1), weight, basis, o_stars, 0.7, 0.15)


# --- C and C⁻¹ -----------------------------------------------------------------------------


def test_second_moment_is_float64_mean_outer_product() -> None:
    x = torch.randn(2, 50, 6, generator=torch.Generator().manual_seed(19))
    moment = second_moment(x)
    assert moment.dtype == torch.float64
    flat = x.reshape(-1, 6).double()
    torch.testing.assert_close(moment, flat.T @ flat / 100)
    with pytest.raises(ValueError, match="non-finite"):
        second_moment(torch.tensor([[1.0, math.nan]]))
    with pytest.raises(ValueError, match="empty"):
        second_moment(torch.zeros(0, 6))


def test_inverse_covariance_is_symmetric_float32_and_inverts_the_ridged_moment() -> None:
    moment = anisotropic_moment(torch.Generator().manual_seed(20), D)
    cinv = inverse_covariance(moment, ridge=1e-3)
    assert cinv.dtype == torch.float32
    assert torch.equal(cinv, cinv.T)
    ridged = moment + 1e-3 * moment.diagonal().mean() * torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(cinv.double() @ ridged, torch.eye(D, dtype=torch.float64),
                               rtol=0.0, atol=1e-4)


def test_inverse_covariance_rejects_what_is_not_a_second_moment() -> None:
    with pytest.raises(ValueError, match="square"):
        inverse_covariance(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="non-finite"):
        inverse_covariance(torch.full((3, 3), math.inf))
    with pytest.raises(ValueError, match="mean diagonal"):
        inverse_covariance(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="ridge"):
        inverse_covariance(torch.eye(3), ridge=-1.0)
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_covariance(torch.diag(torch.tensor([3.0, -1.0, 3.0])), ridge=0.0)


# --- gate and strength ----------------------------------------------------------------------


def test_gate_values() -> None:
    score = torch.tensor([[0.7, 1.0, 0.0]])
    g = gate(score, 0.7, INFERENCE_TAU)
    torch.testing.assert_close(g[0, 0], torch.tensor(0.5))
    torch.testing.assert_close(g[0, 1], torch.sigmoid(torch.tensor(0.3 / 0.15)))
    torch.testing.assert_close(g[0, 2], torch.sigmoid(torch.tensor(-0.7 / 0.15)))
    per_concept = gate(score, torch.tensor([0.7, 1.0, 0.0]), 0.1)  # β per concept broadcasts
    torch.testing.assert_close(per_concept, torch.full((1, 3), 0.5))
    assert gate(score.to(torch.bfloat16), 0.7, 0.15).dtype == torch.float32
    for tau in (0.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="tau"):
            gate(score, 0.7, tau)


@pytest.mark.parametrize(
    ("strength", "local", "global_"), [(0.0, 0.8, 0.6), (0.5, 0.7, 0.5), (1.0, 0.6, 0.4)]
)
def test_strength_to_beta(strength: float, local: float, global_: float) -> None:
    assert strength_to_beta(strength, "local") == pytest.approx(local, abs=1e-15)
    assert strength_to_beta(strength, "global") == pytest.approx(global_, abs=1e-15)


def test_strength_half_gives_the_published_default_exactly() -> None:
    assert strength_to_beta(0.5, "local") == 0.7
    assert strength_to_beta(0.5, "global") == 0.5


@pytest.mark.parametrize("strength", [-0.01, 1.01, math.nan, math.inf])
def test_strength_outside_unit_interval_is_rejected(strength: float) -> None:
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        strength_to_beta(strength, "local")


def test_unknown_lock_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="lock must be 'local' or 'global'"):
        strength_to_beta(0.5, "both")
