"""The one config of a run: every number of the algorithm (the paper's defaults) and of the run, the
presets, and the command line built from the fields.

    python train.py --help                  # every field, grouped, with its help and the paper's value
    python train.py --toy --group_size=4    # a preset, then any field as --key=value (or --key value)

`Config` is a flat dataclass. Each field carries a one-line help (field metadata, as TRL's GRPOConfig
does) and says whether a resumed run may change it (`resume_may_change`: where it writes, how long it
runs, how it evaluates; never what it computes). Presets are dicts of overrides; the parser is
generated from the fields, so train.py, the benchmarks and the notebooks share one command line.

Glossary: B prompts per step, G group size, R = B*G rows, K window steps (as in every module).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

import losses
import sampler

GROUPS = {"run": "the run", "data": "prompts, reward and evaluation (--bagel)",
          "rollout": "rollout (Prompt -> Thinking -> Image)",
          "update": "the unified update (Eq. (7))", "stages": "stages: SFT warm-up, RL, evaluation"}


def arg(group: str, default, help: str, *, resume_may_change: bool = False):
    """A Config field with its --help line (and its group in --help)."""
    return field(default=default, metadata={"group": group, "help": help,
                                            "resume_may_change": resume_may_change})


@dataclass
class Config:
    """Every number of a run. Defaults are the paper's (arXiv 2603.23500); presets below."""
    # the run
    name: str = arg("run", "run", "run folder: artifacts go to <out_dir>/<name>",
                    resume_may_change=True)
    out_dir: str = arg("run", "runs", "parent folder of the run folders and of the SFT cache",
                       resume_may_change=True)
    seed: int = arg("run", 0, "seeds the init, the SFT data, the rollouts and the evaluation")
    device: str = arg("run", "cpu", "torch device: cpu, cuda, cuda:1, mps; auto: cuda when there is one",
                      resume_may_change=True)
    dtype: str = arg("run", "float32", "weights of a loaded checkpoint; auto: bfloat16 on cuda, float32 "
                                       "elsewhere; the toy: float32")
    model: str = arg("run", "toy", "'toy', or a folder holding an official BAGEL checkpoint")
    ckpt_every: int = arg("run", 10, "write a checkpoint every this many RL steps, and at the end",
                          resume_may_change=True)
    ckpt_keep: int = arg("run", 2, "torchrun: step folders of <run>/ckpt kept (the newest)",
                         resume_may_change=True)
    export_to: str = arg("run", "", "write the trained policy there in the official layout at the end "
                                    "(default <run>/model; with --export_only: the run's last checkpoint)",
                         resume_may_change=True)
    log_to: str = arg("run", "", "also log metrics to 'wandb' or 'tensorboard' (when installed)",
                      resume_may_change=True)
    dist_timeout: float = arg("run", 600.0, "torchrun: seconds a collective may wait before the job "
                                            "stops with an error", resume_may_change=True)
    # prompts, reward, evaluation
    prompts: str = arg("data", "", "train prompts: .txt (one a line), .jsonl ({\"prompt\": ...}, GenEval's "
                                   "metadata); the toy draws its own")
    eval_prompts: str = arg("data", "", "held-out prompts in the same formats, scored before and after RL",
                            resume_may_change=True)
    reward: str = arg("data", "toy", "'toy' (the exact verifier), proxy:FILE (the toy: a learned proxy of "
                                     "it), or kind:folder[@weight],... with kind clip, pickscore, vlm or "
                                     "geneval")
    eval_reward: str = arg("data", "", "the evaluation's scorer, as --reward (e.g. geneval:FOLDER while "
                                       "training on vlm); empty: the training reward", resume_may_change=True)
    reward_batch: int = arg("data", 16, "images per reward-model call", resume_may_change=True)
    eval_cfg: tuple = arg("data", (1.0,), "text-CFG scales of the evaluation, e.g. 1,4 (1: no CFG)",
                          resume_may_change=True)
    eval_samples: int = arg("data", 1, "images per held-out prompt", resume_may_change=True)
    eval_batch: int = arg("data", 256, "rows per generation call in evaluation", resume_may_change=True)
    eval_limit: int = arg("data", 0, "evaluate the first N held-out prompts; 0: all", resume_may_change=True)
    save_model: bool = arg("data", True, "write the trained policy to <out_dir>/<name>/model (the official "
                                         "layout, readable by --model)", resume_may_change=True)
    export_shard_gb: float = arg("data", 0.0, "largest weight file of that export, in GiB (shards with an "
                                              "index); 0: one ema.safetensors, as Bagel ships",
                                 resume_may_change=True)
    # rollout
    prompts_per_step: int = arg("rollout", 32, "B: prompts per RL step (paper: 32)")
    group_size: int = arg("rollout", 24, "G: reasoning chains, hence images, per prompt (paper: 24)")
    think: bool = arg("rollout", True, "reason before drawing (false: the no-thinking baseline)")
    max_think_tokens: int = arg("rollout", 512, "longest reasoning chain, in tokens")
    temperature: float = arg("rollout", 1.0, "sampling temperature of the reasoning (paper: 1)")
    num_steps: int = arg("rollout", 25, "denoising steps of a rollout (paper: 25)")
    shift: float = arg("rollout", 3.0, "shift s of the grid t' = s*t / (1 + (s - 1)*t) (paper: 3)")
    noise_level: float = arg("rollout", 0.8, "eta of the SDE steps, Eq. (3) (paper: 0.8)")
    window_start: tuple = arg("rollout", (0, 5), "first SDE step drawn from [lo, hi] (paper: 0,5)")
    window_size: int = arg("rollout", 3, "K: consecutive SDE steps of the window (paper: 3)")
    sde_kind: str = arg("rollout", "sde", "'sde' (Eq. (3)) or 'cps' (FlowGRPO-Fast's configs)")
    logprob_reduce: str = arg("rollout", "mean", "log-prob over latent elements: 'mean' (FlowGRPO), "
                                                 "'sum'")
    image_hw: tuple = arg("rollout", (1024, 1024), "image height,width in pixels (paper: 1024,1024); 0,0: "
                                                   "the checkpoint's largest (BAGEL-7B: 1024,1024)")
    rollout_batch: int = arg("rollout", 0, "prompts per generation call of a rollout (memory); 0: all B")
    cfg_scale: float = arg("rollout", 1.0, "text CFG in rollouts and evaluation (paper: 1, no CFG)")
    rounds: int = arg("rollout", 1, "rounds of think -> image; each later one puts the previous image into "
                                    "the context, reflects (text actions) and draws again (1: the paper)")
    context_vit: bool = arg("rollout", True, "rounds > 1: an image enters the context through the VAE and then "
                                             "the ViT, as Bagel's interleave_inference (false: VAE only; a "
                                             "checkpoint without a ViT, and the toy, use the VAE only)")
    # the unified update
    ppo_epochs: int = arg("update", 2, "passes over each rollout (paper: 2)")
    minibatches: int = arg("update", 2, "optimizer steps per pass, each an equal share of every group; "
                                        "must divide G")
    micro_batch: int = arg("update", 0, "rows per forward/backward of a minibatch (gradient accumulation); "
                                        "0: the whole minibatch")
    lr_reasoning: float = arg("update", 1e-6, "AdamW rate of the reasoning expert (paper: 1e-6)")
    lr_denoising: float = arg("update", 3e-5, "AdamW rate of the denoising expert (paper: 3e-5)")
    weight_decay: float = arg("update", 0.0, "AdamW weight decay")
    lora_rank: int = arg("update", 0, "LoRA rank of the adapted experts' linear layers; 0: full "
                                      "fine-tuning")
    lora_alpha: float = arg("update", 16.0, "LoRA scale alpha (update alpha/rank * B A)")
    lora_experts: str = arg("update", "both", "experts that train adapters when lora_rank > 0: both, "
                                              "reasoning, denoising (the other trains fully)")
    attention: str = arg("update", "dense", "packed forward: 'dense' (one padded mask, the readable "
                                            "reference) or 'blocks' (the text once, each window block on "
                                            "its keys)", resume_may_change=True)
    activation_checkpointing: bool = arg("update", False, "recompute each decoder layer in the backward "
                                                          "(memory for time)", resume_may_change=True)
    grad_clip: float = arg("update", 1.0, "max global gradient norm")
    train_parts: str = arg("update", "both", "'both' (UniGRPO), 'text' (TextGRPO only), 'image' "
                                             "(FlowGRPO only)")
    lam: float = arg("update", 1.0, "lam: weight of J_flow in Eq. (7) (paper: 1)")
    clip_text: float = arg("update", 0.2, "clip_eps of the token ratios, Eq. (2)")
    clip_flow: float = arg("update", 1e-6, "clip_eps of the step ratios, Eq. (6) (paper: 1e-6)")
    adv_clip_max: float | None = arg("update", None, "clamp A to [-x, x] (FlowGRPO: 5; paper: none)")
    adv_std: str = arg("update", "population", "std of Eq. (1): 'population' (FlowGRPO), 'sample', "
                                               "'none'")
    adv_scope: str = arg("update", "group", "std of Eq. (1) over the 'group' or the whole 'batch'")
    text_reduction: str = arg("update", "grpo", "token reduction in Eq. (2): grpo, bnpo, dapo, dr_grpo")
    ratio_norm: bool = arg("update", True, "RatioNorm, Eq. (5) (paper: on)")
    regulariser: str = arg("update", "velocity_mse", "'velocity_mse' (Eq. (8)), 'latent_kl', 'none'")
    reg_weight: float = arg("update", 1.5e-5, "weight of the regulariser in Eq. (7) (paper: 1.5e-5)")
    text_kl: float = arg("update", 0.0, "k3 KL of the reasoning to the reference (paper: 0)")
    # stages
    sft_steps: int = arg("stages", 0, "SFT warm-up steps before RL (0: start from the checkpoint)")
    sft_batch: int = arg("stages", 64, "SFT (prompt, plan, image) triples per step")
    sft_lr: float = arg("stages", 1e-3, "SFT AdamW rate")
    sft_warmup: int = arg("stages", 100, "SFT steps of linear learning-rate warm-up")
    sft_ema: float = arg("stages", 0.0, "EMA decay of the SFT weights; 0: off")
    sft_mse_weight: float = arg("stages", 1.0, "weight of the flow-matching MSE against the plan CE "
                                               "(Bagel: 1)")
    sft_noise: float = arg("stages", 0.0, "toy: share of SFT plans with one error (the image draws the "
                                          "wrong plan)")
    sft_image_noise: float = arg("stages", 0.0, "toy: share of SFT images with one error against their "
                                                "plan")
    sft_cfg_drop: float = arg("stages", 0.0, "toy: share of SFT triples trained without prompt and plan, "
                                             "the unconditional branch that CFG needs (Bagel drops text too)")
    sft_reflect: float = arg("stages", 0.0, "toy, for rounds > 1: share of SFT rows trained as two rounds (a "
                                            "first image, often off its plan, then the correct plan as the "
                                            "reflection and its image)")
    rl_steps: int = arg("stages", 100, "UniGRPO steps; a resumed run may extend them",
                        resume_may_change=True)
    eval_per_category: int = arg("stages", 256, "held-out prompts per category before and after RL; "
                                                "0: none", resume_may_change=True)
    eval_every: int = arg("stages", 0, "also evaluate every this many RL steps (the held-out curve in "
                                       "metrics.jsonl, heldout_*); 0: only before and after",
                          resume_may_change=True)
    eval_curve_size: int = arg("stages", 64, "prompts of each curve point: per category (the toy) or the "
                                             "first N of --eval_prompts", resume_may_change=True)
    eval_steps: int = arg("stages", 20, "ODE steps of an evaluation image", resume_may_change=True)
    eval_temperature: float = arg("stages", 1.0, "reasoning temperature in evaluation",
                                  resume_may_change=True)

    @property
    def proxy_file(self) -> str:
        """The file of reward=proxy:FILE (the toy's learned proxy reward); '' for any other reward."""
        return self.reward.removeprefix("proxy:") if self.reward.startswith("proxy:") else ""

    def validate(self) -> Config:
        """Every field, before any work; a ValueError names the key. Resolves device and dtype 'auto'."""
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.default)
        choices = {"train_parts": ("both", "text", "image"),
                   "regulariser": ("velocity_mse", "latent_kl", "none"),
                   "sde_kind": sampler.KINDS, "logprob_reduce": sampler.REDUCTIONS,
                   "adv_std": ("population", "sample", "none"), "adv_scope": ("group", "batch"),
                   "text_reduction": losses.TOKEN_REDUCTIONS,
                   "dtype": ("float32", "bfloat16", "float16", "float64"),
                   "lora_experts": ("both", "reasoning", "denoising"), "attention": ("dense", "blocks"),
                   "log_to": ("", "wandb", "tensorboard")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected one of "
                                 f"{', '.join(map(str, allowed))}")
        for key in ("prompts_per_step", "ppo_epochs", "minibatches", "num_steps", "window_size",
                    "ckpt_every", "ckpt_keep", "sft_batch", "eval_steps", "reward_batch", "eval_samples",
                    "eval_curve_size",
                    "eval_batch"):
            _at_least(key, getattr(self, key), 1)
        for key in ("seed", "max_think_tokens", "sft_steps", "sft_warmup", "rl_steps", "eval_per_category",
                    "eval_limit", "eval_every",
                    "rollout_batch", "micro_batch", "lora_rank"):
            _at_least(key, getattr(self, key), 0)
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: group-relative advantages need at least "
                             f"2 samples")
        for key in ("lr_reasoning", "lr_denoising", "weight_decay", "sft_lr", "reg_weight", "text_kl",
                    "lam", "temperature", "eval_temperature", "cfg_scale", "export_shard_gb",
                    "lora_alpha"):
            _finite(key, getattr(self, key), lower=0.0)
        for key in ("dist_timeout", "grad_clip", "clip_text", "clip_flow", "shift", "sft_mse_weight",
                    "noise_level"):
            _finite(key, getattr(self, key), lower=0.0, strict=True)
        if self.adv_clip_max is not None:
            _finite("adv_clip_max", self.adv_clip_max, lower=0.0, strict=True)
        for key in ("sft_ema", "sft_noise", "sft_image_noise", "sft_cfg_drop", "sft_reflect"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be in [0, 1)")
        for key in ("window_start", "image_hw"):
            value = getattr(self, key)
            ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            if len(value) != 2 or not ints:
                raise ValueError(f"{key}={value!r}: expected two integers, e.g. --{key}=0,5")
        if not self.eval_cfg or not all(_number(s) for s in self.eval_cfg):
            raise ValueError(f"eval_cfg={self.eval_cfg!r}: expected numbers, e.g. --eval_cfg=1,4")
        for s in self.eval_cfg:
            _finite("eval_cfg", s, lower=0.0)
        if min(self.image_hw) < 1 and not (self.image_hw == (0, 0) and self.model != "toy"):
            raise ValueError(f"image_hw={self.image_hw}: height and width must be positive (0,0: a "
                             f"checkpoint's largest size)")
        lo, hi = self.window_start
        if not (0 <= lo <= hi and hi + self.window_size <= self.num_steps - 1):
            raise ValueError(f"window_start={self.window_start}, window_size={self.window_size}: the SDE "
                             f"window must lie inside steps 0..{self.num_steps - 2} (the last step is "
                             f"never trained)")
        if self.ratio_norm and (self.sde_kind, self.logprob_reduce) != ("sde", "mean"):
            raise ValueError(f"ratio_norm needs sde_kind='sde' and logprob_reduce='mean' (its bias term "
                             f"is the Gaussian one of Eq. (3) averaged over elements); got "
                             f"{self.sde_kind!r}, {self.logprob_reduce!r}")
        if self.seed >= 2 ** 32:
            raise ValueError(f"seed={self.seed} must be < 2**32")
        if self.eval_per_category and self.model != "toy":
            raise ValueError(f"eval_per_category={self.eval_per_category}: the held-out evaluation is the "
                             f"toy world's; use --eval_per_category=0 with a checkpoint")
        if self.sft_steps and self.model != "toy":
            raise ValueError(f"sft_steps={self.sft_steps}: the SFT warm-up trains on the toy world's "
                             f"data; use --sft_steps=0 with a checkpoint")
        toy = self.model == "toy"
        proxy = self.proxy_file
        if toy and (self.reward != "toy" and not proxy or self.eval_reward or self.prompts or self.eval_prompts):
            raise ValueError("the toy world scores with its own verifier (reward='toy', or a learned proxy of "
                             "it: reward=proxy:FILE) and draws its own prompts; --reward, --eval_reward, "
                             "--prompts and --eval_prompts are for --bagel")
        if toy and proxy and not Path(proxy).is_file():
            raise ValueError(f"reward={self.reward!r}: no file {proxy!r} (a toy.ProxyReward saved by "
                             f"experiments/fit_proxy.py)")
        _at_least("rounds", self.rounds, 1)
        if self.rounds > 1 and (self.cfg_scale != 1.0 or any(s != 1.0 for s in self.eval_cfg)):
            raise ValueError(f"rounds={self.rounds} with cfg_scale={self.cfg_scale}, eval_cfg={self.eval_cfg}: "
                             f"multi-round UniGRPO is CFG-free (its rollouts are linear, unbranched); use 1")
        if self.rounds > 1 and not (self.think and self.max_think_tokens):
            raise ValueError(f"rounds={self.rounds} needs think=True and max_think_tokens > 0: a later round "
                             f"reflects in text before it draws")
        if self.train_parts == "text" and not self.think:
            raise ValueError("train_parts='text' with think=False leaves nothing to train")
        if self.group_size % self.minibatches:
            raise ValueError(f"minibatches={self.minibatches} must divide group_size={self.group_size} "
                             f"(each minibatch takes the same share of every group)")
        if self.micro_batch and self.text_reduction in ("bnpo", "dapo"):
            raise ValueError(f"micro_batch={self.micro_batch} with text_reduction={self.text_reduction!r}: "
                             f"that reduction normalises by the minibatch's token count, which a micro-batch "
                             f"does not see; use grpo or dr_grpo, or micro_batch=0")
        if not self.name or Path(self.name).name != self.name or self.name in (".", ".."):
            raise ValueError(f"name={self.name!r}: a plain folder name (no '/'), e.g. "
                             f"--name=toy-seed1")
        if self.model != "toy" and not (self.model and Path(self.model).is_dir()):
            raise ValueError(f"model={self.model!r} is not a folder: --bagel needs "
                             f"--model=/path/to/BAGEL-7B-MoT (the official checkpoint layout)")
        check_device(self.device)
        return self


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_type(key, value, default):
    """The value has the field's type: bool, int, float (an int will do), str, tuple, optional float."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if default is None:
        ok = value is None or number
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = number and isinstance(value, int)
    elif isinstance(default, float):
        ok = number
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = "number or None" if default is None else type(default).__name__
        raise ValueError(f"{key}={value!r}: expected a {kind}")


def _at_least(key, value, lo):
    if value < lo:
        raise ValueError(f"{key}={value} must be >= {lo}")


def _finite(key, value, lower, strict=False):
    if not math.isfinite(value) or value < lower or (strict and value == lower):
        raise ValueError(f"{key}={value} must be a finite number {'>' if strict else '>='} {lower}")


def check_device(device: str):
    """The device string parses and names a device this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r}: not a torch device (cpu, cuda, cuda:1, mps)") \
            from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}: MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r}: use cpu, cuda[:i] or mps")


