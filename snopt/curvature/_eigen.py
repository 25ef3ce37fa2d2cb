"""The eigen-corrected (EKFAC) update of SNOpt, as pure functions on tensors.

With A = U_A Λ_A U_Aᵀ and G = U_G Λ_G U_Gᵀ (`eigenbasis` for one layer, `eigenbases` for all
layers of a refresh in a few batched eigh calls, refreshed every ``update_freq`` optimizer
steps), the (d_out, d_in) gradient matrix ∇W of [W, b] is rotated into the
Kronecker eigenbasis, divided elementwise by a running second moment m2 plus ``eps``, and
rotated back (`precondition`):

    G̃ = U_Gᵀ ∇W U_A
    m2 ← α m2 + (1 − α) · scale · G̃²                 (m2 initialised as num_locations · λ_G λ_Aᵀ)
    update = U_G (G̃ / (m2 + eps)) U_Aᵀ

In the column-major vec of DESIGN §2, vec(update) = Q (diag(vec m2) + eps I)⁻¹ Qᵀ vec(∇W)
with Q = U_A ⊗ U_G; with α = 1 and m2 = λ_G λ_Aᵀ this is (A ⊗ G + eps I)⁻¹ vec(∇W), i.e.
KFAC with damping eps. ``scale`` is the authors' batch-size factor (``bs``) on G̃² when ∇W
is the gradient of a batch-mean loss.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from snopt.curvature._kron import KronFactors

# torch re-exports `torch._C._LinAlgError` here without declaring it in its stubs.
_LinAlgError: type[RuntimeError] = torch.linalg.LinAlgError  # type: ignore[attr-defined]


class CurvatureWarning(UserWarning):
    """A curvature estimate could not be used as computed and was replaced by a safe fallback."""


@dataclass(eq=False)
class EigenBasis:
    """Eigendecompositions A = U_A diag(lam_A) U_Aᵀ and G = U_G diag(lam_G) U_Gᵀ of one layer's factors.

    Attributes:
        U_A: Orthogonal eigenvectors of A as columns, (d_in, d_in).
        U_G: Orthogonal eigenvectors of G as columns, (d_out, d_out).
        lam_A: Eigenvalues of A (ascending, clamped at 0, plus any damping), (d_in,).
        lam_G: Eigenvalues of G (ascending, clamped at 0, plus any damping), (d_out,).
    """

    U_A: Tensor
    U_G: Tensor
    lam_A: Tensor
    lam_G: Tensor


_WORK_DTYPES = (torch.float32, torch.float64)  # eigh has no half precision: float16/bfloat16 work in float64
_OK, _RAISED, _NONFINITE = 0, 1, 2  # per-matrix status codes of `_eigh_stack`
_WHY = {_RAISED: "did not converge", _NONFINITE: "returned NaN or inf"}


def _eigh_stack(work: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The eigh of a (k, d, d) stack: ``(lam, U, status)`` with a uint8 status per member (no host sync of its own).

    One `torch.linalg.eigh` call when the batch converges. If it raises `LinAlgError`, each
    member is decomposed alone (to find the failing ones); a member that raises on its own
    gets status ``_RAISED`` and identity placeholders. Non-finite outputs get ``_NONFINITE``.
    """
    try:
        lam, u = torch.linalg.eigh(work)
    except _LinAlgError:
        k, d = work.shape[0], work.shape[-1]
        if k == 1:
            return (torch.ones(1, d, dtype=work.dtype, device=work.device),
                    torch.eye(d, dtype=work.dtype, device=work.device).unsqueeze(0),
                    torch.full((1,), _RAISED, dtype=torch.uint8, device=work.device))
        parts = [_eigh_stack(work[j:j + 1]) for j in range(k)]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts]))
    finite = torch.isfinite(lam).all(-1) & torch.isfinite(u).flatten(1).all(-1)
    return lam, u, (~finite).to(torch.uint8).mul_(_NONFINITE)


