"""The hybrid rollout: sde_window, and sample() as the single source of truth
for the window steps."""
import math

import pytest
import torch

from sampler import ode_step, sample, sde_step, sde_window, timesteps

# ---- sde_window ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps,start_range,size",
                         [(10, (0, 5), 3), (12, (2, 4), 1), (7, (0, 0), 6), (25, (3, 20), 4)])
def test_window_reaches_every_start_uniformly(num_steps, start_range, size):
    lo, hi = start_range
    g, draws = torch.Generator().manual_seed(0), 3000
    starts = []
    for _ in range(draws):
        w = sde_window(num_steps, start_range, size, generator=g)
        assert list(w) == list(range(w[0], w[0] + size))  # consecutive, of the asked size
        assert w[-1] <= num_steps - 2  # never the last step (t_next = 0)
        starts.append(w[0])
    counts = torch.bincount(torch.tensor(starts), minlength=hi + 1)
    assert set(starts) == set(range(lo, hi + 1))
    p = 1 / (hi - lo + 1)  # each count within 5 binomial standard errors of draws*p
    assert torch.all((counts[lo:].double() - draws * p).abs()
                     <= 5 * math.sqrt(draws * p * (1 - p)) + 1e-9)


def test_window_is_reproducible_from_the_generator():
    a = [sde_window(10, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert a[0] == a[1]


def test_window_bound_is_the_second_to_last_step():
    assert sde_window(9, (5, 5), 3) == range(5, 8)  # 5 + 3 = num_steps - 1: fits
    with pytest.raises(ValueError, match=r"^start_range\b"):
        sde_window(8, (5, 5), 3)  # would include step 7, the last


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_steps=10, size=0), "size"), (dict(num_steps=10, size=-2), "size"),
    (dict(num_steps=10, size=1.5), "size"), (dict(num_steps=0), "num_steps"),
    (dict(num_steps=10.0), "num_steps"), (dict(num_steps=10, start_range=(3, 2)), "start_range"),
    (dict(num_steps=10, start_range=(-1, 2)), "start_range"),
    (dict(num_steps=10, start_range=(0, 7)), "start_range"), (dict(num_steps=5), "start_range"),
])
def test_window_value_errors(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        sde_window(**kwargs)


# ---- sample() ------------------------------------------------------------------------------------

B, N_TOK, D = 3, 4, 5


class Recorder:
    """A deterministic nonlinear velocity field that records its calls (x_t, t, v)."""

    def __init__(self, seed=0):
        self.W = torch.randn(D, D, generator=torch.Generator().manual_seed(seed)) / math.sqrt(D)
        self.calls = []

    def __call__(self, x_t, t):
        v = torch.tanh(x_t @ self.W) - x_t * t[:, None, None]
        self.calls.append((x_t.clone(), t.clone(), v.clone()))
        return v


def _rollout(window, kind="sde", num_steps=10, seed=1, noise_level=0.7):
    fn, g = Recorder(), torch.Generator().manual_seed(seed)
    x_1 = torch.randn(B, N_TOK, D, generator=g)
    return fn, sample(fn, x_1, timesteps(num_steps), window, noise_level, generator=g,
                      kind=kind), x_1


@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("window", [range(2, 5), (0, 1, 2), (7, 8, 9), (1, 4), (), None])
def test_ode_outside_window_and_consistent_records(window, kind):
    fn, traj, x_1 = _rollout(window, kind)
    grid, w = timesteps(10), tuple(window or ())
    xs = [c[0] for c in fn.calls] + [traj.x_0]
    assert torch.equal(xs[0], x_1) and len(fn.calls) == 10 and traj.window == w
    for i, (x_t, t, v) in enumerate(fn.calls):
        assert t.shape == (B,) and torch.all(t == grid[i])
        if i not in w:  # ODE step, replayed exactly
            assert torch.equal(xs[i + 1], ode_step(x_t, v, grid[i], grid[i + 1]))
    K = len(w)
    assert traj.x_t.shape == traj.x_next.shape == traj.mean.shape == (B, K, N_TOK, D)
    assert traj.std.shape == (B, K, 1, 1) and traj.log_prob.shape == (B, K)
    assert torch.equal(traj.t, grid[list(w)]) and torch.equal(traj.t_next, grid[[i + 1 for i in w]])
    for k, i in enumerate(w):
        assert torch.equal(traj.x_t[:, k], xs[i]) and torch.equal(traj.x_next[:, k], xs[i + 1])
        if k + 1 < K and w[k + 1] == i + 1:  # consecutive window steps chain
            assert torch.equal(traj.x_next[:, k], traj.x_t[:, k + 1])
        x_t = traj.x_t[:, k].contiguous()  # a strided view can change matmul rounding by an ulp
        again = sde_step(x_t, fn(x_t, traj.t[k].expand(B)), traj.t[k], traj.t_next[k], 0.7,
                         x_next=traj.x_next[:, k], kind=kind)
        assert (torch.equal(again.log_prob, traj.log_prob[:, k])
                and torch.equal(again.mean, traj.mean[:, k]))
        assert torch.equal(again.std, traj.std[:, k])
        assert not torch.equal(traj.x_next[:, k], traj.mean[:, k]) or kind == "cps" and i == 9


def test_empty_window_is_the_pure_ode_loop():
    fn, traj, x_1 = _rollout(None)
    grid, x = timesteps(10), x_1
    for i in range(10):
        x = x + fn(x, grid[i].expand(B)) * (grid[i + 1] - grid[i])
    torch.testing.assert_close(traj.x_0, x, rtol=0, atol=0)
    assert torch.equal(_rollout(())[1].x_0, traj.x_0)


def test_same_seed_same_trajectory_other_seed_other():
    a, b, c = (_rollout(range(2, 5), seed=s)[1] for s in (1, 1, 2))
    assert torch.equal(a.x_0, b.x_0) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.x_0, c.x_0)