# ------------------------------------------------------------------------------------------ presets
PRESETS = {
    # Laptop CPU, fp32, minutes; what each setting measured is in RESULTS.md.
    # reg_weight 0.01 (paper 1.5e-5): at toy scale the paper's weight leaves the velocity MSE far weaker
    # than the policy gradient, and the background, which the reward cannot see, drifts into speckle.
    # sft_noise 0.3: SFT triples are imperfect like real paired data, so SFT leaves mistakes for RL.
    # sft_steps 800: the image expert has learnt to follow plans by then; more SFT keeps the plans' errors.
    # lr_reasoning 1.2e-4 (twice the rate that needs 140 steps; 3e-4 drifts): held-out TA levels off by 70.
    # eval_per_category 128: 768 held-out prompts (one standard error 0.013 on an accuracy of 0.85).
    "toy": dict(name="toy", model="toy", image_hw=(32, 32), prompts_per_step=8, group_size=8,
                max_think_tokens=20, num_steps=10, window_start=(0, 5), window_size=3,
                lr_reasoning=1.2e-4, lr_denoising=1e-4, clip_text=0.2, clip_flow=1e-4,
                reg_weight=0.01, sft_steps=800, sft_batch=64, sft_lr=1e-3, sft_ema=0.99,
                sft_mse_weight=10.0, sft_noise=0.3, rl_steps=70, ckpt_every=10,
                eval_per_category=128, eval_steps=20),
    # The paper's setting (BAGEL-7B-MoT, 1024 px); the defaults of Config are the paper's numbers.
    # Evaluated with and without CFG (Bagel's text scale 4), as CFG-free training must be.
    # image_hw 0,0: the checkpoint's largest size, 1024 px for BAGEL-7B-MoT.
    "bagel": dict(name="bagel", model="", reward="", dtype="auto", device="auto", image_hw=(0, 0),
                  rl_steps=1000, eval_per_category=0, eval_cfg=(1.0, 4.0), eval_batch=16,
                  micro_batch=16),
}


