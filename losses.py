"""UniGRPO losses: group advantages, text GRPO, FlowGRPO with RatioNorm, the velocity regulariser,
Eq. (7).

Every equation of the paper except the SDE step (Eq. (3), in sampler.py) is a pure tensor function
here: tensors in, one tensor out, no model and no state. Logging statistics (clip fraction, approx
KL, ratio summary) are separate helpers that the caller applies to the same tensors. Sign
convention: the paper maximises J; every function here returns a quantity to *minimise* (the
negative surrogate).

Glossary (shape letters: R rows = B prompts x G group size, T text tokens, K window steps,
N/D latent dims)
  r_i         scalar reward of sample i; samples are ordered group-contiguous,
              group b = rows b*G .. b*G+G-1
  A_i         group-relative advantage (Eq. (1)), shared by every token and every denoising step
              of sample i
  logp        log pi_theta of each reasoning token (R, T); logp_old from the rollout,
              logp_ref from the reference
  M           completion mask (R, T), 1 for real tokens
  r_t         importance ratio exp(log r_t);
              log r_t = log p_theta(x_next|x_t) - log p_old(x_next|x_t) (Eq. (4))
  clip_eps    PPO clip half-width eps; the clip range is [1 - clip_eps, 1 + clip_eps_high]
  mu, mu_old  mean of the SDE transition under the current / rollout policy (from sampler.py)
  s           transition std of that step, std_dev_t * sqrt(|dt|) in FlowGRPO's notation
  sigma_t     FlowGRPO's diffusion coefficient std_dev_t = s / sqrt(|dt|)
  dt          signed step (< 0 when sampling t: 1 -> 0); only |dt| is used here
  beta        weight of the KL to the reference (text: k3 estimator; paper uses beta = 0)
  lam         weight of the flow objective in Eq. (7) (paper: 1)
  v, v_ref    velocities of the policy and the frozen reference at the same (x_t, t) (Eq. (8))

Deviations / borrowed defaults
  1. Eq. (1) std: population std (ddof 0, FlowGRPO's PerPromptStatTracker) by default; std="sample"
     gives TRL's unbiased std, std="none" TRL's scale_rewards='none'. scope="batch" divides by the
     std of all R rewards (FlowGRPO global_std=True, TRL scale_rewards='batch'); the mean is always
     per group. eps = 1e-4 as both.
  2. Eq. (6) advantage clamp to [-adv_clip_max, adv_clip_max]: FlowGRPO's option (5 in its configs);
     off by default.
  3. Eq. (5) RatioNorm: per-sample bias by default, the form the GRPO-Guard author intended
     (flow_grpo issue #244). bias="batch" reproduces the official code, which averages the bias over
     the batch as well and uses the batch mean of s
     (official: mean_b(std_dev_t) * mean_b(sqrt(-dt)), the same when the batch shares the step, as
     in a FlowGRPO-Fast window). The bias is not detached (as official).
  For K window steps, ratio_norm takes log_r (R, K) with means (R, K, ...) and works per step.
  4. GRPO-Guard's 1/|dt| reweighting is the `dt` option of Eq. (6)
     (official: / mean_b(sqrt(-dt))^2).
  5. Latent KL ablation (replaced by Eq. (8) in the paper): FlowGRPO divides by 2*sigma_t^2, not by
     the transition variance s^2, so its "KL" is the exact Gaussian KL times |dt|; exact=True gives
     the exact one.
  6. Eq. (2) reductions are TRL's loss_type (grpo default, bnpo, dapo, dr_grpo), single process, no
     gradient accumulation (there dapo == bnpo); level="sequence" is TRL's GSPO-style sequence-level
     ratio. `reduction` (Config.text_reduction) always names this token reduction; sampler.py's
     `reduce` (Config.logprob_reduce) is the other idea, the log-density's over latent elements.
"""

import torch
from einops import rearrange

TOKEN_REDUCTIONS = ("grpo", "bnpo", "dapo", "dr_grpo")


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _same_shape(name_a, a, name_b, b):
    _check(a.shape == b.shape,
           f"{name_b} has shape {tuple(b.shape)}, expected {name_a}'s {tuple(a.shape)}")


