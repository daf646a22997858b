"""The DiffFlow model: a learnable-drift forward SDE and a learnable-score backward SDE."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .gradients import (
    CHECKPOINT_SCHEDULES,
    GRADIENT_MODES,
    Walk,
    call_network,
    check_memory_budget,
    checkpointed_loss,
    forward_walk,
    make_plan,
    measure_graph_bytes,
    resolve_memory_budget,
    work_bytes,
)
from .networks import build_network, build_network_from_config
from .ops.backends import check_backend_name
from .ops.reference import acc_dtype
from .priors import GaussianPrior
from .schedules import GRIDS, Diffusion, DiffusionSpec, check_num_steps, flexible_grid, polynomial_grid

__all__ = ["DiffFlow", "NLLBound", "GRADIENT_MODES", "AUTOCAST_DTYPES"]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class NLLBound(NamedTuple):
    """Per-sample negative ELBO (an upper bound on -log p(x_0)) in nats and in bits per dimension."""

    nats: Tensor
    bits_per_dim: Tensor


def _choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _positive(name: str, value: object) -> float:
    if _real(name, value) <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def _autocast_dtype(value: object) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, str) and value in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[value]
    if value in tuple(AUTOCAST_DTYPES.values()):
        return value  # type: ignore[return-value]
    raise ValueError(f"autocast_dtype: expected None, torch.bfloat16 or torch.float16, got {value!r}")


def _check_generator(generator: object, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != torch.device(device).type:
        raise ValueError(f"generator: it lives on {generator.device} but the data is on {device}; pass "
                         f"torch.Generator(device={str(device)!r})")


def _check_network(name: str, net: object) -> None:
    if not callable(net):
        raise TypeError(f"{name}: expected a module called as net(x, t), got {type(net).__name__}")


class DiffFlow(nn.Module):
    """Diffusion Normalizing Flow.

    Forward SDE ``dx = f(x,t) dt + g(t) dw`` (learnable drift ``f``) from data at ``t_start`` to noise at
    ``t_end``; backward SDE ``dx = [f - g^2 s(x,t)] dt + g dw`` (learnable score ``s``) back to data;
    both trained jointly by the trajectory KL (Algorithm 1 of the paper).

    Args:
        drift, score: modules called as ``net(x, t)`` with ``x`` of shape ``(B, *data_shape)`` and ``t`` of
            shape ``(B,)``, returning a tensor shaped like ``x``. A fixed drift (no parameters, or an output
            without a graph) is fine in every gradient mode.
        data_shape: shape of one sample.
        num_steps: N, the number of Euler-Maruyama steps (1 to 100000).
        t_start, t_end, time_exponent: the fixed grid ``linspace(t_start**e, t_end**e, N+1)**(1/e)``.
        diffusion: g -- a positive float, a sequence of N+1 positive values (one per point of the fixed grid,
            linearly interpolated in between, e.g. at the points of a flexible grid), ``{"start": g0, "end": g1}``
            (geometric in t from g0 at ``t_start`` to g1 at ``t_end``, for any N) or a callable of t
            (without learnable parameters: a learnable g is refused, see docs/math.md).
        prior_std: standard deviation of the Gaussian prior ``p_B(x_N)`` (the initial one when learned).
        prior: ``"fixed"`` (``N(0, prior_std^2 I)``, the paper's) or ``"learned"`` (a diagonal Gaussian with a
            mean and a log-std per dimension, trained with the networks; :mod:`diffflow_ext.priors`).
        gradient: how :meth:`loss` is differentiated (see :mod:`diffflow_ext.gradients`): ``"auto"`` (default:
            keep the networks' graphs for as many states as ``memory_budget`` allows, recompute the rest),
            ``"adjoint"`` (keep only the states, recompute every network call) or ``"autograd"`` (unroll
            everything).
        memory_budget: for ``"auto"``: bytes (an int) that the kept graphs may use beyond the stored states,
            or a float in (0, 1], a fraction of the memory free at each call (CUDA: free device memory; CPU:
            available RAM), or None for no limit. Default 0.5.
        checkpoint_schedule: for ``"auto"``: ``"end"`` (keep the states nearest the noise end; lowest peak) or
            ``"uniform"`` (kept states evenly spaced).
        autocast_dtype: None, ``torch.bfloat16`` or ``torch.float16``: run the networks under
            ``torch.autocast`` in that dtype. With None an enclosing ``torch.autocast`` is honoured for the
            networks. Either way the network outputs are cast back to the data's dtype: the states ``x_i``,
            the step ops and the loss never leave it (float32 for float32 data).
        backend: step-op backend, see :func:`diffflow_ext.available_backends`.
        grid: ``"fixed"`` or ``"flexible"`` (interior points redrawn every batch) for training.
    """

    def __init__(
        self,
        drift: nn.Module,
        score: nn.Module,
        data_shape: Sequence[int] | int,
        *,
        num_steps: int = 30,
        t_start: float = 1e-3,
        t_end: float = 0.05,
        time_exponent: float = 0.9,
        diffusion: DiffusionSpec = 0.2,
        prior_std: float = 1.0,
        prior: str = "fixed",
        gradient: str = "auto",
        memory_budget: int | float | None = 0.5,
        checkpoint_schedule: str = "end",
        autocast_dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        grid: str = "fixed",
    ):
        super().__init__()
        _check_network("drift", drift)
        _check_network("score", score)
        if isinstance(data_shape, int) and not isinstance(data_shape, bool):
            data_shape = (data_shape,)
        try:
            data_shape = tuple(data_shape)
        except TypeError:
            raise ValueError(f"data_shape: expected a tuple of positive integers, got {data_shape!r}") from None
        if not data_shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in data_shape):
            raise ValueError(f"data_shape: expected a non-empty tuple of positive integers, got {data_shape!r}")
        self.drift, self.score = drift, score
        self.data_shape = data_shape
        self.num_steps = check_num_steps(num_steps)
        self.t_start, self.t_end = _real("t_start", t_start), _real("t_end", t_end)
        self.time_exponent = _positive("time_exponent", time_exponent)
        polynomial_grid(1, self.t_start, self.t_end, self.time_exponent)  # validates the range
        self.diffusion = Diffusion(diffusion)
        self.diffusion.check_steps(self.num_steps)
        self.prior = GaussianPrior(data_shape, prior_std, prior)  # validates both
        self.gradient = _choice("gradient", gradient, GRADIENT_MODES)
        self.memory_budget = check_memory_budget(memory_budget)
        self.checkpoint_schedule = _choice("checkpoint_schedule", checkpoint_schedule, CHECKPOINT_SCHEDULES)
        self.autocast_dtype = _autocast_dtype(autocast_dtype)
        self.backend = check_backend_name(backend)
        self.grid = _choice("grid", grid, GRIDS)
        self.last_gradient_plan: dict | None = None  # what the last "auto"/"adjoint" loss kept and recomputed
        self._graph_bytes: dict = {}  # measured graph bytes of one state, per (batch shape, dtype, device, N, mode)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def mlp(cls, dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 32, **kwargs) -> "DiffFlow":
        """DiffFlow on ``dim``-dimensional vectors with the paper's time-conditioned MLPs."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive integer, got {dim!r}")
        if isinstance(time_dim, bool) or not isinstance(time_dim, int) or time_dim < 2 or time_dim % 2:
            raise ValueError(f"time_dim: expected an even integer >= 2, got {time_dim!r}")
        return cls.from_networks("mlp", (dim,), {"hidden": hidden, "depth": depth, "time_dim": time_dim}, **kwargs)

    @classmethod
    def from_networks(cls, network: str, data_shape: Sequence[int] | int, network_kwargs: dict | None = None,
                      **model_kwargs) -> "DiffFlow":
        """DiffFlow whose drift and score are both built by the network registry
        (:func:`diffflow_ext.networks.build_network`), e.g.
        ``DiffFlow.from_networks("mlp", (2,), {"hidden": 128}, num_steps=30)``; any registered network
        round-trips through :meth:`config` / :meth:`from_config` (and so through checkpoints)."""
        if network_kwargs is not None and not isinstance(network_kwargs, dict):
            raise ValueError(f"network_kwargs: expected a dict of network arguments, got {network_kwargs!r}")
        shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
        drift = build_network(network, data_shape=shape, **(network_kwargs or {}))
        score = build_network(network, data_shape=shape, **(network_kwargs or {}))
        return cls(drift, score, shape, **model_kwargs)

    def config(self) -> dict:
        """JSON-able constructor arguments (for :meth:`from_config`); networks built by the registry only."""
        nets = {}
        for name in ("drift", "score"):
            cfg = getattr(getattr(self, name), "network_config", None)
            if cfg is None:
                raise ValueError(f"config: the {name} network was not built by diffflow_ext.networks.build_network "
                                 "(register it with register_network to make the model describable)")
            nets[name] = cfg
        diffusion = self.diffusion.config()
        if diffusion is None:
            raise ValueError("config: a callable diffusion cannot be serialised; pass a float or a sequence")
        return {
            **nets,
            "data_shape": list(self.data_shape),
            "num_steps": self.num_steps,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "time_exponent": self.time_exponent,
            "diffusion": diffusion,
            "prior_std": self.prior_std,
            "prior": self.prior.kind,
            "gradient": self.gradient,
            "memory_budget": self.memory_budget,
            "checkpoint_schedule": self.checkpoint_schedule,
            "autocast_dtype": None if self.autocast_dtype is None else str(self.autocast_dtype).split(".")[-1],
            "backend": self.backend,
            "grid": self.grid,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "DiffFlow":
        """The model of :meth:`config` (also the older MLP form with ``dim``/``hidden``/``depth``/``time_dim``)."""
        if not isinstance(cfg, dict):
            raise ValueError(f"model config: expected a dict, got {type(cfg).__name__}")
        cfg = dict(cfg)
        if "drift" in cfg or "score" in cfg:
            missing = [k for k in ("drift", "score", "data_shape") if k not in cfg]
            if missing:
                raise ValueError(f"model config: missing {', '.join(missing)}")
            shape = cfg.pop("data_shape")
            shape = tuple(shape) if isinstance(shape, (list, tuple)) else shape
            if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                       for d in shape) or not shape:
                raise ValueError(f"model config: data_shape: expected a list of positive integers, got {shape!r}")
            # the networks' stored shape arguments must agree with the model's data shape
            drift = build_network_from_config(cfg.pop("drift"), shape)
            score = build_network_from_config(cfg.pop("score"), shape)
            return cls(drift, score, shape, **cfg)
        net = {k: cfg.pop(k) for k in ("dim", "hidden", "depth", "time_dim") if k in cfg}
        if "dim" not in net:
            raise ValueError("model config: expected 'drift'/'score' network configs or an MLP 'dim'")
        return cls.mlp(**net, **cfg)

    # ------------------------------------------------------------------ grids
    @property
    def timestamps(self) -> Tensor:
        """The fixed grid ``(N+1,)`` in float64."""
        return polynomial_grid(self.num_steps, self.t_start, self.t_end, self.time_exponent)

    def _param_like(self) -> Tensor:
        for p in self.parameters():
            return p
        return torch.empty(0)

    def time_grid(
        self, batch_size: int, *, num_steps: int | None = None, grid: str | None = None,
        generator: torch.Generator | None = None, device=None,
    ) -> Tensor:
        """Per-sample grids ``(B, N+1)`` in float64 (fixed, or flexible when ``grid="flexible"``)."""
        n = self.num_steps if num_steps is None else check_num_steps(num_steps)
        grid = self.grid if grid is None else _choice("grid", grid, GRIDS)
        base = polynomial_grid(n, self.t_start, self.t_end, self.time_exponent, device=device)
        if grid == "flexible":
            return flexible_grid(base, batch_size, generator)
        return base.expand(batch_size, n + 1)  # one row shared by the batch (stride 0)

    def step_coefficients(self, t64: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, dt, g)`` of a ``(B, N+1)`` float64 grid: network times in ``dtype``, ``dt`` ``(B, N)`` and ``g``
        ``(B, N+1)`` in its accumulation dtype. A grid shared by the batch (stride 0) stays expanded."""
        acc = acc_dtype(dtype)
        B, n = t64.shape[0], t64.shape[1] - 1
        fixed = polynomial_grid(n, self.t_start, self.t_end, self.time_exponent).to(t64.device)
        if t64.stride(0) == 0:  # compute on one row; no B x N copies
            row = t64[:1]
            return (row.to(dtype).expand(B, -1), (row[:, 1:] - row[:, :-1]).to(acc).expand(B, -1),
                    self.diffusion.at_grid(row, fixed).to(acc).expand(B, -1))
        return t64.to(dtype), (t64[:, 1:] - t64[:, :-1]).to(acc), self.diffusion.at_grid(t64, fixed).to(acc)

    def autocast_for(self, device: torch.device) -> tuple[str, torch.dtype] | None:
        """``(device type, dtype)`` the networks run under on ``device``: the model's ``autocast_dtype``, else an
        enclosing ``torch.autocast``, else None."""
        dev = torch.device(device).type
        if self.autocast_dtype is not None:
            return dev, self.autocast_dtype
        if torch.is_autocast_enabled(dev):
            return dev, torch.get_autocast_dtype(dev)
        return None

    def networks_at(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift and score at ``(x, t)`` as the training walk computes them (autocast as configured, outputs in
        ``x``'s dtype): for samplers and likelihoods."""
        ac = self.autocast_for(x.device)
        return call_network(self.drift, x, t, ac), call_network(self.score, x, t, ac)

    def _walk(self, x: Tensor, t64: Tensor, generator: torch.Generator | None) -> Walk:
        _check_generator(generator, x.device)
        t, dt, g = self.step_coefficients(t64, x.dtype)

        def noise(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

        return Walk(self.drift, self.score, t, dt, g, self.prior_nll, noise, self.backend, self.autocast_for(x.device),
                    prior_params=tuple(self.prior.parameters()))

    def _check_data(self, name: str, x: Tensor, check_dtype: bool = True) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape (B, {self.data_shape}), got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.data_shape or x.dim() != len(self.data_shape) + 1 or x.shape[0] < 1:
            raise ValueError(
                f"{name}: expected shape (B, {', '.join(map(str, self.data_shape))}) with B >= 1, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating tensor, got {x.dtype}")
        ref = self._param_like()
        if check_dtype and ref.numel() and ref.is_floating_point() and x.dtype != ref.dtype:
            raise ValueError(f"{name}: expected dtype {ref.dtype} (the model's), got {x.dtype}; convert the data or "
                             f"the model (model.to({x.dtype}))")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
            raise ValueError(f"{name}: {bad} of {x.shape[0]} samples hold NaN or inf values; clean the data first")
        return x

    # ------------------------------------------------------------------ densities of the prior
    @property
    def prior_std(self) -> float:
        """The prior's standard deviation (its initial one when learned)."""
        return self.prior.std

    @property
    def dim(self) -> int:
        return math.prod(self.data_shape)

    def prior_nll(self, x: Tensor) -> Tensor:
        """``-log p_B(x)`` per sample, normaliser included (:class:`~diffflow_ext.priors.GaussianPrior`)."""
        return self.prior.nll(x)

    # ------------------------------------------------------------------ training
    @property
    def wants_data_init(self) -> bool:
        """Whether a network asks for a data-dependent initialisation (:meth:`init_from_data`) before training."""
        return any(getattr(net, "wants_data_init", False) for net in (self.drift, self.score))

    def init_from_data(self, x: Tensor) -> None:
        """Data-dependent initialisation of the networks that ask for one (the points preset's Fourier features,
        ``TimeMLP(x_init="data")``) from training examples ``x`` in model space, shape ``(B, *data_shape)``
        (the training loop passes ``training.loop.DATA_INIT_EXAMPLES``); call it once, before the first step and
        before an optimizer or an EMA copies the weights. Networks without one are left as they are."""
        x = self._check_data("x", x, check_dtype=False)
        for net in (self.drift, self.score):
            if getattr(net, "wants_data_init", False):
                net.init_from_data(x)

    def loss_per_sample(
        self, x0: Tensor, generator: torch.Generator | None = None, *, num_steps: int | None = None,
        grid: str | None = None,
    ) -> Tensor:
        """``-log p_B(x_N) + sum_i 0.5||delta_i^B||^2`` for each sample, ``(B,)``."""
        self._check_data("x0", x0)
        t = self.time_grid(x0.shape[0], num_steps=num_steps, grid=grid, generator=generator, device=x0.device)
        walk = self._walk(x0, t, generator)
        if self.gradient != "autograd" and torch.is_grad_enabled():
            if self.gradient == "adjoint":
                budget = 0.0
            else:
                budget = resolve_memory_budget(self.memory_budget, x0.device)
                key = (tuple(x0.shape), x0.dtype, x0.device, walk.num_steps, self.training)
                keep_all = math.isinf(budget)
                if not keep_all and budget > 0:
                    # measured by a traceless call (not by the first training call), so that the choice of walk
                    # depends only on the shapes: a resumed run takes the same walk, bitwise, as an uninterrupted one
                    if key not in self._graph_bytes:
                        self._graph_bytes[key] = measure_graph_bytes(walk, x0)
                    G = self._graph_bytes[key]
                    state_bytes = x0.numel() * x0.element_size()
                    param_bytes = sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad)
                    keep_all = (walk.num_steps + 1) * G + work_bytes(G, param_bytes, state_bytes) <= budget
                if keep_all:  # every graph fits: nothing to recompute, so one autograd pass is the fastest walk
                    self.last_gradient_plan = make_plan(walk.num_steps + 1, self.checkpoint_schedule, budget,
                                                        self._graph_bytes.get(key, 0), 0).summary()
                    return forward_walk(walk, x0, keep_states=False).loss
            info: dict = {}
            loss = checkpointed_loss(walk, x0, budget, self.checkpoint_schedule, info)
            self.last_gradient_plan = info["plan"].summary()
            return loss
        return forward_walk(walk, x0, keep_states=False).loss

    def loss(
        self, x0: Tensor, generator: torch.Generator | None = None, *, num_steps: int | None = None,
        grid: str | None = None,
    ) -> Tensor:
        """The training objective of Algorithm 1: the batch mean of :meth:`loss_per_sample`."""
        return self.loss_per_sample(x0, generator, num_steps=num_steps, grid=grid).mean()

    forward = loss

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def nll_bound(
        self, x0: Tensor, generator: torch.Generator | None = None, *, num_steps: int | None = None,
    ) -> NLLBound:
        """Per-sample negative ELBO of ``-log p(x0)`` in nats (every constant included) and bits/dim.

        With Gaussian transitions ``p_F(x_{i+1}|x_i) = N(x_i + f_i dt_i, g_i^2 dt_i I)`` and
        ``p_B(x_i|x_{i+1}) = N(x_{i+1} - (f_{i+1} - g_{i+1}^2 s_{i+1}) dt_i, g_{i+1}^2 dt_i I)``,

            log p_F(x_{i+1}|x_i) - log p_B(x_i|x_{i+1}) = D log(g_{i+1}/g_i) + 0.5||delta_i||^2 - 0.5||eps_i||^2,

        so ``-ELBO = -log p_B(x_N) + sum_i [0.5||delta_i||^2 - 0.5||eps_i||^2] + D sum_i log(g_{i+1}/g_i)``.
        The sampled ``eps`` terms (rather than their mean ``D/2``) keep the estimate's variance low.
        """
        self._check_data("x0", x0)
        t = self.time_grid(x0.shape[0], num_steps=num_steps, grid="fixed", device=x0.device)
        walk = self._walk(x0, t, generator)
        res = forward_walk(walk, x0, keep_states=False, eps_norms=True)
        log_g = torch.log(walk.g)
        nats = res.loss - res.eps_half_sqnorm + self.dim * (log_g[:, -1] - log_g[:, 0])
        return NLLBound(nats, nats / (self.dim * math.log(2.0)))

    @torch.no_grad()
    def forward_trajectory(
        self, x0: Tensor, generator: torch.Generator | None = None, *, num_steps: int | None = None,
    ) -> Tensor:
        """States ``x_0..x_N`` of the forward SDE, ``(N+1, B, *data_shape)``."""
        self._check_data("x0", x0)
        t = self.time_grid(x0.shape[0], num_steps=num_steps, grid="fixed", device=x0.device)
        return torch.stack(forward_walk(self._walk(x0, t, generator), x0, keep_states=True).states)

    def sample(
        self, n: int, *, lam: float | None = None, num_steps: int | None = None,
        generator: torch.Generator | None = None, denoise: bool = True, return_trajectory: bool = False,
        method: str = "em", sampler_options: dict | None = None, x_init: Tensor | None = None, device=None, dtype=None,
    ):
        """Draw ``n`` samples from the prior at ``t_end`` back to ``t_start`` with a sampler of
        :data:`diffflow_ext.samplers.SAMPLERS`: ``get_sampler(method, **sampler_options)``, plus ``lam`` when given.

        ``"em"`` (default): Euler-Maruyama on the grid of the marginal-equivalent backward SDE
        ``dx = [f - (1+lam^2)/2 g^2 s] dt + lam g dw`` (lam=0: the probability-flow ODE; default lam=1, the
        DiffFlow backward SDE); ``"heun"``, ``"ode"``: the probability-flow ODE (they take no ``lam``).
        ``denoise``: no noise in the last step. ``x_init``: the starting states at ``t_end`` (``n`` of them) instead
        of prior draws. Returns ``(n, *data_shape)`` or, with ``return_trajectory``, ``(samples, traj)`` with
        ``traj[i]`` the state at ``t_i``, shape ``(N+1, n, *data_shape)``. Runs on the model's device and dtype
        unless ``device``/``dtype`` say otherwise.
        """
        from .samplers import get_sampler

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive integer number of samples, got {n!r}")
        options = dict(sampler_options or {}) if isinstance(sampler_options, (dict, type(None))) else None
        if options is None:
            raise ValueError(f"sampler_options: expected a dict of sampler options, got {sampler_options!r}")
        if lam is not None:
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < math.inf:
                raise ValueError(f"lam: expected a finite number >= 0 (0: the probability-flow ODE), got {lam!r}")
            options["lam"] = float(lam)
        if num_steps is not None:
            check_num_steps(num_steps)
        sampler = get_sampler(method, **options)
        ref = self._param_like()
        device = torch.device(device) if device is not None else (ref.device if ref.numel() else torch.device("cpu"))
        dtype = dtype if dtype is not None else (ref.dtype if ref.numel() else torch.float32)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        if x_init is None:
            _check_generator(generator, device)
            x_init = self.prior.sample(n, generator=generator, device=device, dtype=dtype)
        else:
            self._check_data("x_init", x_init, check_dtype=False)
            if x_init.shape[0] != n:
                raise ValueError(f"x_init: expected {n} starting states (n), got {x_init.shape[0]}")
            _check_generator(generator, x_init.device)
        with torch.no_grad():
            traj = sampler(self, x_init, num_steps=num_steps, generator=generator, denoise=denoise,
                           keep_trajectory=return_trajectory)
        samples = traj[0] if return_trajectory else traj
        return (samples, traj) if return_trajectory else samples

    def log_prob(self, x: Tensor, **kwargs) -> Tensor:
        """Exact log-likelihood through the probability-flow ODE (see :func:`diffflow_ext.likelihood.log_prob`)."""
        from .likelihood import log_prob

        self._check_data("x", x)
        return log_prob(self, x, **kwargs)

    # ------------------------------------------------------------------ shared coefficients
    def diffusion_at(self, t: Tensor) -> Tensor:
        """g at continuous times ``t`` (any shape)."""
        return self.diffusion.at_time(t, self.timestamps.to(t.device))

    def extra_repr(self) -> str:
        return (f"data_shape={self.data_shape}, num_steps={self.num_steps}, t=[{self.t_start}, {self.t_end}], "
                f"time_exponent={self.time_exponent}, gradient={self.gradient!r}, "
                f"memory_budget={self.memory_budget!r}, backend={self.backend!r}, grid={self.grid!r}")