def preset(name: str, **overrides) -> Config:
    """Config of a preset with overrides, validated: `preset("toy", group_size=4)`."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}, expected one of {', '.join(PRESETS)}")
    return Config(**{**PRESETS[name], **overrides}).validate()


# ------------------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SystemExit(f"error: {message}")


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a bool (true, false, 1, 0)")
    return text.lower() in ("true", "1")


def _parse_pair(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") \
            from None


def _parse_floats(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _parse_optional_float(text: str):
    return None if text.lower() == "none" else _typed(float)(text)


def _typed(kind):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
    return parse


def _value_parser(default):
    if default is None:
        return _parse_optional_float
    if isinstance(default, tuple) and default and all(isinstance(v, float) for v in default):
        return _parse_floats
    return {bool: _parse_bool, tuple: _parse_pair}.get(type(default)) or _typed(type(default))


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command line of every Config field, grouped as in --help; scripts may add their own."""
    p = _Parser(description=description or "UniGRPO training (arXiv 2603.23500)",
                allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Values: --key=value or --key value; bools true/false; pairs as 0,5; none for "
                       "no value.")
    actions = p.add_argument_group("presets and actions")
    actions.add_argument("--toy", dest="preset", action="store_const", const="toy",
                         help="the toy world on a laptop CPU (SFT warm-up, then UniGRPO)")
    actions.add_argument("--bagel", dest="preset", action="store_const", const="bagel",
                         help="BAGEL-7B-MoT from --model=FOLDER (the paper's numbers)")
    actions.add_argument("--resume", action="store_true",
                         help="continue the run in <out_dir>/<name> exactly")
    actions.add_argument("--eval_only", action="store_true",
                         help="evaluate --model on --eval_prompts at each --eval_cfg scale, no training")
    actions.add_argument("--export_only", action="store_true",
                         help="write the last checkpoint of <out_dir>/<name> to --export_to in the official "
                              "layout, no training")
    actions.add_argument("--overwrite", action="store_true",
                         help="start over in a run folder that holds another run (deletes its "
                              "checkpoint, metrics, summary and pictures)")
    groups = {g: p.add_argument_group(title) for g, title in GROUPS.items()}
    for f in dataclasses.fields(Config):
        note = f"default {_shown(f.default)}"
        for name, values in PRESETS.items():
            if f.name in values and values[f.name] != f.default:
                note += f"; --{name} {_shown(values[f.name]) or '(required)'}"
        groups[f.metadata["group"]].add_argument(
            f"--{f.name}", type=_value_parser(f.default), default=argparse.SUPPRESS, metavar="V",
            help=f"{f.metadata['help']} [{note}]".replace("%", "%%"))
    return p