# ----------------------------------------------------------------------------------------------- Eq. (1)
def group_advantages(rewards, group_size, eps=1e-4, std="population", scope="group"):
    """Eq. (1): A_i = (r_i - mean(r_group(i))) / (std + eps), std over the group (scope="group") or
    over all R rewards (scope="batch"); std="population" (ddof 0), "sample" (ddof 1) or "none"
    (A_i = r_i - mean).

    rewards: (R,) group-contiguous, R = B*G. Groups whose rewards are all equal get exactly A = 0.
    Returns (R,) in rewards' dtype (computed in float64; integer rewards give the default float
    dtype).
    """
    _check(isinstance(rewards, torch.Tensor) and rewards.ndim == 1,
           f"rewards must be a 1-D tensor (R,), got shape {tuple(getattr(rewards, 'shape', ()))}")
    _check(isinstance(group_size, int) and group_size >= 1,
           f"group_size must be an int >= 1, got {group_size!r}")
    _check(rewards.numel() % group_size == 0,
           f"group_size={group_size} does not divide the number of rewards R={rewards.numel()}")
    _check(std in ("population", "sample", "none"),
           f"std must be 'population', 'sample' or 'none', got {std!r}")
    _check(scope in ("group", "batch"), f"scope must be 'group' or 'batch', got {scope!r}")
    r = rearrange(rewards.double(), "(b g) -> b g", g=group_size)           # (B, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if std == "none":
        A = centred
    else:
        ddof = 0 if std == "population" else 1
        n = group_size if scope == "group" else rewards.numel()
        # one sample: no spread to measure, and every group is flat
        if n <= ddof:
            spread = torch.zeros_like(r)
        else:
            spread = (r.std(dim=1, correction=ddof, keepdim=True) if scope == "group"
                      else r.std(correction=ddof))
        A = centred / (spread + eps)
    # no signal: exactly zero
    flat_group = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))
    A = torch.where(flat_group, torch.zeros_like(A), A)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    return rearrange(A, "b g -> (b g)").to(out_dtype)


