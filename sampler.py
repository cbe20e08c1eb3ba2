"""Flow-matching sampler for UniGRPO: Bagel's time grid, ODE and SDE steps (Eq. (3)), the hybrid
window rollout.

Convention (Bagel's, stated once and tested in tests/test_conventions.py):
    x_t = (1 - t)*x_0 + t*eps,  t = 1 is pure noise, t = 0 is data,
    the model predicts v = eps - x_0,
    sampling runs t from 1 to 0 on the shifted grid t' = s*t / (1 + (s - 1)*t), s = 3,
    so dt = t_next - t < 0.
FlowGRPO's sigma is our t. Outside a short window of K consecutive steps the rollout is the
deterministic ODE (Euler); inside it each step is a Gaussian transition N(mean, std^2) whose
log-density the update trains (FlowGRPO-Fast). `sample` returns every window quantity once; ratio,
RatioNorm and the regularisers read those.

Glossary
    x_t, x_next     latent at t and at the next grid point t_next (x_{t+dt}); x_1 noise,
                    x_0 final latent
    v (v_theta)     predicted velocity eps - x_0 at (x_t, t)
    dt              t_next - t, negative
    eta             noise_level; sigma_t = eta*sqrt(t / (1 - t)) is the diffusion coefficient of
                    the SDE
    eps_hat, x0_hat predicted noise x_t + (1 - t)*v and predicted data x_t - t*v
    mean, std       mean and TRANSITION standard deviation of p(x_next | x_t):
                    std = sigma_t*sqrt(|dt|) ('sde')
    K, window       number and indices of the SDE steps; shapes: R rows (samples), K window steps,
                    (...) latent dims

Deviations / borrowed defaults
    1. log_prob is averaged over latent elements by default (reduce="mean", FlowGRPO's choice,
       flow_grpo #143); reduce="sum" gives the exact log-density. The clip range must match the
       choice. `reduce` (Config.logprob_reduce) always names this reduction over latent elements;
       losses.py's `reduction` (Config.text_reduction) is the other idea, Eq. (2)'s over tokens.
    2. The first step (t == 1 exactly) uses sigma_t = eta*sqrt(t / (1 - t_next)) since 1 - t = 0
       there (FlowGRPO uses sigmas[1], the next grid point; the first-step std therefore depends on
       the grid).
    3. kind="cps" (FlowGRPO-Fast's consistency sampler) reports
       log_prob = -reduce((x_next - mean)^2): no variance, no constant, as FlowGRPO; its log-ratios
       are on another scale than kind="sde".
    4. Where std == 0 (eta = 0, or cps at t_next = 0) the step is deterministic; the 'sde' log_prob
       is set to 0 there instead of NaN/inf. The last step (t_next = 0) is computed like any other
       but never trained.
    5. `timesteps` pins the end points to exactly 1 and 0: Bagel's float32 formula already gives
       them for s >= 0.45 (bit-identical there), but is one ulp off for a few small shifts
       (0.05 ... 0.4).
"""
import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum")
KINDS = ("sde", "cps")


@dataclass(frozen=True)
class SDEStep:
    x_next: torch.Tensor    # (R, ...)
    mean: torch.Tensor      # (R, ...), float32, carries the graph of v and x_t
    std: torch.Tensor       # (R, 1, ..., 1), transition standard deviation
    log_prob: torch.Tensor  # (R,)


@dataclass(frozen=True)
class Trajectory:
    x_0: torch.Tensor       # (R, ...) final latent
    x_t: torch.Tensor       # (R, K, ...) window inputs
    x_next: torch.Tensor    # (R, K, ...) window outputs
    mean: torch.Tensor      # (R, K, ...)
    std: torch.Tensor       # (R, K, 1, ..., 1)
    log_prob: torch.Tensor  # (R, K)
    t: torch.Tensor         # (K,)
    t_next: torch.Tensor    # (K,)
    window: tuple           # K step indices into the grid

    @staticmethod
    def cat(parts: list["Trajectory"]) -> "Trajectory":
        """Rows of several trajectories on the same grid and window."""
        rows = ("x_0", "x_t", "x_next", "mean", "std", "log_prob")
        return Trajectory(**{k: torch.cat([getattr(p, k) for p in parts]) for k in rows},
                          t=parts[0].t, t_next=parts[0].t_next, window=parts[0].window)


