"""distributed.py: the same loop on many GPUs and nodes under torchrun; everything that knows about ranks.

    torchrun --nproc_per_node=8 train.py --bagel --model=BAGEL-7B-MoT --prompts=train.txt --reward=...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py --bagel ...
    python train.py --bagel ...                 # one process: world size 1, nothing here is active

What a rank does, and why the numbers do not depend on the rank count:
- setup(): one process group (NCCL on GPU, gloo on CPU) with a timeout, so a dead peer ends the job
  instead of hanging it; one device per local rank.
- Each rank holds whole groups, B/W prompts of every step (my_prompts). Row i's randomness is keyed by
  its global index (sampler.RowStreams), each minibatch is an equal share of every group
  (unigrpo.minibatch_rows), and FSDP averages the gradients of equal shares: the global update.
- shard(): FSDP2 `fully_shard` per MoT decoder layer and at the root (the Policy); parameters and
  optimizer state stay fp32 (the master copy), compute runs in cfg.dtype, gradients reduce in fp32.
- load(): the model built on the meta device, sharded, then each rank reads only its rows of each
  tensor from the safetensors files: no rank and no host ever holds the full fp32 model.
- unsharded(): one all-gather for a whole rollout (hundreds of decoded tokens, 25 denoising steps),
  not one per forward, then back to shards for the update.
Checkpoints (DCP) and the streaming export are in checkpoint.py; they call the collectives here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        """Whether a process group runs (torchrun, any size): FSDP and DCP checkpoints."""
        return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """Started by torchrun (its environment variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def setup(cfg) -> tuple:
    """(cfg with this rank's device, World); without torchrun: (cfg, World()) and nothing starts."""
    if not launched():
        return cfg, World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    cuda = cfg.device.startswith("cuda")
    if cuda:
        if world.local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: local rank {world.local_rank} has no GPU (this node has "
                             f"{torch.cuda.device_count()}); lower --nproc_per_node")
        torch.cuda.set_device(world.local_rank)
        cfg = dataclasses.replace(cfg, device=f"cuda:{world.local_rank}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout),
                                device_id=torch.device(cfg.device) if cuda else None)
    return cfg, world


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_world(cfg, world: World):
    """Sizes the rank count must divide, before any model work (every rank raises the same error)."""
    W, B = world.size, cfg.prompts_per_step
    if W == 1:
        return
    if cfg.model == "toy":
        raise SystemExit(f"error: the toy runs in one process (its SFT warm-up is single-process): "
                         f"python train.py --toy, not torchrun with {W} ranks")
    if B < W:
        raise SystemExit(f"error: more ranks ({W}) than groups (prompts_per_step={B}): each rank holds "
                         f"whole groups; use at most {B} ranks or raise prompts_per_step")
    if B % W:
        raise SystemExit(f"error: prompts_per_step={B} is not divisible by the {W} ranks (each rank "
                         f"holds B/W whole groups); use a multiple of {W}")
    if cfg.text_reduction in ("bnpo", "dapo"):
        raise SystemExit(f"error: text_reduction={cfg.text_reduction!r} normalises by one minibatch's "
                         f"token count, which a rank does not see; use grpo or dr_grpo with {W} ranks")


def my_prompts(batch: list, world: World) -> tuple[list, int]:
    """This rank's prompts of a step's batch (contiguous, B/W of them) and the global index of its
    first row (first prompt x G)."""
    n = len(batch) // world.size
    return batch[world.rank * n:(world.rank + 1) * n], world.rank * n


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(record: dict) -> dict:
    """Every float of a metrics record averaged over ranks (each rank holds an equal share of rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return record
    keys = sorted(k for k, v in record.items() if isinstance(v, float))
    values = torch.tensor([record[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {**record, **dict(zip(keys, (values / dist.get_world_size()).tolist()))}


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on one (an error one rank saw stops all of them together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return bool(t.item())


# ------------------------------------------------------------------------------------------------ FSDP2
def layers(policy):
    return policy.model.language_model.model.layers


def shard(policy, cfg):
    """FSDP2 on the Policy: one unit per decoder layer, the rest (embeddings, lm_head, the latent
    projections, final norms) at the root. Parameters stay in their (fp32) dtype: the optimizer's
    master copy; the all-gathered copy and the compute are in cfg.dtype, gradients reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    compute = getattr(torch, cfg.dtype)
    # inputs stay as given: the model casts them itself, so the update's velocities come back in x_t's
    # fp32 as the rollout's did (a bf16 x_t would round v and move the ratios off 1)
    mp = MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 else compute,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    for layer in layers(policy):
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)
    return policy


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def unsharded(policy):
    """Every FSDP unit all-gathered once for the block (a rollout, an evaluation) and kept gathered
    across its forwards; resharded at the end. A no-op for a model that is not sharded."""
    if policy is None or not is_sharded(policy):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    # FSDP picks its root at the first forward; a rollout calls the layers without the root's forward,
    # so the root is made root first (a no-op once done)
    policy._get_fsdp_state()._lazy_init()
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            if m is not policy:
                m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def local_rows(param) -> tuple[int, torch.Tensor]:
    """(first global row, local tensor) of a parameter FSDP2 shards on dim 0 (torch.chunk's split);
    (0, the tensor) for a plain one."""
    if not hasattr(param, "to_local"):
        return 0, param.data
    local = param.to_local()
    size = param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    step = math.ceil(param.shape[0] / size) if param.ndim else 0
    return min(rank * step, param.shape[0] if param.ndim else 0), local


def full(tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank calls it in the same order)."""
    t = tensor.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t