# ----------------------------------------------------------------------------------------------- Eq. (2)
def clipped_surrogate(r_t, A, clip_eps, clip_eps_high=None):
    """Per-entry PPO term max(-A r_t, -A clip(r_t, 1 - clip_eps, 1 + clip_eps_high))
    (Eq. (2) and Eq. (6)).

    A broadcasts against r_t. clip_eps_high defaults to clip_eps (symmetric clip).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    _check(clip_eps > 0, f"clip_eps must be > 0, got {clip_eps}")
    _check(eps_high > 0, f"clip_eps_high must be > 0, got {eps_high}")
    unclipped = -A * r_t
    clipped = -A * torch.clamp(r_t, 1.0 - clip_eps, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped)


def text_importance_ratio(logp, logp_old, mask, level="token"):
    """Eq. (2) ratio: r_{i,t} = exp(logp - logp_old) per token (R, T), or for level="sequence"
    r_i = exp(sum_t M (logp - logp_old) / sum_t M) per sequence (R, 1) (GSPO, as TRL)."""
    _check(level in ("token", "sequence"), f"level must be 'token' or 'sequence', got {level!r}")
    log_r = logp - logp_old
    if level == "token":
        return torch.exp(log_r)
    M = mask.to(logp.dtype)
    return torch.exp((log_r * M).sum(-1, keepdim=True) / M.sum(-1, keepdim=True).clamp(min=1.0))


def k3_kl(logp, logp_ref):
    """Per-token KL estimate to the reference: exp(logp_ref - logp) - (logp_ref - logp) - 1
    (k3, as TRL)."""
    delta = logp_ref - logp
    return torch.exp(delta) - delta - 1.0


def text_grpo_per_token_loss(logp, logp_old, advantages, mask, clip_eps, clip_eps_high=None,
                             logp_ref=None, beta=0.0, level="token"):
    """Eq. (2) per token, before reduction: max(-A_i r, -A_i clip(r, 1-eps, 1+eps_high)) + beta*k3
    -> (R, T).

    Padding positions are computed too (the reduction masks them), as TRL does.
    """
    _check(logp.ndim == 2, f"logp must be (R, T), got shape {tuple(logp.shape)}")
    _same_shape("logp", logp, "logp_old", logp_old)
    _same_shape("logp", logp, "mask", mask)
    _check(advantages.shape == logp.shape[:1],
           f"advantages has shape {tuple(advantages.shape)}, expected (R,) = ({logp.shape[0]},)")
    _check(beta >= 0, f"beta must be >= 0, got {beta}")
    r = text_importance_ratio(logp, logp_old, mask, level)                  # (R, T) or (R, 1)
    loss = clipped_surrogate(r, advantages[:, None], clip_eps, clip_eps_high).expand_as(logp)
    if logp_ref is not None:
        _same_shape("logp", logp, "logp_ref", logp_ref)
    if beta != 0:
        _check(logp_ref is not None, "logp_ref is required when beta > 0")
        loss = loss + beta * k3_kl(logp, logp_ref)
    return loss


def reduce_token_loss(per_token_loss, mask, reduction="grpo", max_completion_length=None):
    """Eq. (2) reduction over tokens (TRL loss_type): "grpo" mean_i[sum_t M l / sum_t M];
    "bnpo"/"dapo" sum(M l) / sum(M); "dr_grpo" sum(M l) / (R * max_completion_length)."""
    _check(reduction in TOKEN_REDUCTIONS, f"reduction must be one of {TOKEN_REDUCTIONS}, got {reduction!r}")
    _same_shape("per_token_loss", per_token_loss, "mask", mask)
    M = mask.to(per_token_loss.dtype)
    masked = per_token_loss * M
    if reduction == "grpo":
        return (masked.sum(-1) / M.sum(-1).clamp(min=1.0)).mean()
    if reduction in ("bnpo", "dapo"):
        return masked.sum() / M.sum().clamp(min=1.0)
    L = per_token_loss.shape[1] if max_completion_length is None else max_completion_length
    _check(isinstance(L, int) and L >= 1, f"max_completion_length must be an int >= 1, got {L!r}")
    return masked.sum() / (per_token_loss.shape[0] * L)


def text_grpo_loss(logp, logp_old, advantages, mask, clip_eps, reduction="grpo", clip_eps_high=None,
                   logp_ref=None, beta=0.0, max_completion_length=None, level="token"):
    """Eq. (2):
    J_text = -(1/G) sum_i (1/|o_i|) sum_t min(r_{i,t} A_i, clip(r_{i,t}, 1-eps, 1+eps_high) A_i)
    + beta * KL_k3 (negated objective; reduction="grpo" is the paper's per-sequence then batch
    mean).

    logp, logp_old, logp_ref, mask: (R, T); advantages: (R,). Returns a 0-dim loss tensor.
    """
    per_token = text_grpo_per_token_loss(logp, logp_old, advantages, mask, clip_eps, clip_eps_high,
                                         logp_ref, beta, level)
    return reduce_token_loss(per_token, mask, reduction, max_completion_length)


# ----------------------------------------------------------------------------------------------- Eq. (4)
def log_ratio(log_prob, log_prob_old):
    """Eq. (4): log r_t = log p_theta(x_next | x_t) - log p_theta_old(x_next | x_t), per window
    step.

    Not detached: log_prob_old comes from the rollout and carries no graph.
    """
    _same_shape("log_prob", log_prob, "log_prob_old", log_prob_old)
    return log_prob - log_prob_old


# ----------------------------------------------------------------------------------------------- Eq. (5)
def _step_scale(log_r, mean, mean_old, std, other="mean_old"):
    """Validate RatioNorm / KL inputs; return s broadcast to log_r's shape and
    mean_dims (mu - mu_old)^2."""
    _same_shape("mean", mean, other, mean_old)
    n = log_r.ndim
    _check(tuple(mean.shape[:n]) == tuple(log_r.shape),
           f"mean has shape {tuple(mean.shape)}; "
           f"its leading dims must equal log_r's {tuple(log_r.shape)}")
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    _check(std.ndim <= mean.ndim, f"std has more dims than mean: {tuple(std.shape)}")
    std = std.reshape((1,) * (mean.ndim - std.ndim) + tuple(std.shape))
    _check(all(d == 1 for d in std.shape[n:])
           and all(d in (1, b) for d, b in zip(std.shape[:n], log_r.shape)),
           f"std must be a scalar or of shape (R, 1, ..., 1) matching mean, got {tuple(std.shape)}")
    s = std.reshape(std.shape[:n]).expand(log_r.shape)
    _check(bool((s > 0).all()), "std must be > 0")
    dmu2 = (mean - mean_old).pow(2)
    feature_dims = tuple(range(n, mean.ndim))
    # dim=() would average the batch too
    msq = dmu2.mean(dim=feature_dims) if feature_dims else dmu2
    return s, msq


def _ratio_norm_parts(log_r, mean, mean_old, std, bias):
    _check(bias in ("sample", "batch"), f"bias must be 'sample' or 'batch', got {bias!r}")
    s, msq = _step_scale(log_r, mean, mean_old, std)
    # official: one s and one bias per step, averaged over the batch
    if bias == "batch":
        s, msq = s.mean(dim=0), msq.mean(dim=0)
    return msq / (2 * s**2), s


def ratio_norm_bias(log_r, mean, mean_old, std, bias="sample"):
    """Eq. (5) bias: b = mean_dims (mu - mu_old)^2 / (2 s^2), per sample ("sample") or, as the
    official code, one value averaged over the batch with s = mean_b(std) ("batch")."""
    return _ratio_norm_parts(log_r, mean, mean_old, std, bias)[0]


def ratio_norm(log_r, mean, mean_old, std, bias="sample"):
    """Eq. (5): log r_t^norm = (log r_t + mean_dims (mu - mu_old)^2 / (2 s^2)) * s
    (GRPO-Guard RatioNorm).

    log_r: (R,) (or (R, K) with mean (R, K, ...)); mean, mean_old: the step's transition means;
    std: the transition std s, scalar or (R, 1, ..., 1). With bias="batch", s is the batch mean of
    std (official).
    Returns the normalised log-ratio (not detached); the caller exponentiates it to get r_t.
    """
    b, s = _ratio_norm_parts(log_r, mean, mean_old, std, bias)
    return (log_r + b) * s


# ----------------------------------------------------------------------------------------------- Eq. (6)
def clamp_advantages(advantages, adv_clip_max=None):
    """A clamped to [-adv_clip_max, adv_clip_max] (FlowGRPO's adv_clip_max); unchanged if None."""
    if adv_clip_max is None:
        return advantages
    _check(adv_clip_max > 0, f"adv_clip_max must be > 0, got {adv_clip_max}")
    return torch.clamp(advantages, -adv_clip_max, adv_clip_max)


def flow_grpo_loss(log_r, advantages, clip_eps, adv_clip_max=None, dt=None):
    """Eq. (6):
    J_flow = mean_{i,k} max(-A_i r_{i,k}, -A_i clip(r_{i,k}, 1 - clip_eps, 1 + clip_eps))
    [/ |dt_k|], r = exp(log_r) (negated clipped objective, averaged over samples and window steps).

    log_r: (R,) for one step or (R, K); advantages: (R,) (broadcast over K) or log_r's shape.
    dt (optional, GRPO-Guard reweighting): scalar, (K,) or broadcastable to log_r; each term is
    divided by |dt|.
    Returns a 0-dim loss tensor.
    """
    _check(log_r.ndim in (1, 2), f"log_r must be (R,) or (R, K), got shape {tuple(log_r.shape)}")
    _check(advantages.shape in (log_r.shape[:1], log_r.shape),
           f"advantages has shape {tuple(advantages.shape)}, "
           f"expected ({log_r.shape[0]},) or {tuple(log_r.shape)}")
    A = clamp_advantages(advantages, adv_clip_max)
    if A.ndim < log_r.ndim:
        A = A[:, None]
    per_entry = clipped_surrogate(torch.exp(log_r), A, clip_eps)
    if dt is not None:
        dt = torch.as_tensor(dt, dtype=log_r.dtype, device=log_r.device)
        try:
            fits = torch.broadcast_shapes(dt.shape, log_r.shape) == log_r.shape
        except RuntimeError:
            fits = False
        _check(fits,
               f"dt of shape {tuple(dt.shape)} does not broadcast to log_r's {tuple(log_r.shape)}")
        _check(bool((dt != 0).all()), "dt must be non-zero")
        per_entry = per_entry / dt.abs()
    return per_entry.mean()


# ----------------------------------------------------------------------------------------------- Eq. (8)
def velocity_mse(v, v_ref):
    """Eq. (8): R = mean((v_theta(x_t, t) - v_ref(x_t, t))^2) over all elements, unweighted.

    v_ref comes from the frozen reference under no_grad; the weight (1.5e-5) is applied in Eq. (7).
    """
    _same_shape("v", v, "v_ref", v_ref)
    return (v - v_ref).pow(2).mean()


def latent_kl(mean, mean_ref, std, dt, exact=False):
    """Ablation of Eq. (8), FlowGRPO's latent KL:
    KL = mean_b[ mean_dims (mu - mu_ref)^2 / (2 sigma_t^2) ], sigma_t = std / sqrt(|dt|); this is
    the exact Gaussian KL times |dt|. exact=True: mean_dims dmu^2 / (2 std^2).

    mean, mean_ref: (R, ...); std: transition std, scalar or (R, 1, ..., 1);
    dt: scalar or (R, 1, ..., 1).
    """
    dummy = mean.new_zeros(mean.shape[:1])
    s, msq = _step_scale(dummy, mean, mean_ref, std, other="mean_ref")      # (R,), (R,)
    kl = msq / (2 * s**2)
    if not exact:
        dt = torch.as_tensor(dt, dtype=mean.dtype, device=mean.device)
        _check(dt.numel() in (1, mean.shape[0]),
               f"dt must be a scalar or (R, 1, ..., 1), got {tuple(dt.shape)}")
        kl = kl * dt.reshape(-1).abs()  # 1 / sigma_t^2 = |dt| / s^2
    return kl.mean()


# ----------------------------------------------------------------------------------------------- Eq. (7)
def unified_loss(text_loss, flow_loss, reg=None, lam=1.0, reg_weight=1.5e-5):
    """Eq. (7): L = J_text + lam * J_flow + reg_weight * R, with R the Eq. (8) velocity MSE
    (or an ablation).

    The paper writes J = J_text + lam*J_flow as an objective to maximise; the inputs here are
    already the negated surrogates of Eq. (2) and Eq. (6), so the sum is minimised and the
    regulariser enters with a plus sign.
    lam = 1 as in the paper; reg=None means no regulariser.
    """
    for name, x in (("text_loss", text_loss), ("flow_loss", flow_loss), ("reg", reg)):
        ok = (x is None and name == "reg") or (isinstance(x, torch.Tensor) and x.ndim == 0)
        _check(ok,
               f"{name} must be a 0-dim tensor, "
               f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    _check(lam >= 0, f"lam must be >= 0, got {lam}")
    _check(reg_weight >= 0, f"reg_weight must be >= 0, got {reg_weight}")
    loss = text_loss + lam * flow_loss
    return loss if reg is None else loss + reg_weight * reg


# ----------------------------------------------------------------------------------------------- logging
def clip_fraction(ratio, clip_eps, clip_eps_high=None, side="both", mask=None):
    """Share of ratios outside [1 - clip_eps, 1 + clip_eps_high] (side "both", "high" or "low"),
    over mask."""
    _check(side in ("both", "high", "low"), f"side must be 'both', 'high' or 'low', got {side!r}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    high, low = ratio - 1.0 > eps_high, 1.0 - ratio > clip_eps
    hit = {"both": high | low, "high": high, "low": low}[side].to(ratio.dtype)
    return _masked_mean(hit, mask)


def approx_kl(log_r, mask=None):
    """0.5 * mean(log_r^2), the PPO/FlowGRPO approximate KL between old and new policy."""
    return _masked_mean(0.5 * log_r.pow(2), mask)


def ratio_summary(ratio, mask=None):
    """Detached mean / min / max of the ratio over the valid entries, for logging."""
    r = ratio.detach()
    if mask is not None:
        r, valid = torch.broadcast_tensors(r, mask.bool())
        r = r[valid]
    return {"ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max()}


def _masked_mean(x, mask):
    if mask is None:
        return x.mean()
    # e.g. a (R, 1) sequence ratio with a (R, T) mask
    x, M = torch.broadcast_tensors(x, mask.to(x.dtype))
    return (x * M).sum() / M.sum().clamp(min=1.0)