@dataclass(eq=False)
class EigenRefresh:
    """The result of `eigenbases`: a basis (or None) per layer and what had to be done about failures.

    All index lists hold positions in the `factors` passed to `eigenbases`, ascending.

    Attributes:
        bases: Per layer, its `EigenBasis`, or None meaning "no new basis: keep the previous
            one" (the layer is in `empty` or, with ``on_nonfinite="keep"``, in `nonfinite`).
        empty: Layers given as None or (with ``skip_empty``) whose ``weight`` is not > 0:
            nothing was accumulated. Silent.
        nonfinite: Layers whose A or G holds NaN or inf. With ``on_nonfinite="keep"`` their
            basis is None; with ``"identity"`` the non-finite factor got the identity basis.
            Each was reported by a `CurvatureWarning`.
        identity: ``(layer, "A" | "G")`` for every factor that got the identity basis with
            unit eigenvalues (plus damping): eigh failed in the working dtype and in float64,
            or (``on_nonfinite="identity"``) the factor was not finite. Each was warned about.
        retried: ``(layer, "A" | "G")`` for every factor whose float32 eigh raised or returned
            NaN/inf and that a float64 retry rescued (silent, as in `eigenbasis`).
        eigh_groups: Number of (size, dtype, device) groups, i.e. batched eigh calls when
            every batch converges.
        host_syncs: Explicit host synchronisations made: one per device holding factors, plus
            one per group retried in float64 (`torch.linalg.eigh` on CUDA adds one of its own
            per call, see `eigenbases`).
    """

    bases: list[EigenBasis | None]
    empty: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    identity: list[tuple[int, str]] = field(default_factory=list)
    retried: list[tuple[int, str]] = field(default_factory=list)
    eigh_groups: int = 0
    host_syncs: int = 0


@dataclass(eq=False)
class _Group:
    """One (size, dtype, device) stack of factors and its batched decomposition (in the working dtype)."""

    dtype: torch.dtype  # of the factors
    members: list[tuple[int, str]]  # (layer, "A" | "G") per stacked matrix
    work: Tensor  # (k, d, d); non-finite inputs replaced by the identity
    lam: Tensor  # (k, d)
    u: Tensor  # (k, d, d)

    def set_identity(self, j: int) -> None:
        self.lam[j].fill_(1.0)
        self.u[j].copy_(torch.eye(self.u.shape[-1], dtype=self.u.dtype, device=self.u.device))


_Slot = tuple[torch.device, int, int]  # (device, start, length) of a flag tensor in `_Flags`


class _Flags:
    """Small integer flags (0: good) on their devices, read to the host with one sync per device."""

    def __init__(self) -> None:
        self._parts: dict[torch.device, list[Tensor]] = {}
        self._sizes: dict[torch.device, int] = {}
        self._values: dict[torch.device, list[int]] = {}

    def add(self, t: Tensor) -> _Slot:
        dev, start = t.device, self._sizes.get(t.device, 0)
        self._parts.setdefault(dev, []).append(t.reshape(-1).to(torch.uint8))
        self._sizes[dev] = start + t.numel()
        return dev, start, t.numel()

    def read(self) -> int:
        """Fetch every flag (one ``tolist`` per device); returns the number of host syncs."""
        self._values = {dev: torch.cat(parts).tolist() for dev, parts in self._parts.items()}
        return len(self._values)

    def __getitem__(self, slot: _Slot) -> list[int]:
        dev, start, n = slot
        return self._values[dev][start:start + n]

    def all_ok(self) -> bool:
        """Whether every flag read is 0."""
        return not any(any(v) for v in self._values.values())


def _check_damping(damping: float) -> None:
    if not damping >= 0.0 or damping == float("inf"):
        raise ValueError(f"`damping` must be a non-negative finite number; got {damping!r}.")


def _fallback_message(label: str, d: int, dtype: torch.dtype, why: str) -> str:
    return (f"The eigendecomposition of Kronecker factor {label} ({d}×{d}, {dtype}) {why}; using the identity "
            "basis with unit eigenvalues for it (an unpreconditioned direction). Check the factor for NaN/inf or "
            "extreme scales.")


