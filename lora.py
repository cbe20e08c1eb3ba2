"""LoRA: low-rank adapters on the decoder's linear layers, a switch for small budgets (lora_rank > 0).

LoRA (Hu et al., 2021) freezes a pretrained weight W_0 and learns its update as a low-rank product:
h = W_0 x + (alpha / r) * B A x, with A (r, in) and B (out, r), r << min(in, out). B starts at zero, so
the adapted model starts equal to the base, and the trainable parameters per layer fall from
in*out to r*(in + out).

Here every nn.Linear inside the decoder layers (self_attn q/k/v/o and the MLP gate/up/down) of the
chosen experts becomes a LoRALinear: the same module with `lora_A` and `lora_B` registered on it, so
the base keys stay the official ones (`...q_proj.weight`) and the adapters sit beside them
(`...q_proj.lora_A`, `...q_proj.lora_B`), sorted into their expert by BagelMoT.expert_of. All other
parameters of an adapted expert (norms, embeddings, lm_head, time_embedder, vae2llm, llm2vae) are
frozen with its base weights; an expert without adapters trains fully (if it trains at all).

Merging folds the update into the base weight, W = W_0 + (alpha / r) * B A: the same function with no
adapter, so an export (merged_state_dict) is a plain official checkpoint, and merge_ turns the model
back into a plain BagelMoT.

Glossary
    W_0 (out, in) the frozen base weight, A = lora_A (r, in), B = lora_B (out, r), r the rank,
    alpha the LoRA alpha, scale = alpha / r (the update is scale * B A), x (..., in) the layer input.

Deviations / borrowed defaults
    1. A starts kaiming-uniform (a = sqrt(5), nn.Linear's own init), as the official loralib and
       peft's default; the paper's text says Gaussian. Drawn from a generator seeded by `seed`, not
       the global RNG. B starts at zero (the paper).
    2. Adapters are fp32 whatever the base dtype, and the adapter branch is computed in fp32, then
       cast to x's dtype (peft's default autocast_adapter_dtype also upcasts bf16 adapters).
    3. No lora_dropout (peft's default is 0 too), no rsLoRA scale, no trained biases.
"""
from __future__ import annotations

import math

import torch
from torch import nn

EXPERTS = {"both": ("reasoning", "denoising"), "reasoning": ("reasoning",),
           "denoising": ("denoising",)}
ADAPTER_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """An nn.Linear with an adapter: y = W_0 x + b + scale * (x A^T) B^T, the branch in fp32.
    add_lora turns a plain nn.Linear into one in place (its class is swapped, its weights kept)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        delta = (x.float() @ self.lora_A.T) @ self.lora_B.T      # (..., r) then (..., out), fp32
        return y + (self.lora_scale * delta).to(x.dtype)


def merged_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """W_0 + scale * B A, computed in fp32 and returned in W's dtype."""
    return (W.float() + scale * (B.float() @ A.float())).to(W.dtype)


