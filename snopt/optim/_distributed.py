"""Data-parallel SNOpt: factor all-reduce and distributed eigendecompositions (KAISA-style).

With the model wrapped in `torch.nn.parallel.DistributedDataParallel` (DDP), every rank
solves the ODEs of its own shard of the global batch, so every rank's `FactorCollector`
holds factors of its shard only. `DistributedCurvature` (created by `snopt.SNOpt` for a
DDP model over more than one rank, see its ``distributed`` argument) makes every rank
use the factors of the *global* batch and identical eigenbases, so that — DDP having
averaged the gradients — every rank takes bit-identical steps:

1. **Factor all-reduce, once per collection iteration.** Nothing is communicated while the
   solver runs (the collectors fold their statistics locally at every accepted step); at the
   refresh, the lower triangles of every layer's A and G (eigh reads only the lower
   triangle), the location counts and a few control numbers are packed into flat buckets
   (one per dtype/device, split at ``bucket_bytes``) and summed with one ``all_reduce`` per
   bucket. So the number of collectives per collection iteration depends on the model's
   factor sizes only, never on the number of solver steps or function evaluations.
2. **Exact scaling.** Each factor is a mean over rows (A = ∫ mean ā āᵀ dt; G = ∫ mean
   (B·g)(B·g)ᵀ dt, B·g being the per-sample cotangent whatever the batch size, since g is
   the cotangent of the rank's batch-mean loss). The single-process factors of the
   concatenated batch are therefore the row-weighted mean of the ranks' factors,
   ``A = Σ_r n_r A_r / Σ_r n_r`` with n_r = the rank's rows per evaluation (its local batch ×
   locations; ``rows / steps``), likewise G with its rows. No extra power of the batch size
   appears in G. The m2 update scale (``batch_size``: the authors' ``bs`` on G̃², where G̃
   rotates the gradient of the batch-mean loss, which DDP makes the global-batch-mean
   gradient) becomes the **global** batch size Σ_r B_r. Equal-sized shards and a
   deterministic (fixed-grid) solver then reproduce single-process training on the
   concatenated batch to round-off (verification/test_distributed_equivalence.py).
3. **Eigendecompositions assigned to ranks**, layer by layer, greedily by cost
   (d_in³ + d_out³, longest first, to the least-loaded rank: KAISA's LPT heuristic): each rank
   decomposes only its layers, then one ``all_gather`` per dtype/device group hands every
   rank every (U_A, U_G, λ_A, λ_G) — copies, so all ranks hold identical bases; m2 is
   initialised from them locally (identical inputs, identical results). Once ranks outnumber
   layers, a zero-filled ``all_reduce`` (each entry has exactly one non-zero contributor, so
   the sum is an exact copy) moves fewer bytes than the padded ``all_gather`` and is used
   instead; either way one collective per dtype/device group.
4. **Failures.** Each rank flags non-finite local statistics in the reduced bucket; if any
   rank flagged, every rank skips the whole refresh (previous bases kept, collectors reset,
   a `CurvatureWarning` naming the ranks) — no divergence. At construction every rank's layer
   set (names, kinds, sizes, dtypes) and settings are compared; a mismatch raises
   `ValueError` on every rank.

Adaptive solvers: with ``dopri5`` each rank's step sizes are chosen from its own shard, so
step counts (and the quadrature points of A and G) can differ between ranks and from a single
process on the whole batch. The factors are still well defined — each rank's A and G are
time integrals over the same [t0, t1] — and their mean is the global-batch factor with each
shard integrated on its own steps: equal to the single-process factor up to the solver's
quadrature error, not to round-off; ``steps`` of the reduced factors is then the mean over
ranks. Use a fixed-grid method (rk4 with ``step_size``) for rank-count-independent results.

Other limits: (a) every rank must call ``step`` at the same iterations with identical
gradients (DDP guarantees both; otherwise the collectives do not match and the process group's
timeout fires). (b) Factors are the exact row-weighted mean for any shard sizes, but DDP
averages the ranks' batch-mean gradients without weights, so equivalence with one process
needs equal shards (``DistributedSampler(..., drop_last=True)`` and a ``drop_last`` loader).
(c) Where a factor is rank-deficient with a repeated eigenvalue (e.g. fewer rows than d_in:
a 0-eigenspace), eigh's basis inside that eigenspace is arbitrary and the EKFAC second
moment m2 depends on it; round-off then picks different (equally valid) bases in one process
and in N, and training can differ beyond round-off. Ranks never differ from each other: they
all receive the same copy.

`allreduce_mean_` is the generic helper for other running quantities (e.g. a horizon
controller's statistics): in-place mean over ranks, bucketed, a no-op without a process group.
"""

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from snopt.curvature._eigen import CurvatureWarning, EigenBasis, eigenbases
from snopt.curvature._kron import KronFactors, TimeSharing
from snopt.curvature._layers import layer_dims
from snopt.optim._protocols import CurvatureOwner

