"""Checkpoints: BAGEL's official layout (load, save), training checkpoints with exact resume, and run folders.

Official layout (a BAGEL-7B-MoT folder): llm_config.json (Qwen2), optional bagel_config.json (latent
sizes, vae_config, new_token_ids), ema.safetensors or shards with a *.safetensors.index.json, the Qwen2
tokenizer files, ae.safetensors (read at the first encode/decode), and ViT weights, kept untouched.
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
from model import BagelConfig, BagelMoT, check_tokenizer
from policy import Policy

EXTRA_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")  # kept untouched, ViT not built
LLM_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rope_theta", "rms_norm_eps", "hidden_act", "max_position_embeddings")
TOKEN_ROLES = {"bos_token_id": "im_start_id", "eos_token_id": "im_end_id",  # Bagel's new_token_ids names
               "start_of_image": "vision_start_id", "end_of_image": "vision_end_id"}
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "summary.json")          # what makes a folder hold a run
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
                   if f.name in bag and f.name not in LLM_FIELDS})
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
                    **overrides) -> Policy:
    """The Policy of an official-layout folder; `overrides` change BagelConfig fields (for example the
    think-mode system prompt)."""
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
    state, extra = {}, {}
    for f in files:
        with _safetensors(f, device) as s:
            for k in s.keys():
                if k in expected:
                    state[k] = s.get_tensor(k).to(dtype)
                else:
                    extra[k] = s.get_tensor(k).cpu()
    model.load_state_dict(state, strict=True, assign=True)
    model.latent_pos_embed.pos_embed.requires_grad_(False)
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(folder)
    check_tokenizer(tokenizer, cfg)
    policy = Policy(cfg, tokenizer, model, embed_hook=embed_hook)
    policy.extra_state, policy.source_folder = extra, folder
    return policy


def _load_tokenizer(folder: Path):
    """The Qwen2 tokenizer files via AutoTokenizer (offline), or None when the folder has none."""
    if (folder / "word_tokenizer.json").is_file():
        raise ValueError(f"{folder} holds a toy checkpoint: load it with toy_policy.from_pretrained")
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return None


def save_pretrained(policy: Policy, folder, max_shard_bytes: int | None = None):
    """Write the official layout (each file atomically); the tokenizer and the embed hook save their own
    files; other files of the source folder (ae.safetensors, vit_config.json, ...) are copied.
    max_shard_bytes: weights in shards `ema-0000i-of-0000n.safetensors` of at most that size (a tensor
    larger than it gets a shard of its own) plus `ema.safetensors.index.json`, each shard copied to the
    host only while it is written, so the host never holds a second full copy; None: one
    `ema.safetensors`, as Bagel ships."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {**policy.model.state_dict(), **policy.extra_state}
    _write_weights(folder, tensors, max_shard_bytes)
    llm, bag = config_to_json(policy.cfg)
    bag["visual_und"] = any(k.startswith("vit_model.") for k in policy.extra_state)
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


def _write_weights(folder: Path, tensors: dict, max_shard_bytes: int | None):
    """Weights of the official layout; weight files of an earlier export in `folder` are replaced (the
    index goes last and is what makes a set of shards count)."""
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    shards: list[list[str]] = [[]]
    filled = 0
    for k in tensors:
        if max_shard_bytes and shards[-1] and filled + sizes[k] > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(k)
        filled += sizes[k]
    stale = [folder / "ema.safetensors", folder / "ema.safetensors.index.json",
             *folder.glob("ema-*-of-*.safetensors")]
    names = (["ema.safetensors"] if not max_shard_bytes else
             [f"ema-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for f in stale:
        if f.name not in names:
            f.unlink(missing_ok=True)
    for name, keys in zip(names, shards):
        part = {k: tensors[k].detach().cpu().contiguous() for k in keys}
        atomic_write(folder / name, lambda p, part=part: save_file(part, p))
        del part
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
def run_folder(run_dir: Path, resume: bool, overwrite: bool):
    """Hold `run_dir` for this process (a second process gets a clear error); a folder that holds another run
    is continued only with `resume`, replaced only with `overwrite`, and otherwise left alone."""
    if resume and overwrite:
        raise SystemExit("error: --resume continues a run, --overwrite starts it over: choose one")
    run_dir = Path(run_dir)
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
