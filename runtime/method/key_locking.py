"""The Perfusion gated rank-1 edit as pure tensor functions (docs/runtime.md, "The edit").

Paper: Tewel et al., "Key-Locked Rank One Editing for Text-to-Image Personalization"
(SIGGRAPH 2023, arXiv 2305.01644). For one concept, per text token e [D]:

    (eq. 1)  s(e) = eᵀ C⁻¹ i* / (i*ᵀ C⁻¹ i*)
    (eq. 2)  h(e) = W (e − s(e)·i*) + σ((s(e) − β) / τ) · o*

For K concepts at once (docs/runtime.md, "Inference"), s(e)·i* becomes the C⁻¹-orthogonal
projection of e onto span{i*_k}, written Σ_k a_k(e)·i*_k, and each concept adds its own gated
target:

    (eq. 3)  h(e) = W (e − Σ_k a_k(e)·i*_k) + Σ_k σ((a_k(e) − β_k) / τ) · o*_k

Shapes: B batch, T text positions, D encoder width (input of to_k / to_v), O output width of
a projection, K concepts applied at once; "..." is any number of leading dimensions.

Dtype discipline: the math runs in float32 (float64 when a caller passes float64, as the
tests do); bf16/fp16 activations are upcast inside and the result is returned in their dtype.
C⁻¹ is inverted in float64 and stored in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

INFERENCE_TAU = 0.15  # τ at inference (docs/runtime.md, "Inference"); training uses 0.1
DEFAULT_RIDGE = 1e-4  # relative to mean(diag(C)); see inverse_covariance
# |R_kk| / ‖Lᵀ i*_k‖ is the sine of the angle (in the C⁻¹ metric) between i*_k and the span of
# the earlier i*_j; below this the projection coefficients blow up by 1/sine, so we refuse.
DEPENDENCE_TOLERANCE = 1e-4
LOCK_MODES = ("local", "global")


def _math_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (never below float32)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_finite(name: str, tensor: Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or ±inf)")


def second_moment(encodings: Tensor) -> Tensor:
    """Uncentered covariance C = E[e eᵀ] of encoder outputs, accumulated in float64."""
    # encodings [N, D] (or [..., D]: every leading position counts as a sample) -> C [D, D]
    if encodings.ndim < 2 or encodings.shape[-1] == 0:
        raise ValueError(f"encodings must have shape [N, D], got {tuple(encodings.shape)}")
    flat = encodings.reshape(-1, encodings.shape[-1]).to(torch.float64)  # [N, D]
    if flat.shape[0] == 0:
        raise ValueError("encodings is empty: the second moment needs at least one sample")
    _check_finite("encodings", flat)
    return (flat.T @ flat) / flat.shape[0]  # [D, D]


def inverse_covariance(moment: Tensor, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """C⁻¹ = (C + ridge·mean(diag C)·I)⁻¹, symmetric, computed in float64, returned float32."""
    # moment C [D, D] -> C⁻¹ [D, D]. The ridge scales with C, so C -> c·C gives C⁻¹ -> C⁻¹/c
    # exactly, and s(e) (eq. 1) is unchanged: invariant 3.
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1] or moment.shape[0] == 0:
        raise ValueError(f"moment must be a square [D, D] matrix, got {tuple(moment.shape)}")
    if not (math.isfinite(ridge) and ridge >= 0.0):
        raise ValueError(f"ridge must be a finite number ≥ 0, got {ridge}")
    _check_finite("moment", moment)
    c = moment.to(torch.float64)
    c = (c + c.T) / 2  # [D, D]
    scale = c.diagonal().mean()
    if not bool(scale > 0):
        raise ValueError("moment has a non-positive mean diagonal: not a second moment")
    eye = torch.eye(c.shape[0], dtype=torch.float64, device=c.device)
    lower, info = torch.linalg.cholesky_ex(c + (ridge * scale) * eye)
    if int(info) != 0:
        raise ValueError(
            "moment is not positive definite (even with the ridge): "
            "use more encodings or a larger ridge"
        )
    inverse = torch.cholesky_inverse(lower)  # [D, D]
    return ((inverse + inverse.T) / 2).to(torch.float32)


def gate(score: Tensor, beta: Tensor | float, tau: float) -> Tensor:
    """σ((s − β) / τ) of eq. 2, computed in float32 (float64 if given float64)."""
    # score [..., K], beta [K] or scalar -> [..., K]
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    dtype = _math_dtype(score, beta) if isinstance(beta, Tensor) else _math_dtype(score)
    beta_t = beta.to(dtype=dtype, device=score.device) if isinstance(beta, Tensor) else beta
    return torch.sigmoid((score.to(dtype) - beta_t) / tau)


def strength_to_beta(strength: float, lock: str) -> float:
    """Gate bias β for a user strength in [0, 1]: local 0.8 − 0.2·s, global 0.6 − 0.2·s."""
    if lock not in LOCK_MODES:
        raise ValueError(f"lock must be 'local' or 'global', got {lock!r}")
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    top = 8.0 if lock == "local" else 6.0
    return (top - 2.0 * strength) / 10.0  # in tenths, so strength 0.5 gives exactly 0.7 / 0.5


@dataclass(frozen=True, eq=False)
class Basis:
    """Precomputed for one set of K concept inputs i*_k and one C⁻¹ (fp32)."""

    i_stars: Tensor  # [K, D]
    # [D, K]: a(e) = e @ readout are the C⁻¹-orthogonal projection coefficients of e onto
    # span{i*_k}; for K = 1 it is C⁻¹ i* / (i*ᵀ C⁻¹ i*), i.e. a = s(e) of eq. 1.
    readout: Tensor

    @property
    def size(self) -> int:
        """K, the number of concepts."""
        return int(self.i_stars.shape[0])

    @property
    def width(self) -> int:
        """D, the encoder width."""
        return int(self.i_stars.shape[1])

    def to(self, device: torch.device | str) -> Basis:
        """The same basis on another device (dtype unchanged)."""
        return Basis(self.i_stars.to(device), self.readout.to(device))


def _check_basis_inputs(i_stars: Tensor, cinv: Tensor) -> None:
    if i_stars.ndim != 2 or i_stars.shape[0] == 0 or i_stars.shape[1] == 0:
        raise ValueError(f"i_stars must have shape [K, D] with K ≥ 1, got {tuple(i_stars.shape)}")
    width = i_stars.shape[1]
    if tuple(cinv.shape) != (width, width):
        raise ValueError(
            f"cinv must have shape [D, D] = [{width}, {width}] to match i_stars, "
            f"got {tuple(cinv.shape)}"
        )
    if i_stars.shape[0] > width:
        raise ValueError(
            f"{i_stars.shape[0]} concept inputs i*_k in width D = {width} are linearly dependent"
        )
    _check_finite("i_stars", i_stars)
    _check_finite("cinv", cinv)


def _check_independent(lifted: Tensor, r: Tensor) -> None:
    """Refuse i*_k that (nearly) lie in the span of the earlier ones, in the C⁻¹ metric."""
    # lifted Lᵀ i*_k as columns [D, K]; r upper-triangular [K, K] of its QR
    norms = torch.linalg.vector_norm(lifted, dim=0)  # [K]
    sines = r.diagonal().abs() / norms.clamp_min(torch.finfo(norms.dtype).tiny)  # [K]
    for k in range(lifted.shape[1]):
        if not bool(norms[k] > 0):
            raise ValueError(f"i_stars[{k}] is zero: a concept input must be non-zero")
        if not bool(sines[k] >= DEPENDENCE_TOLERANCE):
            raise ValueError(
                f"i_stars[{k}] is linearly dependent on i_stars[:{k}] (in the C⁻¹ metric; "
                f"sine of the angle {float(sines[k]):.2e}): the same concept twice, "
                "or concepts with the same input, cannot be applied together"
            )


def make_basis(i_stars: Tensor, cinv: Tensor) -> Basis:
    """Basis for the C⁻¹-orthogonal projection onto span{i*_k}: Cholesky, QR, map back."""
    # i_stars [K, D], cinv [D, D] -> Basis. In float64: C⁻¹ = L Lᵀ, so ⟨x, y⟩_C⁻¹ = (Lᵀx)·(Lᵀy)
    # and the metric becomes Euclidean after x -> Lᵀ x. There Lᵀ Iᵀ = Q R (I = i_stars), the
    # projection is Q Qᵀ Lᵀ e = Q R a, so a = R⁻¹ Qᵀ Lᵀ e and readout = L Q R⁻ᵀ [D, K].
    _check_basis_inputs(i_stars, cinv)
    dtype = _math_dtype(i_stars, cinv)
    metric = cinv.to(torch.float64)
    metric = (metric + metric.T) / 2  # [D, D]
    lower, info = torch.linalg.cholesky_ex(metric)  # L [D, D]
    if int(info) != 0:
        raise ValueError("cinv is not positive definite: pass C⁻¹ from inverse_covariance")
    lifted = lower.T @ i_stars.to(torch.float64).T  # Lᵀ Iᵀ [D, K]
    q, r = torch.linalg.qr(lifted)  # q [D, K], r [K, K]
    _check_independent(lifted, r)
    q_rinv_t = torch.linalg.solve_triangular(r, q.T, upper=True).T  # Q R⁻ᵀ [D, K]
    readout = lower @ q_rinv_t  # [D, K]
    return Basis(i_stars=i_stars.to(dtype), readout=readout.to(dtype))


def coefficients(e: Tensor, basis: Basis) -> Tensor:
    """a(e): projection coefficients of e onto span{i*_k} (eq. 3); for K = 1, s(e) of eq. 1."""
    # e [..., D] -> a [..., K], in float32 (float64 if e or the basis is float64)
    _check_width("e", e, basis.width)
    dtype = _math_dtype(e, basis.readout)
    return e.to(dtype) @ basis.readout.to(dtype)


def project(e: Tensor, basis: Basis) -> Tensor:
    """P(e) = Σ_k a_k(e)·i*_k, the C⁻¹-orthogonal projection of e onto span{i*_k}."""
    # e [..., D] -> [..., D], in the math dtype; idempotent and fixes each i*_k (invariant 6)
    a = coefficients(e, basis)  # [..., K]
    return a @ basis.i_stars.to(a.dtype)


def _check_width(name: str, tensor: Tensor, width: int) -> None:
    if tensor.ndim < 1 or tensor.shape[-1] != width:
        raise ValueError(f"{name} must have shape [..., {width}], got {tuple(tensor.shape)}")


@dataclass(frozen=True, eq=False)
class Edit:
    """One projection (to_k or to_v of one layer) edited by K concepts, ready to apply."""

    readout: Tensor  # [D, K], from the Basis
    weight: Tensor  # W [O, D], in the math dtype
    # [2K, O]: rows −W i*_k then o*_k, so the K-term correction and the K gated targets of
    # eq. 3 are one matmul with [a(e), σ((a(e) − β)/τ)] [..., 2K].
    table: Tensor
    beta: Tensor  # [K]
    tau: float

    @property
    def dtype(self) -> torch.dtype:
        """The math dtype of the edit (float32, or float64)."""
        return self.weight.dtype


def make_edit(
    weight: Tensor, basis: Basis, o_stars: Tensor, beta: Tensor | float, tau: float
) -> Edit:
    """Precompute eq. 3 for one projection weight: W i*_k and the targets, in float32."""
    # weight [O, D], o_stars [K, O], beta [K] (or one float for all) -> Edit
    if weight.ndim != 2 or weight.shape[1] != basis.width:
        raise ValueError(f"weight must have shape [O, {basis.width}], got {tuple(weight.shape)}")
    out_width, k = weight.shape[0], basis.size
    if tuple(o_stars.shape) != (k, out_width):
        raise ValueError(f"o_stars must have shape [{k}, {out_width}], got {tuple(o_stars.shape)}")
    if isinstance(beta, Tensor) and tuple(beta.shape) not in ((), (k,)):
        raise ValueError(f"beta must be a float or have shape [{k}], got {tuple(beta.shape)}")
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    dtype = _math_dtype(weight, basis.readout, o_stars)
    beta_t = torch.as_tensor(beta, dtype=dtype, device=weight.device).expand(k).clone()  # [K]
    w = weight.to(dtype)  # [O, D]
    w_i_stars = basis.i_stars.to(dtype) @ w.T  # W i*_k as rows [K, O]
    table = torch.cat([-w_i_stars, o_stars.to(dtype)])  # [2K, O]
    return Edit(readout=basis.readout.to(dtype), weight=w, table=table, beta=beta_t, tau=tau)


def apply_edit(e: Tensor, edit: Edit) -> Tensor:
    """h(e) of eq. 3 (eq. 2 when K = 1); the result is in e's dtype."""
    # e [..., D] -> h [..., O]
    _check_width("e", e, edit.weight.shape[1])
    dtype = torch.promote_types(e.dtype, edit.dtype)
    x = e.to(dtype)  # [..., D]
    a = x @ edit.readout.to(dtype)  # [..., K]
    mix = torch.cat([a, gate(a, edit.beta, edit.tau)], dim=-1)  # [..., 2K]
    h = torch.nn.functional.linear(x, edit.weight.to(dtype)) + mix @ edit.table.to(dtype)
    return h.to(e.dtype)  # [..., O]


def edited_projection(
    e: Tensor, weight: Tensor, basis: Basis, o_stars: Tensor, beta: Tensor | float, tau: float
) -> Tensor:
    """h(e) = W (e − Σ_k a_k(e) i*_k) + Σ_k σ((a_k(e) − β_k)/τ) o*_k (eq. 3; eq. 2 for K = 1)."""
    # e [..., D], weight [O, D] (nn.Linear.weight; SD cross-attention K/V have no bias),
    # o_stars [K, O], beta [K] -> [..., O] in e's dtype. To apply the same edit to many
    # prompts, build it once with make_edit and call apply_edit.
    return apply_edit(e, make_edit(weight, basis, o_stars, beta, tau))