def _decompose(factors: Sequence[KronFactors | None], damping: float, on_nonfinite: str, skip_empty: bool,
               names: Sequence[str] | None, single: bool) -> tuple[EigenRefresh, list[str]]:
    """`eigenbases` without the warnings: the result and the messages to warn with."""
    _check_damping(damping)
    if on_nonfinite not in ("keep", "identity"):
        raise ValueError(f"`on_nonfinite` must be 'keep' or 'identity'; got {on_nonfinite!r}.")
    if names is not None and len(names) != len(factors):
        raise ValueError(f"`names` must name every layer: got {len(names)} names for {len(factors)} factors.")

    def label(i: int, which: str) -> str:
        if single:
            return which
        return f"{which} of layer {names[i] if names is not None else i!r}"

    out = EigenRefresh(bases=[None] * len(factors))
    grouped: dict[tuple[int, torch.dtype, torch.device], list[tuple[int, str, Tensor]]] = {}
    flags = _Flags()  # everything that must hold, read with one host sync per device
    weight_ok: list[tuple[int, _Slot]] = []
    present: list[int] = []
    for i, f in enumerate(factors):
        if f is None:
            out.empty.append(i)
            continue
        present.append(i)
        for which, m in (("A", f.A), ("G", f.G)):
            if m.ndim != 2 or m.shape[0] != m.shape[1] or not m.is_floating_point():
                raise ValueError(f"Kronecker factor {label(i, which)} must be a square floating matrix; got shape "
                                 f"{tuple(m.shape)} and dtype {m.dtype}.")
            grouped.setdefault((m.shape[0], m.dtype, m.device), []).append((i, which, m))
        if skip_empty:
            weight_ok.append((i, flags.add(~(torch.as_tensor(f.weight).reshape(()) > 0))))  # NaN: empty too

    groups: list[tuple[_Group, _Slot, _Slot]] = []
    for (d, dtype, device), mats in grouped.items():
        stack = torch.stack([m for _, _, m in mats])
        in_ok = torch.isfinite(stack).flatten(1).all(-1)
        work_dtype = dtype if dtype in _WORK_DTYPES else torch.float64
        eye = torch.eye(d, dtype=work_dtype, device=device)
        work = torch.where(in_ok[:, None, None], stack.to(work_dtype), eye)  # eigh never sees NaN
        lam, u, status = _eigh_stack(work)
        g = _Group(dtype, [(i, w) for i, w, _ in mats], work, lam, u)
        groups.append((g, flags.add(~in_ok), flags.add(status)))
    out.eigh_groups = len(groups)
    out.host_syncs = flags.read()  # the one host sync per device

    messages: list[str] = []
    if not flags.all_ok():  # something failed: handle the culprits (more syncs on this path only)
        empty = {i for i, slot in weight_ok if flags[slot][0]}
        nonfinite: set[int] = set()
        identity: set[tuple[int, str]] = set()
        for g, in_slot, st_slot in groups:
            bad_in, st_l = flags[in_slot], flags[st_slot]
            d = g.work.shape[-1]
            retry: list[int] = []
            for j, (i, which) in enumerate(g.members):
                if i in empty:
                    continue
                if bad_in[j]:
                    nonfinite.add(i)
                    if on_nonfinite == "identity":
                        g.set_identity(j)
                        identity.add((i, which))
                        messages.append(_fallback_message(label(i, which), d, g.dtype,
                                                          "was skipped because the factor holds NaN or inf"))
                elif st_l[j] != _OK:
                    retry.append(j)
            if not retry:
                continue
            failed = {j: f"{_WHY[int(st_l[j])]} in {g.work.dtype}" for j in retry}
            if g.work.dtype != torch.float64:  # float32: retry the failing members, batched, in float64
                idx = torch.tensor(retry, device=g.work.device)
                lam64, u64, st64 = _eigh_stack(g.work.index_select(0, idx).double())
                st64_l = st64.tolist()
                out.host_syncs += 1
                for r, j in enumerate(retry):
                    if st64_l[r] == _OK:
                        g.lam[j].copy_(lam64[r])
                        g.u[j].copy_(u64[r])
                        out.retried.append(g.members[j])
                        del failed[j]
                    else:
                        failed[j] += f", then {_WHY[st64_l[r]]} in torch.float64"
            for j, why in failed.items():
                g.set_identity(j)
                identity.add(g.members[j])
                messages.append(_fallback_message(label(*g.members[j]), d, g.dtype, why))
        out.empty = sorted(set(out.empty) | empty)
        out.nonfinite = sorted(nonfinite)
        out.identity = sorted(identity)
        out.retried.sort()
        if on_nonfinite == "keep":
            messages += [f"Non-finite Kronecker factors for layer {names[i] if names is not None else i!r}: keeping "
                         "its previous eigenbasis." for i in out.nonfinite]

    parts: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    for g, _, _ in groups:  # per group, not per layer: cast, clamp, damp, then views
        lam_out = g.lam.to(g.dtype).clamp_(min=0.0)
        if damping:
            lam_out.add_(damping)
        parts.update(zip(g.members, zip(lam_out.unbind(0), g.u.to(g.dtype).unbind(0), strict=True), strict=True))
    skip = set(out.empty) | (set(out.nonfinite) if on_nonfinite == "keep" else set())
    for i in present:
        if i not in skip:
            (lam_a, u_a), (lam_g, u_g) = parts[i, "A"], parts[i, "G"]
            out.bases[i] = EigenBasis(U_A=u_a, U_G=u_g, lam_A=lam_a, lam_G=lam_g)
    return out, messages