def _adapted_linears(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora(policy) -> bool:
    """Whether the policy's model holds adapters."""
    return bool(_adapted_linears(policy.model))


def lora_parameters(policy) -> dict[str, nn.Parameter]:
    """The adapters, by their state-dict names (`language_model.model.layers.0.self_attn.q_proj.lora_A`)."""
    return {f"{name}.{key}": getattr(m, key)
            for name, m in _adapted_linears(policy.model).items() for key in ADAPTER_KEYS}


def adapted_experts(policy) -> set[str]:
    """The experts holding adapters ('reasoning', 'denoising'); empty without LoRA."""
    return {policy.model.expert_of(name) for name in lora_parameters(policy)}


def add_lora(policy, rank: int, alpha: float, experts: str = "both", seed: int = 0):
    """Adapt every nn.Linear of the decoder layers of `experts` ('both', 'reasoning', 'denoising'):
    A (rank, in) kaiming-uniform, B (out, rank) zero, both fp32; the adapted experts' base parameters
    are frozen. Returns the policy (changed in place)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"add_lora: rank={rank!r}, expected an integer >= 1 (0 means no LoRA: "
                         f"do not call add_lora)")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"add_lora: alpha={alpha!r}, expected a finite number > 0")
    if experts not in EXPERTS:
        raise ValueError(f"add_lora: experts={experts!r}, expected one of {', '.join(EXPERTS)}")
    if is_lora(policy):
        raise ValueError(f"add_lora: the policy already holds adapters (experts "
                         f"{sorted(adapted_experts(policy))}); merge_ them first")
    model, chosen = policy.model, EXPERTS[experts]
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(model.language_model.model.layers):
        for sub, m in layer.named_modules():
            name = f"language_model.model.layers.{i}.{sub}"
            if not isinstance(m, nn.Linear) or model.expert_of(f"{name}.weight") not in chosen:
                continue
            if type(m) is not nn.Linear:
                raise ValueError(f"add_lora: {name} is a {type(m).__name__}, not a plain nn.Linear "
                                 f"(add adapters before wrapping or sharding the model)")
            A = torch.empty(rank, m.in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)         # deviation 1
            m.__class__ = LoRALinear
            m.lora_A = nn.Parameter(A.to(m.weight.device))
            m.lora_B = nn.Parameter(torch.zeros(m.out_features, rank, device=m.weight.device))
            m.lora_scale = alpha / rank
    for name, p in model.named_parameters():
        if model.expert_of(name) in chosen and not name.endswith(ADAPTER_KEYS):
            p.requires_grad_(False)
    return policy


def initial_adapters(policy, seed: int = 0) -> dict[str, torch.Tensor]:
    """The starting value of every adapter by name (A kaiming-uniform from `seed` in add_lora's order,
    B zero), for a model materialised after its adapters were added (meta-device loading)."""
    g, out = torch.Generator().manual_seed(seed), {}
    for name, m in _adapted_linears(policy.model).items():
        A = torch.empty(m.lora_A.shape)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = A, torch.zeros(m.lora_B.shape)
    return out


@torch.no_grad()
def merged_state_dict(policy) -> dict[str, torch.Tensor]:
    """The official keys only, each adapted weight merged (W_0 + scale * B A): what an export writes.
    Without adapters, the plain state dict."""
    state = policy.model.state_dict()
    for name, m in _adapted_linears(policy.model).items():
        state[f"{name}.weight"] = merged_weight(m.weight, m.lora_A, m.lora_B, m.lora_scale)
        for key in ADAPTER_KEYS:
            del state[f"{name}.{key}"]
    return state


@torch.no_grad()
def merge_(policy):
    """Merge the adapters into the base weights in place and remove them: the model is a plain
    BagelMoT again, its formerly adapted experts trainable. Returns the policy."""
    if not is_lora(policy):
        raise ValueError("merge_: the policy holds no adapters")
    model, experts = policy.model, adapted_experts(policy)
    for m in _adapted_linears(model).values():
        m.weight.copy_(merged_weight(m.weight, m.lora_A, m.lora_B, m.lora_scale))
        del m.lora_A, m.lora_B, m.lora_scale
        m.__class__ = nn.Linear
    for name, p in model.named_parameters():
        if model.expert_of(name) in experts:
            p.requires_grad_(True)
    return policy


class AdaptersOff:
    """The frozen reference of an adapted policy: the same model with every adapter's scale at zero,
    i.e. the base weights, so no second model is held. Only valid while the base weights stay frozen
    (every trained expert carries adapters)."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        linears = _adapted_linears(self.policy.model).values()
        scales = [m.lora_scale for m in linears]
        for m in linears:
            m.lora_scale = 0.0
        try:
            return self.policy(*args, **kwargs)
        finally:
            for m, s in zip(linears, scales):
                m.lora_scale = s