BUCKET_BYTES = 25 * 2**20
"""Default cap on one all-reduce bucket (as DDP's ``bucket_cap_mb=25``)."""

ProcessGroup = Any
"""A ``torch.distributed`` process group (None: the default group)."""


def is_distributed(group: ProcessGroup = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in `group`."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of `tensors` grouped by (dtype, device), split so a bucket stays within `bucket_bytes`."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out: list[list[int]] = []
    for idx in groups.values():
        cur: list[int] = []
        size = 0
        for i in idx:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            if cur and size + nbytes > bucket_bytes:
                out.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += nbytes
        out.append(cur)
    return out


def allreduce_sum_(tensors: Sequence[Tensor], group: ProcessGroup = None, *,
                   bucket_bytes: int = BUCKET_BYTES) -> int:
    """Sum `tensors` over the ranks of `group`, in place, with one ``all_reduce`` per bucket.

    Tensors are flattened into contiguous buckets per (dtype, device) of at most
    `bucket_bytes` (a larger tensor gets a bucket of its own). Without an initialised
    process group (or with one rank) nothing happens.

    Args:
        tensors: Tensors to reduce; every rank must pass the same shapes, dtypes, order.
        group: Process group (default: the world).
        bucket_bytes: Cap on one bucket's size.

    Returns:
        The number of collective calls made.
    """
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    calls = 0
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        calls += 1
        offset = 0
        for i in bucket:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
            offset += n
    return calls


def allreduce_mean_(tensors: Sequence[Tensor], group: ProcessGroup = None, *,
                    bucket_bytes: int = BUCKET_BYTES) -> int:
    """Average `tensors` over the ranks of `group`, in place (bucketed; a no-op when not distributed).

    Meant for running statistics that each rank computes from its own shard (e.g. a horizon
    controller's F·g at t1): call it once per update on all of them together, *before* any
    nonlinear use (average F·g, then square it). Do not average quantities computed from
    DDP-synchronised gradients: they are identical already. Every rank must call it at the
    same point with the same shapes, dtypes and order.

    Args:
        tensors: Floating tensors to average in place.
        group: Process group (default: the world).
        bucket_bytes: Cap on one bucket's size.

    Returns:
        The number of collective calls made (0 when not distributed).

    Raises:
        TypeError: If a tensor is not floating point.
    """
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"allreduce_mean_ needs floating tensors; got {t.dtype}.")
    calls = allreduce_sum_(tensors, group, bucket_bytes=bucket_bytes)
    if calls:
        world = dist.get_world_size(group)
        for t in tensors:
            t.div_(world)
    return calls


