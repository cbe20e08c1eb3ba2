"""Loaders for the FlowGRPO / GRPO-Guard / TRL golden vectors in tests/fixtures/flowgrpo
(see its README).

Test files iterate over whatever cases, variants and steps the JSON files list, so a case added to
the fixtures is tested with no code change.
"""

import functools
import json
from pathlib import Path

from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "flowgrpo"


def _path(name):
    path = FIXTURES / name
    if not path.is_file():
        raise FileNotFoundError(f"golden fixture missing: {path}")
    return path


@functools.lru_cache(maxsize=None)
def load_json(name):
    with open(_path(name)) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def load_tensors(name):
    return load_file(str(_path(name)))


def tensor(name, key):
    """One tensor of a safetensors fixture; KeyError naming the file and key if absent."""
    tensors = load_tensors(name)
    if key not in tensors:
        raise KeyError(f"{name}: no key {key!r}")
    return tensors[key]


def has(name, key):
    return key in load_tensors(name)


# FlowGRPO / GRPO-Guard loss fixture ---------------------------------------------------------------
FLOW = "flowgrpo_loss"


def flow_cases():
    """(variant, config, j) for every variant in JSON `configs` and every step
    in `train_steps_j`."""
    meta = load_json(FLOW + ".json")
    return [(v, cfg, j) for v, cfg in meta["configs"].items() for j in meta["train_steps_j"]]


def flow_case_id(case):
    return f"{case[0]}-j{case[2]}"


def flow(key):
    return tensor(FLOW + ".safetensors", key)


def flow_step(variant, j, field):
    return flow(f"{variant}/j{j}/{field}")


def chain_step(j):
    """The rollout tensors of chain step j: old log-prob (B,), advantages (B,), old/new/ref
    means, v_new, v_ref."""
    return {
        "log_prob_old": flow("chain/log_probs")[:, j],
        "advantages": flow("chain/advantages")[:, j],
        "mean_old": flow("chain/prev_sample_mean")[:, j],
        "mean_new": flow(f"chain/j{j}/prev_sample_mean_new"),
        "mean_ref": flow(f"chain/j{j}/prev_sample_mean_ref"),
        "v_new": flow("chain/v_new")[:, j],
        "v_ref": flow("chain/v_ref")[:, j],
        "sigma": flow("chain/timesteps")[:, j] / 1000.0,  # diffusers timestep = 1000 * sigma
    }


def transition_std(variant, j):
    """s = std_dev_t * sqrt(-dt), the transition std of the official SDE step, (B, 1, 1, 1)."""
    return flow_step(variant, j, "std_dev_t") * flow_step(variant, j, "sqrt_neg_dt")


# TRL GRPO fixture ---------------------------------------------------------------------------------
TRL = "trl_grpo"


def trl_cases():
    return load_json(TRL + ".json")["cases"]


def trl(key):
    return tensor(TRL + ".safetensors", key)


def trl_has(key):
    return has(TRL + ".safetensors", key)


def flow_policy_term(variant, cfg, j):
    """The official per-step policy loss recomposed from our functions (Eq. (4), Eq. (5),
    Eq. (6); RatioNorm as the official code)."""
    from losses import flow_grpo_loss, log_ratio, ratio_norm
    chain = chain_step(j)
    lr = log_ratio(flow_step(variant, j, "log_prob_new"), chain["log_prob_old"])
    dt = None
    if cfg["rationorm"]:
        lr = ratio_norm(lr, chain["mean_new"], chain["mean_old"], transition_std(variant, j),
                        bias="batch")
        dt = flow_step(variant, j, "sqrt_neg_dt").mean() ** 2
    return flow_grpo_loss(lr, chain["advantages"], cfg["clip_range"], cfg["adv_clip_max"], dt)