def eigenbases(factors: Sequence[KronFactors | None], *, damping: float = 0.0,
               on_nonfinite: Literal["keep", "identity"] = "keep", skip_empty: bool = True,
               names: Sequence[str] | None = None) -> EigenRefresh:
    """The eigenbases of many layers at once: one batched `torch.linalg.eigh` per (size, dtype, device).

    All A's and G's of all layers with the same (size, dtype, device) are stacked and
    decomposed by one batched eigh; everything that must hold (input factors finite, every
    decomposition converged and finite, ``weight > 0``) is gathered into one small flag
    vector per device and read with one host sync, which also says which entry failed. Only
    when something failed is more work done:

    - eigh raising `LinAlgError` for a batch: its members are decomposed one by one to find
      the failing ones;
    - a float32 factor whose eigh raised or returned NaN/inf is retried in float64 (the
      failing members only, batched; results cast back; silent, listed in ``retried``);
    - if that fails too (or the factor is float64 already), the factor gets the identity
      basis with unit eigenvalues and a `CurvatureWarning` (listed in ``identity``);
    - a factor holding NaN/inf is never decomposed (it is replaced by the identity in the
      stack); with ``on_nonfinite="keep"`` (default, SNOpt's rule) its layer gets None (keep
      the previous basis) and one `CurvatureWarning` per layer, with ``"identity"``
      (`eigenbasis`'s rule) the factor gets the identity basis and a warning.

    Float16/bfloat16 factors are decomposed in float64 and cast back. Negative eigenvalues
    (round-off of a PSD factor) are clamped to 0, then ``damping`` is added (the eigenvalues
    of A + damping·I and G + damping·I), exactly as in `eigenbasis`, which is this function
    on one layer. The bases' tensors are views of per-group stacks (so layers of one group
    share storage); nothing of `factors` is modified or aliased.

    Host syncs when everything is finite: one per device holding factors or weights (one on
    a single GPU), independent of the number of layers, plus the one that
    `torch.linalg.eigh` itself makes per call on CUDA (it checks LAPACK's ``info``): one per
    (size, dtype, device) group. On the failure path: one more per group with float32
    members to retry in float64 (and, when a batch raises, one eigh call per member). Per
    layer, only kernel launches (the ``weight > 0`` test; stacking is one launch per group)
    and tensor views; cost Σ O(d³) in eigh.

    Args:
        factors: Per layer its Kronecker factors, or None (no data: basis None, in ``empty``).
        damping: Non-negative shift added to every eigenvalue.
        on_nonfinite: ``"keep"``: a layer with a non-finite A or G gets None; ``"identity"``:
            the non-finite factor gets the identity basis.
        skip_empty: Give None to layers whose ``weight`` is not > 0 (nothing folded in), as
            SNOpt's refresh does; their factors are still decomposed (batched), just unused.
        names: Layer names for the warnings (default: their positions).

    Returns:
        The bases and a report, see `EigenRefresh`.

    Raises:
        ValueError: If `damping` is negative or not finite, `on_nonfinite` is unknown,
            `names` has the wrong length, or a factor is not a square floating matrix.
    """
    out, messages = _decompose(factors, damping, on_nonfinite, skip_empty, names, single=False)
    for msg in messages:
        warnings.warn(msg, CurvatureWarning, stacklevel=2)
    return out