def assign_layers(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment of layers to ranks.

    Layers in order of decreasing cost (ties: lower index first) go to the rank with the
    least total cost so far (ties: lower rank). Deterministic, so every rank computes the
    same assignment.

    Args:
        costs: Cost of each layer (e.g. d_in³ + d_out³ for its two eigendecompositions).
        world_size: Number of ranks (≥ 1).

    Returns:
        The owning rank of each layer.

    Raises:
        ValueError: If `world_size` < 1.
    """
    if world_size < 1:
        raise ValueError(f"`world_size` must be ≥ 1; got {world_size}.")
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += costs[i]
    return owner


@dataclass
class CommStats:
    """What the latest refresh communicated (per rank, logical payload sizes).

    Attributes:
        allreduce_calls: ``all_reduce`` calls (factor buckets).
        allreduce_bytes: Bytes each rank passed to them.
        bases_calls: Collective calls sharing the eigenbases (one per dtype/device group).
        bases_bytes: Bytes each rank passed to them.
        bases_method: ``"all_gather"`` (each rank's own layers, padded to the largest share) or
            ``"all_reduce"`` (a zero-filled buffer of all layers; cheaper once ranks outnumber layers).
        eigh_layers: Layers this rank eigendecomposed.
        total_calls: Collective calls since construction (the construction check excluded).
    """

    allreduce_calls: int = 0
    allreduce_bytes: int = 0
    bases_calls: int = 0
    bases_bytes: int = 0
    bases_method: str = ""
    eigh_layers: int = 0
    total_calls: int = 0


@dataclass
class _LayerSpec:
    index: int
    collector: int
    name: str
    d_in: int
    d_out: int
    dtype: torch.dtype
    device: torch.device
    reduce_mode: bool
    tril_in: Tensor = field(repr=False)
    tril_out: Tensor = field(repr=False)

    @property
    def eig_numel(self) -> int:
        return self.d_in * self.d_in + self.d_out * self.d_out + self.d_in + self.d_out

    @property
    def cost(self) -> float:
        return float(self.d_in) ** 3 + float(self.d_out) ** 3


_NUM_COUNTS = 6  # n_A·weight, n_A, n_G, rows_a, rows_g, steps


def _tril_unpack(vals: Tensor, idx: Tensor, d: int) -> Tensor:
    m = torch.zeros(d, d, dtype=vals.dtype, device=vals.device)
    m[idx[0], idx[1]] = vals
    m[idx[1], idx[0]] = vals
    return m


class DistributedCurvature:
    """The distributed part of `snopt.SNOpt`'s refresh (see the module docstring).

    Created by `SNOpt.__init__` (argument ``distributed``); its `refresh` replaces the
    single-process refresh. Construction is collective (all ranks, same point).

    Args:
        opt: The optimizer (a `SNOpt`) whose layers and collectors to synchronise.
        group: Process group (default: the world).
        bucket_bytes: Cap on one all-reduce bucket.

    Attributes:
        rank: This process' rank in `group`.
        world_size: Number of ranks.
        owners: Rank that eigendecomposes each of ``opt.layers``.
        share: How eigenbases travel: ``"auto"`` (the cheaper of the two below), ``"all_gather"``
            or ``"all_reduce"`` (see `CommStats.bases_method`).
        stats: `CommStats` of the latest refresh.
        last_factors: The reduced (global-batch) factors of the latest refresh, keyed by
            (collector index, layer name); for tests and diagnostics.

    Raises:
        RuntimeError: If ``torch.distributed`` is not initialised.
        ValueError: If the ranks' layer sets or settings differ (raised on every rank).
    """

    def __init__(self, opt: CurvatureOwner, group: ProcessGroup = None, *, bucket_bytes: int = BUCKET_BYTES) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("SNOpt(distributed=True) needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group, e.g. under torchrun).")
        self.group = group
        self.bucket_bytes = bucket_bytes
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        cidx = {id(c): i for i, c in enumerate(opt.collectors)}
        self.specs: list[_LayerSpec] = []
        for i, layer in enumerate(opt.layers):
            d_in, d_out = layer_dims(layer.module)
            w = layer.weight
            self.specs.append(_LayerSpec(
                index=i, collector=cidx[id(layer.collector)], name=layer.name, d_in=d_in, d_out=d_out,
                dtype=w.dtype, device=w.device, reduce_mode=layer.collector.time_sharing is TimeSharing.REDUCE,
                tril_in=torch.tril_indices(d_in, d_in, device=w.device),
                tril_out=torch.tril_indices(d_out, d_out, device=w.device)))
        self._num_collectors = len(opt.collectors)
        self._check_same_layers(opt)
        self.owners = assign_layers([s.cost for s in self.specs], self.world_size)
        self.share = "auto"
        self.stats = CommStats()
        self.last_factors: dict[tuple[int, str], KronFactors] = {}
        self._total_calls = 0

    # -- construction check ------------------------------------------------------------------
    def _signature(self, opt: CurvatureOwner) -> list[str]:
        lines = [f"update_freq={opt.update_freq} sampling={opt.sampling} collectors="
                 + ",".join(f"{c.mode}/{c.time_sharing.value}" for c in opt.collectors)]
        lines += [f"{s.collector}:{s.name}:{type(opt.layers[s.index].module).__name__}:{s.d_in}x{s.d_out}:"
                  f"{s.dtype}:{s.device.type}" for s in self.specs]
        return lines

    def _check_same_layers(self, opt: CurvatureOwner) -> None:
        sig = self._signature(opt)
        digest = int.from_bytes(hashlib.sha256("\n".join(sig).encode()).digest()[:7], "big")
        device = self.specs[0].device if self.specs else torch.device("cpu")
        mine = torch.tensor([digest, len(sig)], dtype=torch.int64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.group)
        if all(bool(torch.equal(e, mine)) for e in everyone):
            return
        sigs: list[Any] = [None] * self.world_size
        dist.all_gather_object(sigs, sig, group=self.group)
        ref = sigs[0]
        diffs = []
        for r, s in enumerate(sigs):
            if s != ref:
                only_r = [x for x in s if x not in ref][:5]
                only_0 = [x for x in ref if x not in s][:5]
                diffs.append(f"rank {r} vs rank 0: only on rank {r}: {only_r}; only on rank 0: {only_0}")
        raise ValueError("SNOpt (distributed): the preconditioned layers or settings differ between ranks "
                         "(every rank must build the same model and optimizer): " + "; ".join(diffs))

    # -- refresh -----------------------------------------------------------------------------
    def _local_factors(self, opt: CurvatureOwner) -> list[KronFactors | None]:
        per_collector = [c.kron_factors() for c in opt.collectors]
        out: list[KronFactors | None] = []
        for s in self.specs:
            f = per_collector[s.collector].get(s.name)
            out.append(f if f is not None and f.steps > 0 and bool(f.weight > 0) else None)
        return out

    def reduce_factors(self, opt: CurvatureOwner) -> tuple[list[KronFactors | None], list[float], list[int]]:
        """All-reduce every layer's factors (collective; see the module docstring).

        Args:
            opt: The optimizer whose collectors hold this rank's factors.

        Returns:
            ``(factors, batch_sizes, bad_ranks)``: the global factors per layer of ``opt.layers``
            (None where no rank has data), the global batch size per collector, and the ranks
            that saw non-finite statistics (when non-empty the factors are not to be used).
        """
        local = self._local_factors(opt)
        bufs: list[Tensor] = []
        ctl_dtype = self.specs[0].dtype if self.specs else torch.float64
        ctl_device = self.specs[0].device if self.specs else torch.device("cpu")
        bad = torch.zeros((), dtype=torch.bool, device=ctl_device)  # a tensor: no host sync per layer
        for s, f in zip(self.specs, local, strict=True):
            tri_a = torch.zeros(s.tril_in.shape[1], dtype=s.dtype, device=s.device)
            tri_g = torch.zeros(s.tril_out.shape[1], dtype=s.dtype, device=s.device)
            counts = torch.zeros(_NUM_COUNTS, dtype=s.dtype, device=s.device)
            if f is not None:
                a = f.A.to(dtype=s.dtype, device=s.device)
                g = f.G.to(dtype=s.dtype, device=s.device)
                bad |= (~torch.isfinite(a).all() | ~torch.isfinite(g).all()).to(ctl_device)
                per_eval = 1 if s.reduce_mode else max(f.steps, 1)
                n_a, n_g = f.rows_a / per_eval, f.rows_g / per_eval
                tri_a = a[s.tril_in[0], s.tril_in[1]].mul_(n_a)
                tri_g = g[s.tril_out[0], s.tril_out[1]].mul_(n_g)
                counts = torch.tensor([n_a * float(f.weight), n_a, n_g, f.rows_a, f.rows_g, f.steps],
                                      dtype=s.dtype, device=s.device)
            bufs += [tri_a, tri_g, counts]
        control = torch.zeros(self._num_collectors + self.world_size, dtype=ctl_dtype, device=ctl_device)
        for i, c in enumerate(opt.collectors):
            control[i] = float(c.batch_size)
        control[self._num_collectors + self.rank] = bad.to(ctl_dtype)
        bufs.append(control)
        calls = allreduce_sum_(bufs, self.group, bucket_bytes=self.bucket_bytes)
        self.stats.allreduce_calls = calls
        self.stats.allreduce_bytes = sum(b.numel() * b.element_size() for b in bufs) if calls else 0
        batch_sizes = [float(x) for x in control[:self._num_collectors].tolist()]
        bad_ranks = [r for r, x in enumerate(control[self._num_collectors:].tolist()) if x > 0]
        out: list[KronFactors | None] = []
        for k, s in enumerate(self.specs):
            tri_a, tri_g, counts = bufs[3 * k], bufs[3 * k + 1], bufs[3 * k + 2]
            wn_a, n_a, n_g, rows_a, rows_g, steps = counts.tolist()
            if not (n_a > 0 and n_g > 0 and wn_a > 0):
                out.append(None)
                continue
            out.append(KronFactors(
                A=_tril_unpack(tri_a.div_(n_a), s.tril_in, s.d_in),
                G=_tril_unpack(tri_g.div_(n_g), s.tril_out, s.d_out),
                weight=torch.tensor(wn_a / n_a, dtype=s.dtype, device=s.device),
                steps=round(steps / self.world_size), rows_a=round(rows_a), rows_g=round(rows_g)))
        return out, batch_sizes, bad_ranks

    def _share_plan(self, specs: list[_LayerSpec]) -> tuple[str, list[int], int]:
        """How one dtype/device group's eigenbases travel: method, each layer's offset, buffer length.

        ``all_gather`` of each rank's own layers (padded to the largest rank's share P_max) moves
        (N − 1)·P_max per rank; ``all_reduce`` of a zero-filled buffer of every layer (each entry
        written by its owner alone, so the sum is an exact copy) moves 2(N − 1)/N·total. The
        cheaper one is taken (all_gather for few ranks, all_reduce once ranks outnumber layers).
        """
        sizes = [0] * self.world_size
        offsets: list[int] = []
        for s in specs:
            offsets.append(sizes[self.owners[s.index]])
            sizes[self.owners[s.index]] += s.eig_numel
        total, width = sum(sizes), max(sizes)
        if self.share == "all_gather" or (self.share == "auto" and self.world_size * width <= 2 * total):
            return "all_gather", offsets, width
        flat_offsets, pos = [], 0
        for s in specs:
            flat_offsets.append(pos)
            pos += s.eig_numel
        return "all_reduce", flat_offsets, total

    def _gather_bases(self, factors: list[KronFactors | None], damping: float) -> list[EigenBasis | None]:
        groups: dict[tuple[torch.dtype, torch.device], list[_LayerSpec]] = {}
        for s in self.specs:
            groups.setdefault((s.dtype, s.device), []).append(s)
        bases: list[EigenBasis | None] = [None] * len(self.specs)
        self.stats.bases_calls = self.stats.bases_bytes = self.stats.eigh_layers = 0
        # this rank's layers in one batched refresh; every owned factor gets a basis (non-finite ones were
        # caught by the reduction's flags, so the identity fallback only guards against eigh failures)
        owned = eigenbases([f if self.owners[s.index] == self.rank else None for s, f in zip(
            self.specs, (factors[s.index] for s in self.specs), strict=True)],
            damping=damping, on_nonfinite="identity", skip_empty=False).bases
        for (dtype, device), specs in groups.items():
            method, offsets, length = self._share_plan(specs)
            mine = torch.zeros(length, dtype=dtype, device=device)
            for s, off in zip(specs, offsets, strict=True):
                f = factors[s.index]
                b = owned[s.index]
                if self.owners[s.index] == self.rank and f is not None and b is not None:
                    self.stats.eigh_layers += 1
                    mine[off:off + s.eig_numel] = torch.cat(
                        [b.U_A.reshape(-1), b.U_G.reshape(-1), b.lam_A, b.lam_G]).to(dtype)
            everyone = [mine] * self.world_size
            if self.world_size > 1:
                if method == "all_gather":
                    everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
                    dist.all_gather(everyone, mine, group=self.group)
                else:
                    dist.all_reduce(mine, op=dist.ReduceOp.SUM, group=self.group)
                self.stats.bases_calls += 1
                self.stats.bases_bytes += mine.numel() * mine.element_size()
                self.stats.bases_method = method
            for s, off in zip(specs, offsets, strict=True):
                if factors[s.index] is None:
                    continue
                flat = everyone[self.owners[s.index]][off:off + s.eig_numel]
                da, dg = s.d_in, s.d_out
                u_a, u_g = flat[:da * da], flat[da * da:da * da + dg * dg]
                lam_a, lam_g = flat[da * da + dg * dg:da * da + dg * dg + da], flat[da * da + dg * dg + da:]
                bases[s.index] = EigenBasis(U_A=u_a.reshape(da, da).clone(), U_G=u_g.reshape(dg, dg).clone(),
                                            lam_A=lam_a.clone(), lam_G=lam_g.clone())
        return bases

    def refresh(self, opt: CurvatureOwner) -> None:
        """The distributed refresh: reduce factors, decompose this rank's layers, share the bases (collective)."""
        factors, batch_sizes, bad_ranks = self.reduce_factors(opt)
        calls = self.stats.allreduce_calls
        if bad_ranks:
            self.stats.bases_calls = self.stats.bases_bytes = self.stats.eigh_layers = 0
            warnings.warn(f"Non-finite Kronecker factors on rank(s) {bad_ranks}: every rank skips this refresh "
                          "(previous eigenbases and m2 kept).", CurvatureWarning, stacklevel=4)
        else:
            self.last_factors = {(s.collector, s.name): f
                                 for s, f in zip(self.specs, factors, strict=True) if f is not None}
            factors = opt.blend(factors)  # the same reduced factors on every rank: the same averages
            bases = self._gather_bases(factors, opt.damping)
            calls += self.stats.bases_calls
            opt.install(factors, bases, [float(batch_sizes[spec.collector]) for spec in self.specs])
        self._total_calls += calls
        self.stats.total_calls = self._total_calls
        for c in opt.collectors:
            c.reset()


def make_distributed(opt: CurvatureOwner, distributed: bool | None,
                     model: nn.Module | None = None) -> DistributedCurvature | None:
    """The `DistributedCurvature` for `opt`, or None (SNOpt's ``distributed`` argument).

    Args:
        opt: The optimizer (its layers and collectors already built).
        distributed: None: on when `model` is a `DistributedDataParallel` whose process group
            has more than one rank (a plain model in an initialised process group stays local);
            True: on, over DDP's process group or else the default group (needs an initialised
            process group; one rank is allowed); False: off.
        model: The model given to SNOpt.

    Returns:
        The synchroniser, or None for single-process behaviour.

    Raises:
        RuntimeError: If `distributed` is True without an initialised process group.
        ValueError: If the ranks' layer sets differ.
    """
    if distributed is False:
        return None
    group: ProcessGroup = None
    if isinstance(model, nn.parallel.DistributedDataParallel):
        group = model.process_group
    elif distributed is None:
        return None
    if distributed is None and not is_distributed(group):
        return None
    return DistributedCurvature(opt, group)


__all__ = ["BUCKET_BYTES", "CommStats", "DistributedCurvature", "allreduce_mean_", "allreduce_sum_",
           "assign_layers", "is_distributed", "make_distributed"]