class RowStreams:
    """One random stream per sample, keyed by (key, global sample index): a row's draws depend only on its
    key and index, never on how many rows share a call, a rank or a chunk, so a rollout's numbers do not
    change with the GPU count or the generation batch. `draw(shape)` returns (R, *shape), row i drawn from
    stream i in order; `streams[a:b]` is the same streams for a slice of the rows."""

    def __init__(self, key: int, rows: range):
        self.key, self.rows = int(key), rows
        # one 64-bit seed per (key, index); the multipliers keep nearby keys and indices apart
        self._gens = [torch.Generator().manual_seed((self.key * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9)
                                                    % 2 ** 63) for i in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, part: slice) -> "RowStreams":
        sub = RowStreams.__new__(RowStreams)
        sub.key, sub.rows, sub._gens = self.key, self.rows[part], self._gens[part]
        return sub

    def draw(self, shape, device=None, uniform=False) -> torch.Tensor:
        fn = torch.rand if uniform else torch.randn
        return torch.stack([fn(tuple(shape), generator=g) for g in self._gens]).to(device)


def draw(shape, generator, device, uniform=False) -> torch.Tensor:
    """N(0, 1) (or, uniform=True, U[0, 1)) draws of `shape` (R, ...) from a torch.Generator (one stream
    for the batch, on its own device), a RowStreams (one per row) or the global RNG (None), on `device`."""
    if isinstance(generator, RowStreams):
        if len(generator) != shape[0]:
            raise ValueError(f"RowStreams holds {len(generator)} rows, the draw needs {shape[0]}")
        return generator.draw(shape[1:], device, uniform)
    gdev = generator.device if generator is not None else device
    fn = torch.rand if uniform else torch.randn
    return fn(tuple(shape), generator=generator, device=gdev).to(device)


def timesteps(num_steps, shift=3.0):
    """Shifted grid t' = s*t / (1 + (s - 1)*t) of linspace(1, 0, num_steps + 1), float32 as Bagel,
    (num_steps + 1,).

    Bagel's own `num_timesteps` is num_steps + 1: it calls the model at grid[:-1] and ends at
    grid[-1] = 0.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    t = shift * t / (1 + (shift - 1) * t)
    t[0], t[-1] = 1.0, 0.0  # Deviation 5
    return t


def _check_shape(name, tensor, x_t):
    if tensor is not None and tensor.shape != x_t.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, "
                         f"expected x_t's {tuple(x_t.shape)}")


def _check_options(noise_level, reduce, kind):
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not noise_level >= 0 or (kind == "cps" and noise_level > 1):
        raise ValueError(f"noise_level must be >= 0 (and <= 1 for kind='cps'), got {noise_level!r}")


def _times(t, t_next, x_t):
    t, t_next = _as_time("t", t, x_t), _as_time("t_next", t_next, x_t)
    if not bool((t_next < t).all()):
        raise ValueError("t_next must be < t: time runs from 1 (noise) to 0 (data)")
    return t, t_next


def _as_time(name, t, x_t):
    """A float, 0-d or (R,) time as a float32 (R, 1, ..., 1) tensor on x_t's device, checked to lie
    in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x_t.shape[0]):
        raise ValueError(f"{name} must be a float, a 0-d tensor or of shape "
                         f"(R,) = ({x_t.shape[0]},), got shape {tuple(t.shape)}")
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1], got {t.tolist()}")
    return t.expand(x_t.shape[0]).reshape(-1, *([1] * (x_t.ndim - 1)))


