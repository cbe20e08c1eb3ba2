"""Checkpoints: BAGEL's official layout (load, save), training checkpoints with exact resume, and run folders.

Official layout (a BAGEL-7B-MoT folder): llm_config.json (Qwen2), optional bagel_config.json (latent
sizes, vae_config, new_token_ids), ema.safetensors or shards with a *.safetensors.index.json, the Qwen2
tokenizer files, ae.safetensors (read at the first encode/decode), and the ViT: with vit_config.json its
weights (vit_model.*, connector.*, vit_pos_embed.*) are loaded into the model (frozen) and saved back
unchanged; without it they are kept untouched beside the model.
Loading builds the model on the meta device and reads the weights memory-mapped straight into it.

Training checkpoints hold plain tensors and numbers only (policy and optimizer state, the generator
state, the step, the config as a dict) and load with weights_only=True: a crafted file cannot run code.
Every file is written to a unique temp file in its folder, then renamed (a kill never leaves a torn
file, and two writers never share a temp file); a training checkpoint with non-finite values is never
written. A run folder is locked by its process, and a fresh run never silently replaces another run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import config
import distributed
import lora
from model import BagelConfig, BagelMoT, check_tokenizer
from policy import Policy

EXTRA_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")  # kept untouched when no ViT is built
LLM_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rope_theta", "rms_norm_eps", "hidden_act", "max_position_embeddings")
TOKEN_ROLES = {"bos_token_id": "im_start_id", "eos_token_id": "im_end_id",  # Bagel's new_token_ids names
               "start_of_image": "vision_start_id", "end_of_image": "vision_end_id"}
RUN_FILES = ("ckpt.pt", "ckpt", "metrics.jsonl", "summary.json")  # what makes a folder hold a run
ARTIFACTS = (*RUN_FILES, "grid_*.png", "reward_curve.png", "model")         # globs; model: the export
TRAINING_KEYS = {"step": int, "policy": dict, "opt": dict, "gen": torch.Tensor, "config": dict}
_UMASK = os.umask(0)
os.umask(_UMASK)                                                   # read once: mkstemp files are 0600


# ------------------------------------------------------------------------------------------------ files
class CorruptFile(RuntimeError):
    """A checkpoint or cache file that cannot be loaded safely; the message names the file."""


def read_json(path: Path):
    """A JSON file; errors name the file (and the line of bad JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing checkpoint file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def atomic_write(path: Path, write):
    """write(tmp) into a unique temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)                             # the mode of a plain open()
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_finite(where: str, **tensors):
    """FloatingPointError naming `where` and the first non-finite quantity (tensors, floats, or nested
    dicts of them)."""
    for name, value in tensors.items():
        if isinstance(value, dict):
            check_finite(where, **{f"{name}.{k}": v for k, v in value.items()})
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            if not torch.isfinite(value).all():
                raise FloatingPointError(f"{where}: non-finite {name}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise FloatingPointError(f"{where}: non-finite {name}")


# ------------------------------------------------------------------------------------- official layout
def config_from_folder(folder, **overrides) -> BagelConfig:
    """llm_config.json (Qwen2; loader overrides qk_norm / untied lm_head are the architecture itself) and the
    optional bagel_config.json (latent sizes, vae_config, new_token_ids); missing values: 7B defaults."""
    folder = Path(folder)
    llm = read_json(folder / "llm_config.json")
    kw = {k: llm[k] for k in LLM_FIELDS if k in llm}
    if "rope_theta" not in kw and isinstance(llm.get("rope_parameters"), dict):
        kw["rope_theta"] = llm["rope_parameters"]["rope_theta"]
    if (folder / "bagel_config.json").is_file():
        bag = read_json(folder / "bagel_config.json")
        kw.update({TOKEN_ROLES[k]: v for k, v in bag.get("new_token_ids", {}).items() if k in TOKEN_ROLES})
        if bag.get("vae_config"):
            vae = bag["vae_config"]
            kw.update(vae_config=vae, latent_channels=vae["z_channels"], latent_downsample=vae["downsample"])
        kw.update({f.name: bag[f.name] for f in dataclasses.fields(BagelConfig)
                   if f.name in bag and f.name not in LLM_FIELDS + ("vit_config",)})
        if (folder / "vit_config.json").is_file() and bag.get("visual_und", True):   # the ViT (vit.py)
            kw["vit_config"] = read_json(folder / "vit_config.json")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(BagelConfig)}
    if unknown:
        raise ValueError(f"unknown BagelConfig override(s): {sorted(unknown)}")
    try:
        return BagelConfig(**{**kw, **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'llm_config.json'} (or bagel_config.json): {e}") from None


def config_to_json(cfg: BagelConfig) -> tuple[dict, dict]:
    """(llm_config, bagel_config) dicts in the official layout (+ our fields in bagel_config)."""
    d = dataclasses.asdict(cfg)
    if d.pop("vit_config") is None:                  # vit_config.json is copied from the source folder
        d.pop("vit_max_num_patch_per_side"), d.pop("connector_act")
    llm = {k: d.pop(k) for k in LLM_FIELDS}
    llm.update(model_type="qwen2", qk_norm=True, tie_word_embeddings=False,
               layer_module="Qwen2MoTDecoderLayer")
    d["new_token_ids"] = {k: getattr(cfg, v) for k, v in TOKEN_ROLES.items()}
    return llm, {**d, "visual_gen": True, "interpolate_pos": False}


def weight_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if (folder / "ema.safetensors").is_file():
        return [folder / "ema.safetensors"]
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = read_json(index[0]).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index[0]}: no 'weight_map' object")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f} listed in {index[0]} is missing")
        return files
    raise FileNotFoundError(f"missing checkpoint file: {folder / 'ema.safetensors'} "
                            f"(nor a *.safetensors.index.json)")


def check_pretrained_folder(folder):
    """Before any work: the folder exists and holds a readable config and readable weight files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    config_from_folder(folder)
    for f in weight_files(folder):
        with _safetensors(f) as s:                                 # reads the header only
            s.keys()


def _safetensors(path: Path, device="cpu"):
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def from_pretrained(folder, dtype=torch.bfloat16, device="cpu", tokenizer=None, embed_hook=None,
                    prepare=None, **overrides) -> Policy:
    """The Policy of an official-layout folder; `overrides` change BagelConfig fields (for example the
    think-mode system prompt). prepare(policy), when given, runs on the meta-device policy before any
    weight is read (adding adapters, FSDP2 sharding); then each process reads only the rows of each
    tensor it holds (distributed.local_rows), and the ViT tensors are read only when exported."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    cfg = config_from_folder(folder, **overrides)
    files = weight_files(folder)
    with torch.device("meta"):
        model = BagelMoT(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {}
    for f in files:
        with _safetensors(f) as s:
            found.update({k: (f, tuple(s.get_slice(k).get_shape())) for k in s.keys()})
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if not k.startswith(EXTRA_PREFIXES))
    if missing or unexpected:
        raise KeyError(f"{folder}: state dict mismatch: missing keys {missing}; unexpected keys {unexpected}")
    bad = [f"{k}: file {found[k][1]} vs model {shape}" for k, shape in expected.items()
           if found[k][1] != shape]
    if bad:
        raise ValueError(f"{folder}: wrong tensor shapes: {bad}")
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(folder)
    check_tokenizer(tokenizer, cfg)
    if prepare is not None:
        return _load_prepared(folder, files, cfg, tokenizer, model, embed_hook, prepare, dtype, device)
    state, extra = {}, {}
    for f in files:
        with _safetensors(f, device) as s:
            for k in s.keys():
                if k in expected:
                    state[k] = s.get_tensor(k).to(dtype)
                else:
                    extra[k] = s.get_tensor(k).cpu()
    model.load_state_dict(state, strict=True, assign=True)
    model.freeze_untrained()
    policy = Policy(cfg, tokenizer, model, embed_hook=embed_hook)
    policy.extra_state, policy.source_folder = extra, folder
    return policy


@torch.no_grad()
def _load_prepared(folder, files, cfg, tokenizer, model, embed_hook, prepare, dtype, device) -> Policy:
    policy = Policy(cfg, tokenizer, model, embed_hook=embed_hook)
    policy.source_folder = folder
    prepare(policy)
    policy.to_empty(device=device)
    params = dict(policy.model.named_parameters())
    extra = {}
    for f in files:
        with _safetensors(f) as s:
            names = list(s.keys())
        for k in names:
            if k not in params:
                extra[k] = f
                continue
            first, local = distributed.local_rows(params[k])
            if local.numel():
                # a mapping per tensor: the file pages a slice touched leave the resident set with it
                with _safetensors(f) as s:
                    local.copy_((s.get_slice(k)[first:first + local.shape[0]] if local.ndim
                                 else s.get_tensor(k)).to(dtype))
    for k, value in lora.initial_adapters(policy).items():               # adapters start as add_lora's
        first, local = distributed.local_rows(params[k])
        local.copy_(value[first:first + local.shape[0]])
    policy.extra_state = LazyTensors(extra)
    return policy


class LazyTensors(dict):
    """Tensors kept untouched (ViT) by name, read from their safetensors file only when asked for."""

    def __getitem__(self, key):
        with _safetensors(super().__getitem__(key)) as s:
            return s.get_tensor(key)

    def items(self):
        return ((k, self[k]) for k in self.keys())

    def values(self):
        return (self[k] for k in self.keys())


def _load_tokenizer(folder: Path):
    """The Qwen2 tokenizer files via AutoTokenizer (offline), or None when the folder has none."""
    if (folder / "word_tokenizer.json").is_file():
        raise ValueError(f"{folder} holds a toy checkpoint: load it with toy_policy.from_pretrained")
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return None


def save_pretrained(policy: Policy, folder, max_shard_bytes: int | None = None, dtype=None, write=True):
    """Write the official layout (each file atomically); the tokenizer and the embed hook save their own
    files; other files of the source folder (ae.safetensors, vit_config.json, ...) are copied.
    Weights stream tensor by tensor (a sharded tensor gathered in turn, LoRA adapters merged, cast to
    `dtype` if given), so neither a device nor the host holds a second full copy. A sharded (FSDP)
    policy: every rank calls this, in step; only the rank with write=True writes.
    max_shard_bytes: weights in shards `ema-0000i-of-0000n.safetensors` of at most that size (a tensor
    larger than it gets a shard of its own) plus `ema.safetensors.index.json`; None: one
    `ema.safetensors`, as Bagel ships."""
    folder = Path(folder)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    _write_weights(folder, export_entries(policy, dtype), max_shard_bytes, write)
    if not write:
        return
    llm, bag = config_to_json(policy.cfg)
    bag["visual_und"] = (policy.cfg.vit_config is not None
                         or any(k.startswith("vit_model.") for k in policy.extra_state))
    src = policy.source_folder
    for name, d in (("llm_config.json", llm), ("bagel_config.json", bag)):
        if src is not None and (src / name).is_file():  # keep the fields we do not model (e.g. Qwen2's)
            d = {**read_json(src / name), **d}
        atomic_write(folder / name, lambda p, d=d: Path(p).write_text(json.dumps(d, indent=2)))
    for part in (policy.tokenizer, policy.embed_hook):
        if part is not None and hasattr(part, "save_pretrained"):
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                part.save_pretrained(tmp)
                for f in Path(tmp).iterdir():
                    os.replace(f, folder / f.name)
    if src is not None and src.resolve() != folder.resolve():
        ours = set(weight_files(src)) | set(src.glob("*.safetensors.index.json"))
        for f in src.iterdir():
            if f.is_file() and f not in ours and not (folder / f.name).exists():
                atomic_write(folder / f.name, lambda p, f=f: shutil.copyfile(f, p))


def export_entries(policy: Policy, dtype=None) -> dict:
    """name -> (dtype, shape, get()) of every tensor an export writes, in state-dict order: the official
    keys, an adapted weight merged with its adapters, then the untouched (ViT) tensors. get() gathers
    a sharded tensor (a collective) and returns it on the host."""
    adapted = {n: m for n, m in policy.model.named_modules() if isinstance(m, lora.LoRALinear)}
    entries = {}
    for k, t in policy.model.state_dict().items():
        module, _, leaf = k.rpartition(".")
        if leaf in lora.ADAPTER_KEYS:
            continue
        if leaf == "weight" and module in adapted:
            m = adapted[module]
            get = (lambda t=t, m=m: lora.merged_weight(distributed.full(t), distributed.full(m.lora_A),
                                                       distributed.full(m.lora_B), m.lora_scale))
        else:
            get = (lambda t=t: distributed.full(t))
        entries[k] = (dtype or t.dtype, tuple(t.shape), get)
    for k in policy.extra_state.keys():
        with_value = (lambda k=k: policy.extra_state[k])
        shape, kind = _header_of(policy, k)
        entries[k] = (kind, shape, with_value)
    return entries


def _header_of(policy, key):
    """(shape, dtype) of an untouched tensor without reading it when it is lazy."""
    extra = policy.extra_state
    if isinstance(extra, LazyTensors):
        with _safetensors(dict.__getitem__(extra, key)) as s:
            sl = s.get_slice(key)
            return tuple(sl.get_shape()), _ST_DTYPES_BACK[sl.get_dtype()]
    return tuple(extra[key].shape), extra[key].dtype


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
_ST_DTYPES_BACK = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path, entries: dict):
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) comes
    from `entries` (name -> (dtype, shape, get)), then each get() is written and dropped."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, (kind, shape, _) in entries.items():
        n = math.prod(shape) * torch.empty((), dtype=kind).element_size()
        header[k] = {"dtype": _ST_DTYPES[kind], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                                # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for k, (kind, shape, get) in entries.items():
            t = get().detach().to("cpu", kind).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, its header says {shape}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _write_weights(folder: Path, entries: dict, max_shard_bytes: int | None, write: bool = True):
    """Weights of the official layout; weight files of an earlier export in `folder` are replaced (the
    index goes last and is what makes a set of shards count). write=False: the same gathers, in the
    same order, nothing written (the other ranks of a sharded export)."""
    sizes = {k: math.prod(shape) * torch.empty((), dtype=kind).element_size()
             for k, (kind, shape, _) in entries.items()}
    shards: list[list[str]] = [[]]
    filled = 0
    for k in entries:
        if max_shard_bytes and shards[-1] and filled + sizes[k] > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(k)
        filled += sizes[k]
    names = (["ema.safetensors"] if not max_shard_bytes else
             [f"ema-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if not write:
        for keys in shards:
            for k in keys:
                entries[k][2]()
        return
    stale = [folder / "ema.safetensors", folder / "ema.safetensors.index.json",
             *folder.glob("ema-*-of-*.safetensors")]
    for f in stale:
        if f.name not in names:
            f.unlink(missing_ok=True)
    for name, keys in zip(names, shards):
        atomic_write(folder / name, lambda p, keys=keys: write_safetensors(p, {k: entries[k] for k in keys}))
    if max_shard_bytes:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        atomic_write(folder / "ema.safetensors.index.json",
                     lambda p: Path(p).write_text(json.dumps(index, indent=2)))


# ------------------------------------------------------------------------------ training checkpoints
def fingerprint(state: dict) -> str:
    """A hash of a state dict's names, dtypes, shapes and bytes: says whether two models are the same."""
    h = hashlib.sha1()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_training(path: Path, step: int, policy, optimizer, generator, cfg, ref: str | None = None):
    """Policy and optimizer state, generator state, step, config and the fingerprint of the frozen
    reference: plain tensors, numbers and strings, all finite."""
    state = {"step": step, "policy": policy.state_dict(), "opt": optimizer.state_dict(),
             "gen": generator.get_state(), "config": dataclasses.asdict(cfg), "ref": ref}
    try:
        check_finite(f"after {step} RL steps", policy=state["policy"], optimizer=state["opt"]["state"])
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}; the checkpoint was not written") from None
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training(path: Path) -> dict:
    """A training checkpoint, loaded without executing pickled code (weights_only=True), its layout
    checked."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or crafted file: its pickle is never run
        why = "it holds more than plain tensors and numbers (possibly crafted)" \
            if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {str(e)[:120]}"
        raise CorruptFile(f"checkpoint {path} is corrupt or not a training checkpoint ({why}); "
                          f"delete it, or start over with --overwrite") from None
    bad = [k for k, kind in TRAINING_KEYS.items()
           if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if bad:
        raise CorruptFile(f"checkpoint {path} is corrupt or not a training checkpoint: missing or "
                          f"malformed {', '.join(bad)}; delete it, or start over with --overwrite")
    return state


STEPS = "ckpt"                                                    # <run>/ckpt/step-00000010/ (torchrun)


def step_folders(run_dir: Path) -> list[Path]:
    """The complete step checkpoints of a run, oldest first (a folder exists only once fully written)."""
    root = Path(run_dir) / STEPS
    return sorted(p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()) if root.is_dir() else []


def save_step(run_dir: Path, step: int, policy, optimizer, generator, cfg, world, keep: int = 2):
    """A torchrun training checkpoint: model and optimizer through torch.distributed.checkpoint (each rank
    writes its shards), every rank's RNG state, the step (the data position: batches are addressed by
    step) and the config, into <run>/ckpt/.step-N.tmp, renamed to step-N once every rank is done;
    the newest `keep` are kept. Nothing is written when a value is not finite."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    local = [v.to_local() if hasattr(v, "to_local") else v for v in _tensors({"m": model_sd, "o": optim_sd})]
    if distributed.any_rank(not all(torch.isfinite(t).all() for t in local if t.is_floating_point())):
        raise FloatingPointError(f"after {step} RL steps: non-finite weights or optimizer state; the "
                                 f"checkpoint was not written")
    root = Path(run_dir) / STEPS
    tmp, final = root / f".step-{step:08d}.tmp", root / f"step-{step:08d}"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    rng = {"torch": torch.get_rng_state(), "gen": generator.get_state()}
    if torch.cuda.is_available() and torch.device(cfg.device).type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(torch.device(cfg.device))
    save_file(rng, str(tmp / f"rng-{world.rank}.safetensors"))
    distributed.barrier()
    if world.main:
        meta = {"step": step, "world_size": world.size, "config": dataclasses.asdict(cfg)}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in step_folders(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def load_step(folder: Path, policy, optimizer, generator, cfg, world) -> int:
    """Resume from a step checkpoint on any rank count (DCP reshards): model, optimizer, this rank's RNG
    (rank 0's when the checkpoint had fewer ranks), the shared generator. Returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from safetensors.torch import load_file
    meta = read_json(folder / "state.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or "config" not in meta:
        raise CorruptFile(f"{folder / 'state.json'}: not a step checkpoint (no step or config)")
    check_same_run(meta["config"], cfg, folder)
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as e:  # a checkpoint of another model, or torn by hand
        raise CorruptFile(f"checkpoint {folder} does not fit this model and optimizer "
                          f"({type(e).__name__}: {str(e)[:200]}); --overwrite starts over") from None
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mine = folder / f"rng-{world.rank}.safetensors"
    rng = load_file(str(mine if mine.is_file() else folder / "rng-0.safetensors"))
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["gen"])
    if "cuda" in rng and torch.device(cfg.device).type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], torch.device(cfg.device))
    return meta["step"]


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def check_same_run(saved: dict, cfg, path: Path):
    """Resume only the run a checkpoint belongs to: the fields that change what the run computes must match
    (where it writes, how long and how it evaluates may change); a field added since counts at its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    now = dataclasses.asdict(cfg)

    def same(a, b):
        return tuple(a) == tuple(b) if isinstance(b, tuple) and isinstance(a, (list, tuple)) else a == b

    diff = {k: (saved.get(k, defaults[k]), now[k]) for k in config.algorithm_fields()
            if not same(saved.get(k, defaults[k]), now[k])}
    if diff:
        raise SystemExit(f"error: {path} was written with another config ({diff}: saved vs now); "
                         f"rerun with the same settings, or with --overwrite to start over")


def truncate_jsonl(path: Path, step: int):
    """On resume, drop metrics logged after the checkpoint (and a line torn by the kill), atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) < step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


# ---------------------------------------------------------------------------------------- run folders
@contextlib.contextmanager
def run_folder(run_dir: Path, resume: bool, overwrite: bool, hold: bool = True):
    """Hold `run_dir` for this process (a second process gets a clear error); a folder that holds another run
    is continued only with `resume`, replaced only with `overwrite`, and otherwise left alone.
    hold=False (torchrun's other ranks): the folder as it is; rank 0 holds and checks it."""
    if resume and overwrite:
        raise SystemExit("error: --resume continues a run, --overwrite starts it over: choose one")
    run_dir = Path(run_dir)
    if not hold:
        yield run_dir
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise SystemExit(f"error: {run_dir} is in use by another process ({lock.read().strip() or '?'}); "
                             f"wait for it, or pick another --name") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        held = [f for f in RUN_FILES if (run_dir / f).exists()]
        if held and not (resume or overwrite):
            raise SystemExit(f"error: {run_dir} holds a run ({', '.join(held)}): --resume continues it, "
                             f"--overwrite replaces it, or pick another --name")
        if overwrite:
            for f in (f for pattern in ARTIFACTS for f in run_dir.glob(pattern)):
                shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
        yield run_dir
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