def eigenbasis(factors: KronFactors, *, damping: float = 0.0) -> EigenBasis:
    """Eigendecompose A and G with `torch.linalg.eigh`, robustly (`eigenbases` on one layer).

    Each factor is decomposed in its own dtype (float16/bfloat16 in float64); if that raises
    `torch.linalg.LinAlgError` or returns NaN/inf, a float32 factor is retried in float64
    (results cast back). If that fails too, or the factor is not finite, a `CurvatureWarning`
    is issued and that factor gets the identity basis with unit eigenvalues, so the result
    never holds NaN. Negative eigenvalues (round-off of a positive semi-definite factor) are
    clamped to 0, then ``damping`` is added to every eigenvalue (the eigenvalues of
    A + damping·I and G + damping·I). Cost O(d_in³ + d_out³); one host sync (plus eigh's own
    on CUDA). ``factors.weight`` is not looked at.

    Args:
        factors: The layer's Kronecker factors.
        damping: Non-negative shift added to both factors' eigenvalues.

    Returns:
        The eigenbasis, in the factors' dtype and device.

    Raises:
        ValueError: If `damping` is negative or not finite.
    """
    out, messages = _decompose([factors], damping, "identity", False, None, single=True)
    for msg in messages:
        warnings.warn(msg, CurvatureWarning, stacklevel=2)
    basis = out.bases[0]
    assert basis is not None  # "identity" and no weight test: always a basis
    return basis


def project_eigenvalues(factors: KronFactors, basis: EigenBasis, *, damping: float = 0.0) -> EigenBasis:
    """New scales in an old eigenbasis: λ = diag(Uᵀ M U) for M = A, G, without an eigendecomposition.

    EKFAC (George et al. 2018) may refresh the (costly) eigenbasis less often than the
    scales: between two `eigenbases`, fresh factors can be projected onto the previous
    basis, λ_A = diag(U_Aᵀ A U_A) and λ_G = diag(U_Gᵀ G U_G), so that
    `init_second_moment` gives λ_G λ_Aᵀ = the diagonal of A ⊗ G in the old Kronecker
    eigenbasis (the best diagonal approximation of A ⊗ G in that basis). When `basis` is
    the eigenbasis of these same factors, this returns its eigenvalues. Like `eigenbasis`,
    the result is clamped at 0 and shifted by ``damping``. Matrix products only: O(d³), no
    host sync, no finiteness check (the caller's, e.g. `eigenbases`' input test).

    Args:
        factors: The layer's new Kronecker factors (same sizes as `basis`).
        basis: The basis to keep; its eigenvectors are reused (not copied).
        damping: Non-negative shift added to every projected eigenvalue.

    Returns:
        An `EigenBasis` with ``basis``'s U_A, U_G and the projected, clamped, damped scales.

    Raises:
        ValueError: If `damping` is negative or not finite, or sizes do not match.
    """
    _check_damping(damping)
    if factors.A.shape != basis.U_A.shape or factors.G.shape != basis.U_G.shape:
        raise ValueError(f"`factors` (A {tuple(factors.A.shape)}, G {tuple(factors.G.shape)}) must match the basis "
                         f"(U_A {tuple(basis.U_A.shape)}, U_G {tuple(basis.U_G.shape)}).")
    lams = []
    for m, u in ((factors.A, basis.U_A), (factors.G, basis.U_G)):
        lam = (u * (m.to(u) @ u)).sum(0).clamp_(min=0.0)
        lams.append(lam.add_(damping) if damping else lam)
    return EigenBasis(U_A=basis.U_A, U_G=basis.U_G, lam_A=lams[0], lam_G=lams[1])