def ode_step(x_t, v, t, t_next):
    """Eq. (3): x_next = x_t + v*(t_next - t), its eta = 0 (ODE) case: Bagel's Euler step
    x_t - v*(t_i - t_{i+1})."""
    _check_shape("v", v, x_t)
    t, t_next = _times(t, t_next, x_t)
    return x_t + v * (t_next - t)


def sde_step(x_t, v, t, t_next, noise_level, noise=None, x_next=None, generator=None, reduce="mean",
             kind="sde"):
    """Eq. (3): x_next = x_t + [v + sigma_t^2/(2t) * (x_t + (1 - t)*v)]*dt + sigma_t*sqrt(-dt)*z,
    z ~ N(0, I), sigma_t = eta*sqrt(t / (1 - t)); the bracket is v minus (sigma_t^2/2)*score,
    score = -eps_hat/t.

    kind="sde" (Flow-GRPO): mean = x_t*(1 + sigma_t^2*dt/(2t)) + v*(1 + sigma_t^2*(1 - t)/(2t))*dt,
        std = sigma_t*sqrt(-dt) (at t == 1: sigma_t = eta*sqrt(t / (1 - t_next)), Deviation 2),
        log_prob = reduce(-(x_next - mean)^2/(2 std^2) - log std - log sqrt(2 pi)) over
        non-batch dims.
    kind="cps" (Flow-GRPO-Fast): mean = (1 - t_next)*x0_hat + t_next*cos(eta*pi/2)*eps_hat,
        std = t_next*sin(eta*pi/2), log_prob = reduce(-(x_next - mean)^2): no variance, no constant.
    eta = 0 gives mean == ode_step for both kinds.

    t, t_next: floats, 0-d or (R,) tensors (a step per sample). x_next given: returned unchanged and
    scored; else x_next = mean + std*noise with noise given or
    draw(shape, generator) (a torch.Generator or RowStreams), detached.
    Computed in float32; x_next is detached in the log-density, so gradients reach v and x_t only
    via mean. At the last step (t_next = 0) 'sde' is a narrow Gaussian (log_prob about +3.6) and
    'cps' is deterministic (std = 0, log_prob = 0 at the sample): finite either way, and never
    trained. Returns SDEStep.
    """
    _check_options(noise_level, reduce, kind)
    for name, tensor in (("v", v), ("noise", noise), ("x_next", x_next)):
        _check_shape(name, tensor, x_t)
    t, t_next = _times(t, t_next, x_t)
    x, v, dt = x_t.float(), v.float(), t_next - t

    if kind == "sde":
        sigma_t = noise_level * torch.sqrt(t / (1 - torch.where(t == 1, t_next, t)))
        mean = x * (1 + sigma_t**2 * dt / (2 * t)) + v * (1 + sigma_t**2 * (1 - t) / (2 * t)) * dt
        std = sigma_t * torch.sqrt(-dt)
    else:
        x0_hat, eps_hat = x - t * v, x + (1 - t) * v
        std = t_next * math.sin(noise_level * math.pi / 2)
        mean = (1 - t_next) * x0_hat + t_next * math.cos(noise_level * math.pi / 2) * eps_hat

    if x_next is None:
        if noise is None:
            noise = draw(x.shape, generator, x.device)
        x_next = (mean + std * noise.float()).detach()
    sq_err = (x_next.detach().float() - mean) ** 2

    if kind == "sde":
        deterministic = std == 0
        # no NaN, even in the unused branch
        std_safe = torch.where(deterministic, torch.ones_like(std), std)
        log_density = (-sq_err / (2 * std_safe**2) - torch.log(std_safe)
                       - 0.5 * math.log(2 * math.pi))
        # Deviation 4
        log_density = torch.where(deterministic, torch.zeros_like(log_density), log_density)
    else:
        log_density = -sq_err  # Deviation 3
    dims = tuple(range(1, x.ndim))
    log_prob = log_density.mean(dim=dims) if reduce == "mean" else log_density.sum(dim=dims)
    return SDEStep(x_next=x_next, mean=mean, std=std, log_prob=log_prob)


