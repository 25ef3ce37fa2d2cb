"""`SNOpt`: the eigen-corrected Kronecker preconditioner with factors from the adjoint solve."""

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from snopt._checks import ADAPTIVE_METHODS
from snopt.curvature._collector import FactorCollector
from snopt.curvature._eigen import EigenBasis, eigenbases, init_second_moments, precondition_, rotate
from snopt.curvature._kron import KronFactors, blend_factors
from snopt.curvature._layers import set_weight_grad_matrix, weight_grad_matrix
from snopt.nn._ode_block import ODEBlock
from snopt.optim._distributed import make_distributed
from snopt.optim._protocols import KronLayerRef as _Layer
from snopt.optim._recovery import StepRecovery, all_finite


class SNOpt(torch.optim.Optimizer):
    """SNOpt (Liu et al. 2021): EKFAC-preconditioned steps with Kronecker factors integrated over time.

    Wraps any base optimizer. Every `update_freq` steps the backward pass collects, for every
    nn.Linear / nn.Conv2d inside each `snopt.ODEBlock`'s vector field, A = ∫E[āāᵀ]dt and
    G = ∫E[ggᵀ]dt from the evaluations the adjoint solve already makes (no extra function
    evaluations, nothing stored per step; see `snopt.curvature.FactorCollector`), and — with
    `full_precond` — ordinary KFAC factors for Linear/Conv2d layers outside ODE blocks.
    `step` then refreshes the eigenbases (A = U_A Λ_A U_Aᵀ, G = U_G Λ_G U_Gᵀ) and resets the
    second moment m2 = λ_G λ_Aᵀ. Every step rotates each layer's [W, b] gradient into its
    eigenbasis, updates m2 ← α m2 + (1 − α)·B·G̃², divides by (m2 + eps), rotates back, and
    lets the base optimizer step. Other parameters pass through to the base untouched.

    Hyper-parameters `eps` and `alpha` live in the (shared) param groups under the keys
    ``"snopt_eps"`` and ``"snopt_alpha"`` (not ``"eps"``/``"alpha"``, which Adam, Adagrad and
    RMSprop use for their own settings), so LR schedulers and per-group settings work, e.g.
    ``SGD([{"params": ..., "lr": 0.1, "snopt_eps": 0.01}, ...])``; `state_dict` holds the
    eigenbases, m2, the step counter and the base optimizer's state.

    Args:
        model: The model (its ODEBlocks and layers are found by `modules()`).
        base: The base optimizer over (some of) `model`'s parameters (default:
            ``SGD(model's trainable parameters, lr=SNOpt.DEFAULT_LR, momentum=0.9)``).
        eps: Damping added to m2 (> 0). Default 3e-3, with `update_freq` 10, `kl_clip` 1e-2
            (scope ``"step"``) and the default base: the setting with the smallest worst-case
            slowdown over eight applications in ``benchmarks/results/defaults.md``.
        update_freq: Steps between factor refreshes (≥ 1); iterations in between are plain
            adjoint solves that only apply the current preconditioner.
        alpha: Decay of m2 in [0, 1].
        full_precond: Also precondition Linear/Conv2d layers outside ODE blocks.
        damping: Extra shift added to the factors' eigenvalues (≥ 0).
        time_sharing: ``"expand"`` (the paper) or ``"reduce"`` for layers inside ODE blocks.
        sampling: ``"steps"`` (statistics at the adjoint's accepted steps, weight dt: no extra
            work) or ``"grid"`` (the paper's fixed grid t0 + k·h, weight h; the backward solve is
            made to stop at every grid point on collection iterations, which costs steps).
        grid_h: Grid spacing for ``sampling="grid"`` (the paper's 0.01).
        distributed: Data-parallel (DDP) mode: factors all-reduced once per collection
            iteration, eigendecompositions shared out across ranks (`snopt.optim._distributed`).
            None: on when `model` is a DistributedDataParallel over more than one rank.
        kl_clip: Trust region on the preconditioned step (KFAC's "KL clipping", Ba et al. 2017):
            the Kronecker layers' updates u (F̃u = ∇W, F̃ = Q diag(m2 + eps) Qᵀ) are all scaled by
            ν = min(1, √(kl_clip / Σ lr²⟨u, ∇W⟩)), so the base step Δθ = −lr·ν·u has a predicted
            change Σ ΔθᵀF̃Δθ ≤ kl_clip (with plain SGD; momentum then accumulates clipped steps).
            Where it binds (ν < 1), lr·ν = √(kl_clip / Σ⟨u, ∇W⟩): the step does not depend on lr,
            which then only scales the parameters outside the Kronecker layers (and weight decay).
            None (the paper's algorithm): no clipping. The last ν is in `last_clip`.
        kl_clip_scope: What the trust region bounds. ``"increment"`` (above; KFAC's KL clipping):
            each preconditioned increment, before the base optimizer's momentum sums them, so
            with momentum μ a steady step's predicted change can reach kl_clip / (1 − μ)².
            ``"step"``: the whole step the base optimizer takes on the Kronecker layers,
            momentum and weight decay included. After the base step, Δθ (their [W, b] change)
            is measured; where q = Σ ΔθᵀF̃Δθ > kl_clip they are moved back to θ + ν·Δθ with
            ν = √(kl_clip / q), and SGD's momentum buffers of those parameters are scaled by ν
            too, so the velocity carried forward is the step taken (a velocity clip). Other
            parameters' steps are left as the base optimizer made them.
        power: Exponent of the eigen-corrected scaling: the update is U_G (G̃ / (m2 + eps)^power) U_Aᵀ.
            1 (default): EKFAC's natural-gradient step; 0.5: Adam's scaling run in SNOpt's eigenbasis
            (as SOAP does in Shampoo's). The trust region measures steps in the same metric.
        factor_decay: Running average of the Kronecker factors over refreshes, A ← ρ·A_prev +
            (1 − ρ)·A_new (KFAC's; 0: each refresh uses only what it just collected, as the paper).
            It keeps one batch the model already fits (G ≈ 0) from replacing the curvature.
        refresh_guard: Refuse, per layer, a refresh whose curvature collapsed: where the new
            tr(A)·tr(G) (= Σλ_A·Σλ_G) is below ``refresh_guard`` × that of the layer's current basis,
            the layer keeps its basis and m2 (and its factor average) and the refusal is counted in
            `refused_refreshes`. The empirical Fisher of a batch the model already fits is ≈ 0;
            installed, it leaves eps alone to bound the step, and the next batches' loss jumps
            (measured on digits: a refresh with ratio 0.006–0.04 was followed by a loss of 3–61 from
            ≤ 0.004; ordinary refreshes have ratios ≥ 0.14; ``benchmarks/results/defaults_side_by_side.md``).
            Compared with the layer's last *installed* curvature, so a run of fitted batches is
            refused throughout (the old, larger curvature gives the smaller step; m2 keeps tracking
            the gradients every step). None or 0: off (every refresh installed, as the paper).
        recovery: Undo a step that breaks a solve instead of ending the run
            (`snopt.optim.StepRecovery`): a forward or backward `SolverError`, a non-finite model
            output or gradient at the parameters a step produced restores the parameters and
            the optimizer state exactly, scales later steps down (``opt.recovery.stats``), and
            training goes on; the user's loop never sees the failure. Costs one copy of the
            parameters and optimizer state per step. False: failures raise as they occur.

    Raises:
        ValueError: On invalid hyper-parameters, or a model with nothing to precondition.

    Example:
        >>> opt = SNOpt(model)  # doctest: +SKIP
        >>> for x, y in loader:  # doctest: +SKIP
        ...     opt.zero_grad(); loss = crit(model(x), y); loss.backward(); opt.step()
    """

    DEFAULT_LR = 0.1
    """Learning rate of the default base, ``SGD(trainable parameters, lr=0.1, momentum=0.9)``."""

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer | None = None, *, eps: float = 3e-3,
                 update_freq: int = 10, alpha: float = 0.75, full_precond: bool = True, damping: float = 0.0,
                 time_sharing: str = "expand", sampling: str = "steps", grid_h: float = 0.01,
                 distributed: bool | None = None, kl_clip: float | None = 1e-2,
                 kl_clip_scope: str = "step", power: float = 1.0, factor_decay: float = 0.0,
                 refresh_guard: float | None = 0.1, recovery: bool = True) -> None:
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"Invalid kl_clip: {kl_clip} (must be > 0, or None for no clipping)")
        if kl_clip_scope not in ("increment", "step"):
            raise ValueError(f"Invalid kl_clip_scope: {kl_clip_scope!r} (must be 'increment' or 'step')")
        if not eps > 0:
            raise ValueError(f"Invalid eps: {eps} (must be > 0)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha} (must be in [0, 1])")
        if not isinstance(update_freq, int) or update_freq < 1:
            raise ValueError(f"Invalid update_freq: {update_freq} (must be an integer ≥ 1)")
        if not 0.0 <= factor_decay < 1.0:
            raise ValueError(f"Invalid factor_decay: {factor_decay} (must be in [0, 1))")
        if refresh_guard is not None and not 0.0 <= refresh_guard < 1.0:
            raise ValueError(f"Invalid refresh_guard: {refresh_guard} (must be in [0, 1), or None for off)")
        if not 0.0 < power <= 1.0:
            raise ValueError(f"Invalid power: {power} (must be in (0, 1])")
        if not damping >= 0:
            raise ValueError(f"Invalid damping: {damping} (must be ≥ 0)")
        if sampling not in ("steps", "grid"):
            raise ValueError(f"Invalid sampling: {sampling!r} (must be 'steps' or 'grid')")
        if not grid_h > 0:
            raise ValueError(f"Invalid grid_h: {grid_h} (must be > 0)")
        if time_sharing not in ("expand", "reduce"):
            raise ValueError(f"Invalid time_sharing: {time_sharing!r} (must be 'expand' or 'reduce')")
        if base is None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            if not trainable:
                raise ValueError("`model` has no trainable parameters for SNOpt's default base optimizer.")
            base = torch.optim.SGD(trainable, lr=self.DEFAULT_LR, momentum=0.9)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"`base` must be a torch.optim.Optimizer; got {type(base).__name__}.")
        self.base = base
        self.update_freq = update_freq
        self.damping = damping
        self.kl_clip = kl_clip
        self.kl_clip_scope = kl_clip_scope
        self.power = power
        self.factor_decay = float(factor_decay)
        self.refresh_guard = float(refresh_guard or 0.0)
        self.refused_refreshes = 0
        """Layer refreshes refused by `refresh_guard` so far (in `state_dict`)."""
        self._groups: dict[int, dict[str, Any]] = {}
        super().__init__(base.param_groups, {"snopt_eps": eps, "snopt_alpha": alpha})
        self.param_groups = base.param_groups
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        self.collectors: list[FactorCollector] = []
        ode_layers: set[nn.Module] = set()
        self.blocks: list[ODEBlock] = [m for m in model.modules() if isinstance(m, ODEBlock)]
        self.sampling = sampling
        self.grid_h = grid_h
        for block in self.blocks:
            if sampling == "grid" and block.method not in ADAPTIVE_METHODS:
                raise ValueError(f"sampling='grid' needs an adaptive method; block uses {block.method!r}: "
                                 f"use sampling='steps' with options={{'step_size': {grid_h}}} instead.")
            c = FactorCollector(block.func, mode="ode", time_sharing=time_sharing)
            if sampling == "grid":
                c.grid_h, c.grid_t0 = grid_h, float(block.t0.detach())
            block.observer = c
            self.collectors.append(c)
            ode_layers.update(c.layers.values())
        if full_precond:
            self.collectors.append(FactorCollector(model, mode="static", exclude=ode_layers))
        self.layers: list[_Layer] = [
            _Layer(c, name, m, m.weight) for c in self.collectors for name, m in c
            if isinstance(m.weight, Tensor) and id(m.weight) in owned]
        if not self.layers:
            raise ValueError("`model` has no nn.Linear/nn.Conv2d layer (inside an ODEBlock, or anywhere with "
                             "full_precond=True) whose weight `base` optimises: nothing to precondition.")
        self._k = 0
        self.last_clip = 1.0
        self._set_collecting(True)
        # distributed (DDP): factor all-reduce + per-rank eigendecompositions, see snopt.optim._distributed
        self._dist = make_distributed(self, distributed, model)
        self.recovery: StepRecovery | None = None
        if recovery:
            self.recovery = StepRecovery(self, model, distributed=self._dist is not None,
                                         group=self._dist.group if self._dist is not None else None)
            for block in self.blocks:
                block.guard = self.recovery

    def _set_collecting(self, on: bool) -> None:
        for c in self.collectors:
            c.enabled = on
        # A block reports its backward steps only while its collector gathers: a plain iteration's adjoint is
        # then exactly a plain adjoint (no callbacks, no step pinned to the interval's end).
        for block, c in zip(self.blocks, self.collectors, strict=False):
            block.observer = c if on else None
        if self.sampling == "grid":
            for block in self.blocks:
                block.adjoint_options = self._grid_options(block) if on else None

    def _grid_options(self, block: ODEBlock) -> dict[str, Any]:
        t0, t1 = float(block.t0.detach()), float(block.t1.detach())
        n = int(round((t1 - t0) / self.grid_h))
        grid = t0 + self.grid_h * torch.arange(0, n + 1, dtype=torch.float64)
        opts = {k: v for k, v in block.options.items() if k != "norm"}
        opts["step_t"] = grid[(grid > t0) & (grid < t1)]
        return opts

    def _grads_finite(self) -> bool:
        return all_finite([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None])

    def counters(self) -> dict[str, Any]:
        """The scalars a step changes: the step count, the last trust-region factor, the refused refreshes."""
        return {"step": self._k, "last_clip": self.last_clip, "refused_refreshes": self.refused_refreshes}

    def restore_counters(self, counters: dict[str, Any]) -> None:
        """Set the step count and trust-region factor back (an undone step) and reset the collectors.

        Args:
            counters: As returned by `counters` before the step.
        """
        self._k = int(counters["step"])
        self.last_clip = float(counters["last_clip"])
        self.refused_refreshes = int(counters.get("refused_refreshes", self.refused_refreshes))
        for c in self.collectors:
            c.reset()
        self._set_collecting(self._k % self.update_freq == 0)

    def _refresh(self) -> None:
        if self._dist is not None:  # distributed refresh (snopt.optim._distributed)
            self._dist.refresh(self)
            return
        # One batched eigh per factor size and one host sync for the whole refresh (snopt.curvature.eigenbases);
        # a layer without data, or with non-finite factors (a CurvatureWarning), keeps its previous basis.
        factors = {id(c): c.kron_factors() for c in self.collectors}
        blended = self.blend([factors[id(layer.collector)].get(layer.name) for layer in self.layers])
        refresh = eigenbases(blended, damping=self.damping, names=[layer.name for layer in self.layers])
        self.install(blended, refresh.bases, [float(layer.collector.batch_size) for layer in self.layers])
        for c in self.collectors:
            c.reset()

    def install(self, factors: list[KronFactors | None], bases: list[EigenBasis | None],
                batch_sizes: list[float]) -> None:
        """Install a refresh per layer (in `layers`' order): basis, m2 = λ_G λ_Aᵀ, factor average.

        A layer whose factors or basis is None keeps its state, and so does one whose new
        curvature Σλ_A·Σλ_G falls below `refresh_guard` × its current one (counted in
        `refused_refreshes`; the comparison costs one host sync for all layers).

        Args:
            factors: The (blended) factors of the refresh, or None per layer.
            bases: Their eigenbases, or None per layer.
            batch_sizes: Per layer, the batch size its statistics were gathered on.
        """
        accept = [f is not None and b is not None for f, b in zip(factors, bases, strict=True)]
        if self.refresh_guard > 0.0:
            checked: list[tuple[int, Tensor]] = []  # (layer index, new curvature ≥ guard × installed one)
            for i, (layer, b) in enumerate(zip(self.layers, bases, strict=True)):
                st = self.state.get(layer.weight, {})
                if b is not None and accept[i] and "lam_A" in st:
                    ok = b.lam_A.sum() * b.lam_G.sum() >= self.refresh_guard * (st["lam_A"].sum() * st["lam_G"].sum())
                    checked.append((i, ok.reshape(1)))
            if checked:
                device = checked[0][1].device
                keep = torch.cat([ok.to(device) for _, ok in checked]).tolist()  # one host sync for all layers
                for (i, _), kept in zip(checked, keep, strict=True):
                    if not kept:
                        accept[i] = False
                        self.refused_refreshes += 1
        for layer, f, basis, m2, bs, ok in zip(self.layers, factors, bases, init_second_moments(bases),
                                               batch_sizes, accept, strict=True):
            if not ok or basis is None or m2 is None or f is None:
                continue
            st = self.state[layer.weight]
            st.update({"U_A": basis.U_A, "U_G": basis.U_G, "lam_A": basis.lam_A, "lam_G": basis.lam_G, "m2": m2,
                       "batch_size": float(bs)})
            if self.factor_decay > 0.0:
                st.update({"A_avg": f.A, "G_avg": f.G})

    def blend(self, factors: list[KronFactors | None]) -> list[KronFactors | None]:
        """Per layer (in `layers`' order), the new factors averaged with the last refresh's (`factor_decay`)."""
        if self.factor_decay == 0.0:
            return factors
        out: list[KronFactors | None] = []
        for layer, f in zip(self.layers, factors, strict=True):
            st = self.state.get(layer.weight, {})
            prev = (st["A_avg"], st["G_avg"]) if "A_avg" in st else None
            out.append(None if f is None else blend_factors(f, prev, self.factor_decay))
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Precondition the gradients of the Kronecker layers, then step the base optimizer.

        Args:
            closure: Optional closure re-evaluating the loss (run with grad enabled).

        Returns:
            The closure's loss, if a closure was given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rec = self.recovery
        if not self._grads_finite():
            if rec is not None and rec.gradient_failure():  # the previous step is undone
                return loss
            warnings.warn("Non-finite gradient: SNOpt step skipped (parameters, factors and m2 unchanged).",
                          RuntimeWarning, stacklevel=2)
            for c in self.collectors:
                c.reset()
            return loss
        if rec is not None:
            rec.validate()  # the previous step gave a finite forward and backward pass
            rec.capture()
        if self._k % self.update_freq == 0:
            self._refresh()
        updates: list[tuple[_Layer, Tensor, Tensor]] = []  # (layer, ∇W, u)
        self._groups = {id(p): g for g in self.param_groups for p in g["params"]}
        for layer in self.layers:
            st = self.state[layer.weight]
            if "m2" not in st or layer.weight.grad is None:
                continue
            group = self._groups[id(layer.weight)]
            grad_mat = weight_grad_matrix(layer.module)
            update = precondition_(grad_mat, self._basis(layer), st["m2"],
                                   alpha=float(group["snopt_alpha"]), eps=float(group["snopt_eps"]),
                                   scale=float(st["batch_size"]), power=self.power)
            updates.append((layer, grad_mat, update))
        if self.kl_clip is not None and self.kl_clip_scope == "step":
            self._clipped_base_step(updates)
        else:
            self._increment_clipped_base_step(updates)
        self._k += 1
        self._set_collecting(self._k % self.update_freq == 0)
        if rec is not None:
            rec.after_step()
        return loss

    def _basis(self, layer: _Layer) -> EigenBasis:
        st = self.state[layer.weight]
        return EigenBasis(U_A=st["U_A"], U_G=st["U_G"], lam_A=st["lam_A"], lam_G=st["lam_G"])

    def _quad(self, layer: _Layer, d: Tensor) -> Tensor:
        """dᵀF̃d for a [W, b] matrix d under the layer's preconditioner F̃ = Q diag((m2 + eps)^power) Qᵀ."""
        eps = float(self._groups[id(layer.weight)]["snopt_eps"])
        scaling: Tensor = (self.state[layer.weight]["m2"] + eps).pow(self.power)
        return (rotate(d, self._basis(layer)).square() * scaling).sum()

    def _increment_clipped_base_step(self, updates: list[tuple[_Layer, Tensor, Tensor]]) -> None:
        # ⟨u, ∇W⟩ = uᵀF̃u: each increment −lr·u is bounded before the base optimizer sums them
        nu = 1.0
        if self.kl_clip is not None and updates:
            vg_sum = float(torch.stack([  # one host sync for all layers
                float(self._groups[id(layer.weight)]["lr"]) ** 2 * (update * grad_mat).sum().to(updates[0][1])
                for layer, grad_mat, update in updates]).sum())
            if vg_sum > self.kl_clip:
                nu = (self.kl_clip / vg_sum) ** 0.5
        self.last_clip = nu
        for layer, _, update in updates:
            set_weight_grad_matrix(layer.module, update if nu == 1.0 else update * nu)
        self.base.step()

    def _clipped_base_step(self, updates: list[tuple[_Layer, Tensor, Tensor]]) -> None:
        # the whole step of the Kronecker layers, momentum and weight decay included, is bounded after it is made
        assert self.kl_clip is not None
        layers = [layer for layer, _, _ in updates]
        for layer, _, update in updates:
            set_weight_grad_matrix(layer.module, update)
        params = [p for layer in layers for p in (layer.module.weight, layer.module.bias) if isinstance(p, Tensor)]
        before = [p.detach().clone() for p in params]
        self.base.step()
        start = dict(zip(map(id, params), before, strict=True))
        quads: list[Tensor] = []
        for layer in layers:
            w, b = layer.module.weight, layer.module.bias
            assert isinstance(w, Tensor)
            d = (w - start[id(w)]).reshape(w.shape[0], -1)
            if isinstance(b, Tensor):
                d = torch.cat([d, (b - start[id(b)]).reshape(-1, 1)], dim=1)
            quads.append(self._quad(layer, d))
        q = float(torch.stack([x.to(quads[0]) for x in quads]).sum()) if quads else 0.0  # one host sync
        nu = (self.kl_clip / q) ** 0.5 if q > self.kl_clip else 1.0
        self.last_clip = nu
        if nu < 1.0:
            for p, p0 in zip(params, before, strict=True):
                p.copy_(p0.lerp_(p, nu))
                buf = self.base.state.get(p, {}).get("momentum_buffer")
                if isinstance(buf, Tensor):
                    buf.mul_(nu)

    @property
    def collecting(self) -> bool:
        """Whether the current iteration gathers Kronecker factors (every `update_freq`-th step)."""
        return any(c.enabled for c in self.collectors)

    def collect(self, loss: Tensor) -> None:
        """Gather this iteration's factors from the backward pass of `loss`, not the training loss's.

        The default statistics are those of the training loss's own backward pass (the
        empirical Fisher, as in the paper). Called on a collection iteration (`collecting`)
        with a loss whose targets are *sampled from the model*, e.g.
        `snopt.losses.sampled_cross_entropy` of the same logits, the factors estimate the
        true Fisher, which for cross-entropy is the generalised Gauss-Newton matrix
        (Martens & Grosse 2015's Monte-Carlo Fisher). `loss` is back-propagated with the
        graph retained and its gradients are discarded (``.grad`` is untouched); collection
        is then switched off, so the training loss's ``backward()`` that follows costs what
        it does on any other iteration. One extra backward (adjoint) solve per `update_freq`
        steps.

        Args:
            loss: A scalar sharing the forward graph of this iteration's training loss (a
                batch mean, like the training loss: the factors assume B·g per-sample cotangents).

        Raises:
            RuntimeError: If this is not a collection iteration (check `collecting` first).
            ValueError: If `loss` is not a scalar that depends on the optimised parameters.
        """
        if not self.collecting:
            raise RuntimeError("SNOpt.collect called on an iteration that gathers no factors; call it only "
                               "when `opt.collecting` is True (every `update_freq`-th step).")
        if loss.ndim != 0 or not loss.requires_grad:
            raise ValueError("`loss` must be a scalar tensor that requires grad (a batch-mean loss of this "
                             f"iteration's forward pass); got shape {tuple(loss.shape)}, "
                             f"requires_grad={loss.requires_grad}.")
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        with torch.enable_grad():
            torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        self._set_collecting(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of every parameter (the base optimizer's included)."""
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """SNOpt's per-layer state (eigenbases, m2), its step counter and the base optimizer's state."""
        out = {"snopt": super().state_dict(), "base": self.base.state_dict(), "step": self._k,
               "last_clip": self.last_clip, "refused_refreshes": self.refused_refreshes}
        if self.recovery is not None:
            out["recovery"] = self.recovery.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; the next steps are then identical.

        Args:
            state_dict: As returned by `state_dict`.
        """
        self.base.load_state_dict(state_dict["base"])
        super().load_state_dict(state_dict["snopt"])
        self.param_groups = self.base.param_groups
        self._k = int(state_dict["step"])
        self.last_clip = float(state_dict.get("last_clip", 1.0))
        self.refused_refreshes = int(state_dict.get("refused_refreshes", 0))
        self._set_collecting(self._k % self.update_freq == 0)
        if self.recovery is not None and "recovery" in state_dict:
            self.recovery.load_state_dict(state_dict["recovery"])

    def remove_hooks(self) -> None:
        """Detach every collector hook (the optimizer then only applies its current bases) and the recovery's."""
        for c in self.collectors:
            c.remove()
        if self.recovery is not None:
            self.recovery.remove()


