"""The flow convention, stated once in sampler.py and asserted here.

x_t = (1 - t)*x_0 + t*eps, t = 1 is noise, v = eps - x_0, sampling runs t from 1 to 0 on the
shifted grid.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sampler import ode_step, sample, sde_step, timesteps

BAGEL = Path(__file__).parent / "fixtures" / "bagel"
GRIDS = [(1, 1.0), (4, 3.0), (10, 3.0), (25, 0.5), (50, 7.0)]


# ---- the grid ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bagel():
    return (json.loads((BAGEL / "meta.json").read_text())["gen_loop"],
            load_file(BAGEL / "gen_loop.safetensors"))


def test_grid_equals_bagel_fixture(bagel):
    meta, loop = bagel
    # Bagel's num_timesteps = num_steps + 1
    grid = timesteps(meta["num_timesteps"] - 1, meta["timestep_shift"])
    assert grid.dtype == torch.float32
    assert torch.equal(grid, loop["timestep_grid"])
    assert grid[:-1].tolist() == meta["timesteps_used"]  # the model is called at grid[:-1]
    assert meta["n_forward_calls"] == grid.numel() - 1


@pytest.mark.parametrize("num_steps,shift", GRIDS)
def test_grid_runs_from_noise_to_data(num_steps, shift):
    grid = timesteps(num_steps, shift)
    assert grid.shape == (num_steps + 1,) and grid[0] == 1 and grid[-1] == 0
    assert torch.all(grid[1:] < grid[:-1])
    u = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)  # fp64 re-derivation of the shift
    torch.testing.assert_close(grid.double(), shift * u / (1 + (shift - 1) * u),
                               rtol=1e-6, atol=1e-7)


def test_grid_value_errors():
    for kwargs, name in [(dict(num_steps=0), "num_steps"), (dict(num_steps=2.0), "num_steps"),
                         (dict(num_steps=4, shift=0.0), "shift")]:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            timesteps(**kwargs)


def test_bagel_generation_loop_replays_with_ode_sampler(bagel):
    """Bagel's own 4-step loop (fixture): our ODE sampler, fed Bagel's velocities, visits the
    same x_t, t."""
    meta, loop = bagel
    grid = timesteps(meta["num_timesteps"] - 1, meta["timestep_shift"])
    calls = []

    def velocity_fn(x_t, t):
        i = len(calls)
        calls.append(i)
        torch.testing.assert_close(t, loop[f"step{i}.t"], rtol=0, atol=0)
        torch.testing.assert_close(x_t, loop[f"step{i}.x_t"], rtol=1e-6, atol=1e-6)
        return loop[f"step{i}.v"]

    out = sample(velocity_fn, loop["init_noise"], grid, None, 0.0)
    assert len(calls) == meta["n_forward_calls"]
    torch.testing.assert_close(out.x_0, loop["final_latent_packed"], rtol=1e-6, atol=1e-6)


# ---- exact velocity of a straight path -----------------------------------------------------------

@pytest.mark.parametrize("num_steps,shift", GRIDS)
def test_linear_path_maps_eps_to_x0(num_steps, shift):
    g = torch.Generator().manual_seed(num_steps)
    x_0, eps = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)

    def velocity_fn(x_t, t):  # v = eps - x_0 is constant along x_t = (1 - t)*x_0 + t*eps
        t = t.reshape(-1, 1, 1)
        torch.testing.assert_close(x_t, (1 - t) * x_0 + t * eps, rtol=1e-5, atol=1e-5)
        return eps - x_0

    grid = timesteps(num_steps, shift)
    torch.testing.assert_close(sample(velocity_fn, eps, grid, None, 0.0).x_0, x_0,
                               rtol=1e-5, atol=1e-5)
    # noise_level 0: the SDE step is the ODE step
    sde0 = sample(velocity_fn, eps, grid, range(num_steps), 0.0)
    torch.testing.assert_close(sde0.x_0, x_0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_noise_level_zero_sde_sampler_is_ode_sampler(kind):
    W = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) / 3

    def velocity_fn(x_t, t):
        return torch.tanh(x_t @ W) * (1 + t[:, None])

    x_1, grid = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)), timesteps(12)
    ode = sample(velocity_fn, x_1, grid, None, 0.0)
    sde = sample(velocity_fn, x_1, grid, range(12), 0.0, kind=kind)
    torch.testing.assert_close(sde.x_0, ode.x_0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sde.mean, sde.x_next, rtol=0, atol=0)


# ---- Gaussian data: the analytic velocity and the marginals --------------------------------------

M, S = 0.7, 0.5  # x_0 ~ N(M, S^2) elementwise


def gaussian_velocity(x_t, t):
    """v(x, t) = E[eps - x_0 | x_t = x] for x_0 ~ N(M, S^2), eps ~ N(0, 1), x_t = a*x_0 + t*eps,
    a = 1 - t.

    (v, x_t) is jointly Gaussian: E[v] = -M, Cov(v, x_t) = t - a*S^2, Var(x_t) = a^2 S^2 + t^2, so
    v = -M + k*(x - a*M) with k = (t - a*S^2) / (a^2 S^2 + t^2). Computed in fp64.
    """
    t = t.double().reshape(-1, *[1] * (x_t.ndim - 1))
    a = 1 - t
    k = (t - a * S**2) / (a**2 * S**2 + t**2)
    return (-M + k * (x_t.double() - a * M)).float()


def test_gaussian_velocity_is_the_conditional_mean():
    """Regression residual eps - x_0 - v(x_t) has zero mean and is uncorrelated with x_t
    (Gaussian => E[.|x_t])."""
    n, g = 200_000, torch.Generator().manual_seed(2)
    for t in (0.1, 0.5, 0.9, 1.0):
        x_0 = M + S * torch.randn(n, 1, generator=g, dtype=torch.float64)
        eps = torch.randn(n, 1, generator=g, dtype=torch.float64)
        x_t = (1 - t) * x_0 + t * eps
        r = (eps - x_0) - gaussian_velocity(x_t, torch.full((n,), t)).double()
        for stat in (r, r * x_t):
            assert abs(stat.mean().item()) < 5 * stat.std().item() / math.sqrt(n) + 1e-6


def _chain_moments(grid, window, noise_level):
    """Exact mean/variance of the discretised chain (fp64, score-correction form): v is affine in x,
    so each step is x -> A*x + C + std*z and the Gaussian N(mean, var) stays Gaussian."""
    mean, var = 0.0, 1.0
    g = grid.double().tolist()
    for i, (t, t_next) in enumerate(zip(g[:-1], g[1:])):
        a = 1 - t
        k = (t - a * S**2) / (a**2 * S**2 + t**2)
        b, dt = -M - k * a * M, t_next - t
        sigma2 = noise_level**2 * t / (1 - (t_next if t == 1 else t)) if i in window else 0.0
        A = 1 + k * dt + sigma2 / (2 * t) * (1 + a * k) * dt
        C = b * dt + sigma2 / (2 * t) * a * b * dt
        mean, var = A * mean + C, A * A * var + sigma2 * abs(dt)
    return mean, var


def test_discretised_chain_converges_to_the_data():
    for window_of in (lambda n: (), lambda n: range(n), lambda n: range(3, 6)):
        errors = []
        for num_steps in (50, 1000):
            mean, var = _chain_moments(timesteps(num_steps), window_of(num_steps), 0.7)
            assert abs(mean - M) < 1e-9
            errors.append(abs(var - S**2))
        assert errors[1] < errors[0] / 5 and errors[1] < 0.01 * S**2


@pytest.mark.parametrize("window_of", [lambda n: range(n), lambda n: range(3, 6)],
                         ids=["all_steps", "window"])
def test_sde_marginals_match_ode_and_data(window_of):
    num_steps, n, eta = 50, 50_000, 0.7
    grid, window = timesteps(num_steps), window_of(num_steps)
    g = torch.Generator().manual_seed(3)
    x_1 = torch.randn(1, n, generator=g)
    runs = {"ode": (sample(gaussian_velocity, x_1, grid, None, 0.0).x_0,
                    _chain_moments(grid, (), 0.0)),
            "sde": (sample(gaussian_velocity, x_1, grid, window, eta, generator=g).x_0,
                    _chain_moments(grid, window, eta))}
    for name, (x_0, (mean, var)) in runs.items():  # Monte Carlo vs the exact discretised moments
        se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
        assert abs(x_0.double().mean().item() - mean) < 5 * se_mean, name
        assert abs(x_0.double().var().item() - var) < 5 * se_var, name
        # ... which equal the data's up to the grid's discretisation error (relative, 50 steps)
        assert abs(mean - M) < 1e-9 and abs(var - S**2) < 0.15 * S**2, name
    # SDE vs ODE directly; the standard errors of a difference (bounded as if independent;
    # they share x_1)
    (ode, (_, var_ode)), (sde, (_, var_sde)) = runs["ode"], runs["sde"]
    se_mean, se_var = (math.sqrt((var_ode + var_sde) / n),
                       math.sqrt(2 * (var_ode**2 + var_sde**2) / (n - 1)))
    assert abs(sde.double().mean().item() - ode.double().mean().item()) < 5 * se_mean
    assert (abs(sde.double().var().item() - ode.double().var().item() - (var_sde - var_ode))
            < 5 * se_var)


# ---- the log-prob is the density of the transition -----------------------------------------------

@pytest.mark.parametrize("t,t_next", [(1.0, 0.96), (0.6, 0.46), (0.27, 0.0)])
def test_log_prob_is_the_transition_density(t, t_next):
    """exp(log_prob) over a fine grid of x_next integrates to 1, with mean `mean` and
    variance std^2."""
    x_t, v = torch.tensor([[0.3]]), torch.tensor([[-1.2]])
    step = sde_step(x_t, v, t, t_next, 0.7, reduce="sum")
    mu, sd = step.mean.item(), step.std.item()
    xs = torch.linspace(mu - 10 * sd, mu + 10 * sd, 20001)[:, None]
    B = xs.shape[0]
    p = sde_step(x_t.expand(B, 1), v.expand(B, 1), t, t_next, 0.7, x_next=xs,
                 reduce="sum").log_prob.double().exp()
    x = xs[:, 0].double()
    mass = torch.trapezoid(p, x)
    torch.testing.assert_close(mass.item(), 1.0, rtol=0, atol=1e-6)
    torch.testing.assert_close((torch.trapezoid(p * x, x) / mass).item(), mu,
                               rtol=0, atol=1e-5 * max(1, abs(mu)))
    var = torch.trapezoid(p * (x - mu) ** 2, x) / mass
    torch.testing.assert_close(var.item(), sd**2, rtol=1e-4, atol=0)
    z = (xs[:, 0].double() - mu) / sd  # and pointwise, the normal density
    torch.testing.assert_close(p, torch.exp(-z**2 / 2) / (sd * math.sqrt(2 * math.pi)),
                               rtol=1e-4, atol=0)


def test_ode_step_is_bagels_euler_step():
    """Bagel: x <- x - v*(t_i - t_{i+1}); ours: x + v*(t_next - t), bit-identical."""
    x, v = torch.randn(5, 7), torch.randn(5, 7)
    grid = timesteps(10)
    for i in range(10):
        assert torch.equal(ode_step(x, v, grid[i], grid[i + 1]), x - v * (grid[i] - grid[i + 1]))