def test_reduce_is_passed_through():
    _, mean, _ = _rollout(range(2, 5))
    fn = Recorder()
    g = torch.Generator().manual_seed(1)
    x_1 = torch.randn(B, N_TOK, D, generator=g)
    summed = sample(fn, x_1, timesteps(10), range(2, 5), 0.7, generator=g, reduce="sum")
    torch.testing.assert_close(summed.log_prob, mean.log_prob * N_TOK * D, rtol=1e-5, atol=1e-5)


def test_no_autograd_graph_and_recomputed_window_steps_carry_gradients():
    """Rollout under no_grad with a trainable velocity; the update recomputes only
    the window steps."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, D))

    def velocity_fn(x_t, t):
        t_tok = t[:, None, None].expand(*x_t.shape[:-1], 1)
        return net(torch.cat([x_t, t_tok], dim=-1))

    g = torch.Generator().manual_seed(3)
    traj = sample(velocity_fn, torch.randn(B, N_TOK, D, generator=g), timesteps(10), range(1, 4),
                  0.7, generator=g)
    for name in ("x_0", "x_t", "x_next", "mean", "std", "log_prob", "t", "t_next"):
        tensor = getattr(traj, name)
        assert not tensor.requires_grad and tensor.grad_fn is None, name
    for k in range(len(traj.window)):
        for through in ("log_prob", "mean"):
            net.zero_grad()
            x_t = traj.x_t[:, k].contiguous()
            v = velocity_fn(x_t, traj.t[k].expand(B))
            step = sde_step(x_t, v, traj.t[k], traj.t_next[k], 0.7, x_next=traj.x_next[:, k])
            # ratio 1 at theta_old
            torch.testing.assert_close(step.log_prob, traj.log_prob[:, k], rtol=0, atol=0)
            getattr(step, through).sum().backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0
                       for p in net.parameters()), through
            assert not traj.x_next.requires_grad and not traj.log_prob.requires_grad


def test_log_prob_gradient_closed_form():
    """d log_prob / d v = (x_next - mean)/std^2 * (1 + sigma_t^2 (1 - t)/(2t)) * dt / D
    (reduce='mean')."""
    x, x_next = torch.randn(2, 6), torch.randn(2, 6)
    v = torch.randn(2, 6, requires_grad=True)
    t, t_next, eta = 0.6, 0.45, 0.7
    step = sde_step(x, v, t, t_next, eta, x_next=x_next)
    step.log_prob.sum().backward()
    sigma2, dt = eta**2 * t / (1 - t), t_next - t
    expected = ((x_next - step.mean.detach()) / step.std**2
                * (1 + sigma2 * (1 - t) / (2 * t)) * dt / 6)
    torch.testing.assert_close(v.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change,name", [
    (dict(grid=torch.tensor([0.9, 0.5, 0.0])), "grid"),
    (dict(grid=torch.tensor([1.0, 0.5, 0.1])), "grid"),
    (dict(grid=torch.tensor([1.0, 0.5, 0.6, 0.0])), "grid"),
    (dict(grid=torch.tensor([1.0, 0.5, 0.5, 0.0])), "grid"),
    (dict(grid=torch.ones(2, 2)), "grid"),
    (dict(grid=torch.tensor([1.0])), "grid"),
    (dict(window=(0, 10)), "window"),
    (dict(window=(-1, 0)), "window"),
    (dict(window=(3, 2)), "window"),
    (dict(window=(2, 2)), "window"),
    (dict(velocity_fn=lambda x, t: x[..., :-1]), r"velocity_fn"),
    (dict(reduce="max", window=None), "reduce"),
    (dict(kind="ode", window=None), "kind"),
    (dict(noise_level=-1.0), "noise_level"),
])
def test_sample_value_errors(change, name):
    kwargs = dict(velocity_fn=Recorder(), x_1=torch.randn(B, N_TOK, D), grid=timesteps(10),
                  window=range(2, 5), noise_level=0.7) | change
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        sample(**kwargs)
