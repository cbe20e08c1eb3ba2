"""Eq. (3): the SDE/CPS step against FlowGRPO's golden vectors, its closed form, an fp64
re-derivation, bad input."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sampler import ode_step, sde_step

FIXTURES = Path(__file__).parent / "fixtures" / "flowgrpo"
META = json.loads((FIXTURES / "sde_step.json").read_text())
CASES = META["cases"]
RTOL, ATOL = 1e-5, 1e-5  # README: fp32 re-implementation


@pytest.fixture(scope="module")
def tensors():
    return load_file(FIXTURES / "sde_step.safetensors")


def _times(tensors, case):
    """Map the fixture's timestep (= 1000*sigma, one per sample) to (t, t_next) on the case's
    schedule."""
    sched = f"schedule_{case['num_inference_steps']}"
    sigmas, sched_timesteps = tensors[f"{sched}/sigmas"], tensors[f"{sched}/timesteps"]
    timestep = tensors[f"{case['name']}/timestep"]
    idx = (sched_timesteps[None, :] - timestep[:, None]).abs().argmin(dim=1)
    assert torch.equal(sched_timesteps[idx], timestep), "timestep not on the schedule"
    assert idx.tolist() == case["step_index"], "timestep disagrees with the JSON step_index"
    return sigmas[idx], sigmas[idx + 1]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_flowgrpo(tensors, case):
    g = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(case["name"] + "/")}
    t, t_next = _times(tensors, case)
    kw = dict(noise_level=case["noise_level"], kind=case["sde_type"])
    if case["mode"] == "given":
        out = sde_step(g["sample"], g["model_output"], t, t_next, x_next=g["prev_sample"], **kw)
        assert out.x_next is g["prev_sample"]
    else:
        generator = torch.Generator().manual_seed(case["generator_seed"])
        out = sde_step(g["sample"], g["model_output"], t, t_next, generator=generator, **kw)
        again = sde_step(g["sample"], g["model_output"], t, t_next, noise=g["variance_noise"], **kw)
        torch.testing.assert_close(again.x_next, out.x_next, rtol=0, atol=0)
    std = g["std_dev_t"] * g["sqrt_neg_dt"] if case["sde_type"] == "sde" else g["std_dev_t"]
    torch.testing.assert_close(out.x_next, g["prev_sample"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.mean, g["prev_sample_mean"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.log_prob, g["log_prob"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.std, std.expand(out.std.shape), rtol=RTOL, atol=ATOL)
    assert out.std.shape == (g["sample"].shape[0],) + (1,) * (g["sample"].ndim - 1)


@pytest.mark.parametrize("case", [c for c in CASES if c["sde_type"] == "sde"][:1],
                         ids=lambda c: c["name"])
def test_golden_first_step_std_depends_on_grid(tensors, case):
    """NOTES §2: at sigma == 1 the diffusion coefficient uses sigmas[1] (fixture JSON names it)."""
    N = str(case["num_inference_steps"])
    sigma_max = META["schedules"][N]["sigma_max_used_for_sigma_eq_1"]
    x = tensors[f"{case['name']}/sample"]
    out = sde_step(x, torch.zeros_like(x), 1.0, sigma_max, case["noise_level"])
    expected = case["noise_level"] * math.sqrt(1 / (1 - sigma_max)) * math.sqrt(1 - sigma_max)
    torch.testing.assert_close(out.std, torch.full_like(out.std, expected), rtol=1e-6, atol=0)


# ---- closed form ---------------------------------------------------------------------------------

def _inputs(B=3, shape=(2, 3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g), g


TIMES = [(0.7, 0.55), (1.0, 0.9), (0.3, 0.0), (torch.tensor(0.5), torch.tensor(0.2)),
         (torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.95, 0.4, 0.0]))]


@pytest.mark.parametrize("t,t_next", TIMES)
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_closed_form_std_and_log_prob(t, t_next, kind):
    x, v, g = _inputs()
    eta = 0.7
    tb = torch.as_tensor(t, dtype=torch.float32).expand(3).reshape(3, 1, 1, 1)
    nb = torch.as_tensor(t_next, dtype=torch.float32).expand(3).reshape(3, 1, 1, 1)
    x_next = x + 0.3 * torch.randn(x.shape, generator=g)
    out = {r: sde_step(x, v, t, t_next, eta, x_next=x_next, reduce=r, kind=kind)
           for r in ("mean", "sum")}
    if kind == "sde":  # std = sigma_t*sqrt(|dt|); at t = 1 that is exactly eta
        expected_std = torch.where(tb == 1, torch.full_like(tb, eta),
                                   eta * torch.sqrt(tb / (1 - tb) * (tb - nb)))
        density = torch.distributions.Normal(out["mean"].mean, expected_std).log_prob(x_next)
    else:
        expected_std = nb * math.sin(eta * math.pi / 2)
        density = -(x_next - out["mean"].mean) ** 2
    torch.testing.assert_close(out["mean"].std, expected_std, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["mean"].log_prob, density.mean(dim=(1, 2, 3)),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["sum"].log_prob, density.sum(dim=(1, 2, 3)),
                               rtol=1e-5, atol=1e-4)
    assert out["mean"].x_next is x_next


@pytest.mark.parametrize("t,t_next", TIMES)
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_noise_level_zero_is_ode(t, t_next, kind):
    x, v, _ = _inputs(seed=1)
    out = sde_step(x, v, t, t_next, 0.0, kind=kind)
    torch.testing.assert_close(out.mean, ode_step(x, v, t, t_next), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.x_next, out.mean, rtol=0, atol=0)
    assert torch.all(out.std == 0) and torch.isfinite(out.log_prob).all()


def test_last_cps_step_is_deterministic_and_finite():
    x, v, _ = _inputs(seed=2)
    out = sde_step(x, v, 0.2, 0.0, 0.8, kind="cps")
    assert torch.all(out.std == 0) and torch.equal(out.x_next, out.mean)
    assert torch.equal(out.log_prob, torch.zeros(3))


def test_gradients_only_through_mean():
    x, v, g = _inputs(seed=3)
    v = v.requires_grad_()
    x_next = (x + torch.randn(x.shape, generator=g)).requires_grad_()
    out = sde_step(x, v, 0.8, 0.6, 0.7, x_next=x_next)
    out.log_prob.sum().backward()
    assert x_next.grad is None and v.grad is not None and v.grad.abs().sum() > 0
    sampled = sde_step(x, v, 0.8, 0.6, 0.7, generator=g)
    assert not sampled.x_next.requires_grad and sampled.mean.requires_grad


def test_computes_in_float32():
    x, v, _ = _inputs(seed=4)
    out = sde_step(x.double(), v.bfloat16(), 0.8, 0.6, 0.7)
    assert out.mean.dtype == out.log_prob.dtype == out.x_next.dtype == torch.float32


# ---- independent fp64 re-derivation (score-correction form) --------------------------------------

def _mean_fp64(x, v, t, t_next, eta, kind):
    x, v = x.double(), v.double()
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
    t_next = torch.as_tensor(t_next, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
    dt = t_next - t
    eps_hat = x + (1 - t) * v
    if kind == "cps":  # interpolate predicted data and predicted noise, grouped by x and v
        c = math.cos(eta * math.pi / 2)
        return x * (1 - t_next + t_next * c) + v * (t_next * c * (1 - t) - t * (1 - t_next))
    denom = torch.where(t == 1, 1 - t_next, 1 - t)
    sigma_t2 = eta**2 * t / denom
    # drift v - (sigma^2/2)*score, score = -eps_hat/t
    return x + v * dt + sigma_t2 / (2 * t) * eps_hat * dt


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fp64_rederivation_on_fixture_inputs(tensors, case):
    g = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(case["name"] + "/")}
    t, t_next = _times(tensors, case)
    out = sde_step(g["sample"], g["model_output"], t, t_next, case["noise_level"],
                   x_next=g["prev_sample"], kind=case["sde_type"])
    mu = _mean_fp64(g["sample"], g["model_output"], t, t_next, case["noise_level"],
                    case["sde_type"])
    torch.testing.assert_close(out.mean.double(), mu, rtol=1e-5, atol=2e-6)
    if case["sde_type"] == "sde":
        s = out.std.double()
        lp = (-(g["prev_sample"].double() - mu) ** 2 / (2 * s**2) - s.log()
              - 0.5 * math.log(2 * math.pi))
        torch.testing.assert_close(out.log_prob.double(), lp.mean(dim=tuple(range(1, lp.ndim))),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,t_next", TIMES)
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_fp64_rederivation_random(t, t_next, kind):
    x, v, _ = _inputs(seed=5)
    out = sde_step(x, v, t, t_next, 0.9, kind=kind)
    tb, nb = torch.as_tensor(t).expand(3), torch.as_tensor(t_next).expand(3)
    torch.testing.assert_close(out.mean.double(), _mean_fp64(x, v, tb, nb, 0.9, kind),
                               rtol=1e-5, atol=2e-6)


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(v=torch.zeros(3, 2, 3)), "v"),
    (dict(x_next=torch.zeros(2, 2, 3, 4)), "x_next"),
    (dict(noise=torch.zeros(3, 2, 3, 5)), "noise"),
    (dict(t=1.2), "t"),
    (dict(t_next=-0.1), "t_next"),
    (dict(t=0.4, t_next=0.5), "t_next"),
    (dict(t=0.5, t_next=0.5), "t_next"),
    (dict(t=torch.tensor([0.5, 0.6])), "t"),
    (dict(t_next=torch.zeros(3, 1)), "t_next"),
    (dict(reduce="max"), "reduce"),
    (dict(kind="ddim"), "kind"),
    (dict(noise_level=-0.1), "noise_level"),
    (dict(noise_level=1.5, kind="cps"), "noise_level"),
])
def test_value_errors(change, match):
    x, v, _ = _inputs(seed=6)
    kw = dict(x_t=x, v=v, t=0.8, t_next=0.6, noise_level=0.7) | change
    # the message starts with the argument's name
    with pytest.raises(ValueError, match=rf"^{match}\b"):
        sde_step(**kw)


@pytest.mark.parametrize("change,match",
                         [(dict(v=torch.zeros(3, 2)), "v"), (dict(t=0.5, t_next=0.7), "t_next"),
                          (dict(t=2.0), "t")])
def test_ode_step_value_errors(change, match):
    x, v, _ = _inputs(seed=7)
    with pytest.raises(ValueError, match=rf"^{match}\b"):
        ode_step(**(dict(x_t=x, v=v, t=0.8, t_next=0.6) | change))