def init_second_moment(basis: EigenBasis, num_locations: float = 1.0) -> Tensor:
    """The initial second moment m2 = num_locations · λ_G λ_Aᵀ, the diagonal of A ⊗ G in its eigenbasis.

    Args:
        basis: The eigenbasis.
        num_locations: Factor for layers whose factors are per-location means (the number of
            spatial locations of a Conv2d, as in the authors' code; 1 for Linear).

    Returns:
        m2, shape (d_out, d_in).

    Raises:
        ValueError: If `num_locations` is not positive.
    """
    if not num_locations > 0:
        raise ValueError(f"`num_locations` must be positive; got {num_locations!r}.")
    return torch.outer(basis.lam_G, basis.lam_A).mul_(num_locations)


def init_second_moments(bases: Sequence[EigenBasis | None],
                        num_locations: float | Sequence[float] = 1.0) -> list[Tensor | None]:
    """`init_second_moment` of many layers at once (None stays None), e.g. of `EigenRefresh.bases`.

    Layers with the same (d_out, d_in, dtype, device) get theirs from one batched outer
    product (the results are views of one stack per shape, so in-place updates such as
    `precondition_` stay per layer). No host sync.

    Args:
        bases: Per layer an eigenbasis, or None.
        num_locations: One factor for all layers, or one per layer (see `init_second_moment`).

    Returns:
        Per layer m2 = num_locations · λ_G λ_Aᵀ of shape (d_out, d_in), or None.

    Raises:
        ValueError: If a `num_locations` is not positive or their number does not match.
    """
    locs = [float(num_locations)] * len(bases) if isinstance(num_locations, int | float) else list(num_locations)
    if len(locs) != len(bases):
        raise ValueError(f"`num_locations` must have one entry per basis: got {len(locs)} for {len(bases)}.")
    if not all(n > 0 for n in locs):
        raise ValueError(f"`num_locations` must be positive; got {locs!r}.")
    grouped: dict[tuple[int, int, torch.dtype, torch.device], list[tuple[int, EigenBasis]]] = {}
    for i, b in enumerate(bases):
        if b is not None:
            grouped.setdefault((b.lam_G.shape[0], b.lam_A.shape[0], b.lam_A.dtype, b.lam_A.device), []).append((i, b))
    out: list[Tensor | None] = [None] * len(bases)
    for (_, _, dtype, device), members in grouped.items():
        idx = [i for i, _ in members]
        lam_g = torch.stack([b.lam_G for _, b in members])
        lam_a = torch.stack([b.lam_A for _, b in members])
        m2 = lam_g[:, :, None] * lam_a[:, None, :]
        if any(locs[i] != 1.0 for i in idx):
            m2.mul_(torch.tensor([locs[i] for i in idx], dtype=dtype, device=device)[:, None, None])
        for i, m in zip(idx, m2.unbind(0), strict=True):
            out[i] = m
    return out


def _check_grad(grad_mat: Tensor, basis: EigenBasis) -> None:
    shape = (basis.U_G.shape[0], basis.U_A.shape[0])
    if grad_mat.shape != shape:
        raise ValueError(f"`grad_mat` must have shape (d_out, d_in) = {shape} to match the eigenbasis; "
                         f"got {tuple(grad_mat.shape)}.")


def rotate(grad_mat: Tensor, basis: EigenBasis) -> Tensor:
    """Rotate a (d_out, d_in) matrix into the Kronecker eigenbasis: U_Gᵀ X U_A.

    Args:
        grad_mat: Matrix X, (d_out, d_in).
        basis: The eigenbasis.

    Returns:
        U_Gᵀ X U_A, in the basis' dtype.

    Raises:
        ValueError: If `grad_mat` has the wrong shape.
    """
    _check_grad(grad_mat, basis)
    x = grad_mat.to(basis.U_A)
    return basis.U_G.mT @ x @ basis.U_A


def unrotate(x: Tensor, basis: EigenBasis) -> Tensor:
    """Rotate back from the Kronecker eigenbasis: U_G X U_Aᵀ (the inverse of `rotate`).

    Args:
        x: Matrix in the eigenbasis, (d_out, d_in).
        basis: The eigenbasis.

    Returns:
        U_G X U_Aᵀ, in the basis' dtype.

    Raises:
        ValueError: If `x` has the wrong shape.
    """
    _check_grad(x, basis)
    return basis.U_G @ x.to(basis.U_A) @ basis.U_A.mT