def parse_args(argv, parser_=None) -> tuple[Config, argparse.Namespace]:
    """(validated Config, the namespace with preset, resume, overwrite and any script arguments)."""
    p = parser_ or parser()
    args, extra = p.parse_known_args(list(argv))
    fields = [f.name for f in dataclasses.fields(Config)]
    for a in extra:
        if not a.startswith("--"):
            raise SystemExit(f"error: unexpected argument {a!r}; use --toy, --bagel, --resume or "
                             f"--key=value")
        key = a[2:].partition("=")[0]
        known = [*fields, "toy", "bagel", "resume", "overwrite", "eval_only", "export_only"]
        words = set(key.split("_")) - {""}
        near = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        near += [k for k in known if k not in near and (words & set(k.split("_")) or key in k)][:6]
        hint = f"did you mean {', '.join('--' + n for n in near)}? " if near else ""
        raise SystemExit(f"error: unknown option --{key}: {hint}(presets --toy and --bagel; "
                         f"`python train.py --help` lists every key)")
    if args.preset is None:
        raise SystemExit("error: choose a preset: --toy or --bagel")
    overrides = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    try:
        cfg = Config(**{**PRESETS[args.preset], **overrides}).validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return cfg, args


def algorithm_fields() -> list[str]:
    """The fields a resumed run must keep: everything that changes what the run computes."""
    return [f.name for f in dataclasses.fields(Config) if not f.metadata["resume_may_change"]]