def sde_window(num_steps, start_range=(0, 5), size=3, generator=None):
    """Window of `size` consecutive step indices, start ~ uniform on the inclusive start_range
    (paper: [0, 5], 3).

    The window may not contain the last step (its t_next = 0 makes a degenerate transition that is
    never trained), so start_range[1] + size <= num_steps - 1 is required.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    lo, hi = start_range
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
        raise ValueError(f"start_range must be ints (lo, hi) with 0 <= lo <= hi, "
                         f"got {start_range!r}")
    if hi + size > num_steps - 1:
        raise ValueError(f"start_range {start_range!r} with size {size} does not fit "
                         f"num_steps {num_steps}: the window must end before the last step "
                         f"(need start_range[1] + size <= {num_steps - 1})")
    start = int(torch.randint(lo, hi + 1, (1,), generator=generator))
    return range(start, start + size)


def _check_grid(grid):
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 points, got shape {tuple(grid.shape)}")
    if grid[0] != 1 or grid[-1] != 0:
        raise ValueError(f"grid must start at 1 and end at 0, "
                         f"got {grid[0].item()} ... {grid[-1].item()}")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("grid must be strictly decreasing (t runs from 1 to 0)")


def _stack(records, like_shape, like):
    """Stack K per-step tensors on dim 1, or an empty (R, 0, ...) tensor when the window is
    empty."""
    if records:
        return torch.stack(records, dim=1)
    return like.new_empty(like_shape[:1] + (0,) + like_shape[1:])


@torch.no_grad()
def sample(velocity_fn, x_1, grid, window, noise_level, generator=None, reduce="mean", kind="sde"):
    """Hybrid rollout: sde_step (Eq. (3)) at the steps in `window`, ode_step elsewhere, from x_1
    along `grid`.

    velocity_fn(x_t, t) gets x_t (R, ...) and t (R,) and returns v of x_t's shape. The latent is
    kept in float32. window: step indices (strictly increasing, into range(len(grid) - 1)); empty
    or None = pure ODE. Runs without autograd; the update recomputes means and log-probs at the
    stored (x_t, t). Returns Trajectory.
    """
    _check_options(noise_level, reduce, kind)
    grid = torch.as_tensor(grid, dtype=torch.float32)
    _check_grid(grid)
    num_steps = grid.numel() - 1
    window = () if window is None else tuple(int(i) for i in window)
    if (any(i < 0 or i >= num_steps for i in window)
            or any(a >= b for a, b in zip(window, window[1:]))):
        raise ValueError(f"window must be strictly increasing step indices in "
                         f"[0, {num_steps - 1}], got {window}")
    x = x_1.float()
    R, shape = x.shape[0], tuple(x.shape)
    rec = {k: [] for k in ("x_t", "x_next", "mean", "std", "log_prob")}
    for i in range(num_steps):
        t, t_next = grid[i].to(x.device), grid[i + 1].to(x.device)
        v = velocity_fn(x, t.expand(R))
        _check_shape("velocity_fn(x_t, t)", v, x)
        if i in window:
            step = sde_step(x, v, t, t_next, noise_level, generator=generator, reduce=reduce,
                            kind=kind)
            for k, value in (("x_t", x), ("x_next", step.x_next), ("mean", step.mean),
                             ("std", step.std), ("log_prob", step.log_prob)):
                rec[k].append(value)
            x = step.x_next
        else:
            x = ode_step(x, v.float(), t, t_next)
    std_shape = (R,) + (1,) * (x.ndim - 1)
    return Trajectory(
        x_0=x,
        x_t=_stack(rec["x_t"], shape, x), x_next=_stack(rec["x_next"], shape, x),
        mean=_stack(rec["mean"], shape, x), std=_stack(rec["std"], std_shape, x),
        log_prob=_stack(rec["log_prob"], (R,), x),
        t=grid[list(window)].to(x.device), t_next=grid[[i + 1 for i in window]].to(x.device),
        window=window)