def _check_hyper(m2: Tensor, basis: EigenBasis, alpha: float, eps: float, scale: float, power: float = 1.0) -> None:
    shape = (basis.U_G.shape[0], basis.U_A.shape[0])
    if m2.shape != shape:
        raise ValueError(f"`m2` must have shape (d_out, d_in) = {shape}; got {tuple(m2.shape)}.")
    if m2.dtype != basis.U_A.dtype:
        raise ValueError(f"`m2` must have the eigenbasis' dtype {basis.U_A.dtype}; got {m2.dtype}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]; got {alpha!r}.")
    if not 0.0 < eps < float("inf"):
        raise ValueError(f"`eps` must be a positive finite damping; got {eps!r}.")
    if not 0.0 <= scale < float("inf"):
        raise ValueError(f"`scale` must be a non-negative finite number; got {scale!r}.")
    if not 0.0 < power <= 1.0:
        raise ValueError(f"`power` must be in (0, 1]; got {power!r}.")


def precondition_(grad_mat: Tensor, basis: EigenBasis, m2: Tensor, *, alpha: float, eps: float,
                  scale: float = 1.0, power: float = 1.0) -> Tensor:
    """The eigen-corrected update, updating the running second moment `m2` in place.

    G̃ = U_Gᵀ ∇W U_A;  m2 ← α m2 + (1 − α) · scale · G̃²;  update = U_G (G̃ / (m2 + eps)^power) U_Aᵀ.
    ``power=1`` is EKFAC's natural-gradient scaling; ``power=0.5`` is Adam's, run in the Kronecker
    eigenbasis (as SOAP does in Shampoo's). Cost O(d_out d_in (d_out + d_in)).

    Args:
        grad_mat: ∇W, the (d_out, d_in) [W, b] gradient (`weight_grad_matrix`).
        basis: The layer's eigenbasis.
        m2: Running second moment, (d_out, d_in), in the basis' dtype; overwritten.
        alpha: Decay α ∈ [0, 1] of m2 (1 keeps m2 fixed).
        eps: Damping eps > 0 added to m2 before dividing.
        scale: Non-negative factor on G̃² in the m2 update (the batch size, in the authors' code).
        power: Exponent in (0, 1] of the scaling (m2 + eps).

    Returns:
        The update, (d_out, d_in), in `grad_mat`'s dtype.

    Raises:
        ValueError: On wrong shapes, α outside [0, 1], eps ≤ 0, a negative scale or power outside (0, 1].
    """
    _check_grad(grad_mat, basis)
    _check_hyper(m2, basis, alpha, eps, scale, power)
    g_rot = rotate(grad_mat, basis)
    m2.mul_(alpha).addcmul_(g_rot, g_rot, value=(1.0 - alpha) * scale)
    denom = m2 + eps
    if power != 1.0:
        denom.pow_(power)
    return unrotate(g_rot / denom, basis).to(grad_mat.dtype)


def precondition(grad_mat: Tensor, basis: EigenBasis, m2: Tensor, *, alpha: float, eps: float,
                 scale: float = 1.0, power: float = 1.0) -> tuple[Tensor, Tensor]:
    """The eigen-corrected update and the new second moment, leaving `m2` untouched (see `precondition_`).

    Args:
        grad_mat: ∇W, the (d_out, d_in) [W, b] gradient (`weight_grad_matrix`).
        basis: The layer's eigenbasis.
        m2: Running second moment, (d_out, d_in).
        alpha: Decay α ∈ [0, 1] of m2.
        eps: Damping eps > 0 added to m2 before dividing.
        scale: Non-negative factor on G̃² in the m2 update.
        power: Exponent in (0, 1] of the scaling (m2 + eps).

    Returns:
        ``(update, new_m2)``: the update in `grad_mat`'s dtype and α m2 + (1 − α) scale G̃².

    Raises:
        ValueError: On wrong shapes, α outside [0, 1], eps ≤ 0, a negative scale or power outside (0, 1].
    """
    new_m2 = m2.to(basis.U_A, copy=True)
    return precondition_(grad_mat, basis, new_m2, alpha=alpha, eps=eps, scale=scale, power=power), new_m2
