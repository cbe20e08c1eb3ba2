"""Host memory of loading an official-layout checkpoint: FSDP2-sharded under torchrun against one plain
process.

    .venv/bin/python benchmarks/bench_load_memory.py --make FOLDER [--params 0.6e9] [--hidden 1024]
    .venv/bin/python benchmarks/bench_load_memory.py --load FOLDER [--ranks 2]
        [--modes plain,sharded] [--json]

--make writes a random-initialised checkpoint in the official layout (llm_config.json,
bagel_config.json, ema.safetensors: the keys of BagelMoT(cfg).state_dict(), fp32) of about --params
parameters: a Qwen2-like MoT (from 2e8 parameters: hidden 1024, vocab 32000, GQA heads of dim 64;
intermediate 4 x hidden; codec "pixels" with the flux latent shape, so no ae.safetensors) whose layer
count is chosen to hit the size. It is
built on the meta device and written tensor by tensor (checkpoint.write_safetensors), so the host
never holds the model, let alone two copies.

--load runs, each in a fresh process (a subprocess each, one after the other; --modes picks them):
    plain          python: checkpoint.from_pretrained(folder, dtype=torch.float32), no process group
    sharded        torchrun --standalone --nproc_per_node=RANKS (gloo, CPU): from_pretrained(folder,
                   dtype=torch.float32, prepare=distributed.shard): the model on the meta device, FSDP2
                   fully_shard per decoder layer + root, to_empty, each rank reading its rows
Each process then reads every weight it holds once (the "touch": the plain model is still the lazy
file mapping after from_pretrained), and prints one row of a table; its notes say what each column
means. In short: ru_maxrss (KiB on Linux) is the resident high-water mark, and it counts the pages of
the memory-mapped safetensors file the process touched (page-cache pages, not a copy) besides the
process's own (anonymous) memory, which is why RssAnon and RssFile are polled beside it. A checksum
(the sum of every weight, over the ranks) shows all the processes read the same weights.

Why the loader opens a fresh mapping per tensor: with one mapping of the whole file for the whole load,
each rank's slices stayed resident as file pages until the end, and its ru_maxrss grew by about 1.08 of
the model while it held 0.50 (588M parameters, 2 ranks); per tensor, the pages leave with the slice.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

# run from anywhere: the repo's flat modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
from model import BagelConfig, BagelMoT, sincos_2d_table  # noqa: E402

MiB = 2 ** 20
RESULT = "RESULT "


# ------------------------------------------------------------------------------------------ --make
def config_for(params: float, hidden: int | None = None, vocab: int | None = None) -> BagelConfig:
    """A BagelConfig of about `params` parameters: the layer count solves for the size (at least 1)."""
    big = params >= 2e8
    H = hidden or (1024 if big else 512 if params >= 5e7 else 256 if params >= 1e7 else 64)
    d = 64 if H >= 512 else 16
    nq = H // d
    kw = dict(vocab_size=vocab or (32000 if big else 1024), hidden_size=H, intermediate_size=4 * H,
              num_attention_heads=nq, num_key_value_heads=max(nq // 4, 1), max_position_embeddings=4096,
              pad_id=0, im_start_id=1, im_end_id=2, vision_start_id=3, vision_end_id=4,
              think_system_prompt=None, codec="pixels", max_latent_size=64 if big else 8)
    one, two = (count(BagelConfig(num_hidden_layers=n, **kw)) for n in (1, 2))
    per_layer, fixed = two - one, 2 * one - two
    return BagelConfig(num_hidden_layers=max(1, round((params - fixed) / per_layer)), **kw)


def meta_model(cfg: BagelConfig) -> BagelMoT:
    with torch.device("meta"):
        return BagelMoT(cfg)


def count(cfg: BagelConfig) -> int:
    return sum(t.numel() for t in meta_model(cfg).state_dict().values())


def make(folder: Path, cfg: BagelConfig, seed: int = 0):
    """The official layout of a random init (BagelMoT.init_weights' rule: normal 0.02, zero biases and
    llm2vae, unit norms, the sincos position table), one tensor in memory at a time."""
    g = torch.Generator().manual_seed(seed)

    def value(name, shape):
        if name.startswith("latent_pos_embed."):
            return sincos_2d_table(cfg.hidden_size, cfg.max_latent_size)
        if name.startswith("llm2vae.") or name.endswith(".bias"):
            return torch.zeros(shape)
        if "norm" in name:
            return torch.ones(shape)
        return torch.empty(shape).normal_(0.0, 0.02, generator=g)

    state = meta_model(cfg).state_dict()
    entries = {k: (torch.float32, tuple(t.shape), (lambda k=k, s=tuple(t.shape): value(k, s)))
               for k, t in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    llm, bag = checkpoint.config_to_json(cfg)
    for name, d in (("llm_config.json", llm), ("bagel_config.json", {**bag, "visual_und": False})):
        (folder / name).write_text(json.dumps(d, indent=2))
    checkpoint.atomic_write(folder / "ema.safetensors",
                            lambda p: checkpoint.write_safetensors(p, entries))
    return sum(t.numel() for t in state.values())


def describe(cfg: BagelConfig) -> str:
    return (f"hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, layers "
            f"{cfg.num_hidden_layers}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv "
            f"(dim {cfg.head_dim}), vocab {cfg.vocab_size}, codec {cfg.codec}, max_latent_size "
            f"{cfg.max_latent_size}")


# ---------------------------------------------------------------------------------------- workers
def status_kib() -> dict:
    """VmRSS, RssAnon, RssFile (KiB) of this process, from /proc/self/status (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


class Poller(threading.Thread):
    """The largest RssAnon and RssFile seen every `every` seconds until stop()."""

    def __init__(self, every=0.002):
        super().__init__(daemon=True)
        self.every, self.done, self.peak = every, threading.Event(), {"RssAnon": 0, "RssFile": 0}

    def run(self):
        while not self.done.is_set():
            s = status_kib()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            time.sleep(self.every)

    def stop(self):
        self.done.set()
        self.join()
        return self.peak


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux


def worker(folder: Path, mode: str):
    """One process's measurement; prints RESULT + json (rank 0 of a sharded run: every rank's)."""
    import torch.distributed as dist

    import distributed
    from types import SimpleNamespace
    torch.set_num_threads(1)
    sharded = mode.startswith("sharded")
    if sharded:
        dist.init_process_group("gloo")
    start = maxrss_kib()
    poller = Poller()
    poller.start()
    t0 = time.perf_counter()
    if sharded:
        cfg = SimpleNamespace(dtype="float32")
        policy = checkpoint.from_pretrained(folder, dtype=torch.float32,
                                            prepare=lambda p: distributed.shard(p, cfg))
    else:
        policy = checkpoint.from_pretrained(folder, dtype=torch.float32)
    seconds = time.perf_counter() - t0
    sampled = poller.stop()
    peak = maxrss_kib()
    after = status_kib()
    held = model_bytes = 0
    total = 0.0
    poller = Poller()
    poller.start()
    for p in policy.model.parameters():           # touch: read every weight the process holds once
        local = distributed.local_rows(p)[1].detach()
        model_bytes += p.numel() * p.element_size()
        held += local.numel() * p.element_size()
        for chunk in local.reshape(-1).split(2 ** 20):
            # fp32 sums of 4 MiB pieces, added up in a Python float: sum(dtype=float64) would cast
            # each piece into a temporary, and the allocator keeps the heap those leave behind
            total += float(chunk.sum())
    touched = poller.stop()
    record = {"mode": mode, "rank": dist.get_rank() if sharded else 0, "start_kib": start,
              "peak_kib": peak, "anon_kib": sampled["RssAnon"], "file_kib": sampled["RssFile"],
              "touched_kib": maxrss_kib(), "touched_anon_kib": touched["RssAnon"],
              "touched_file_kib": touched["RssFile"], "after_load": after, "held_bytes": held, "model_bytes": model_bytes, "seconds": seconds}
    if sharded:
        total_t = torch.tensor(total, dtype=torch.float64)
        dist.all_reduce(total_t)
        records = [None] * dist.get_world_size()
        dist.all_gather_object(records, {**record, "checksum": total_t.item()})
        if dist.get_rank() == 0:
            print(RESULT + json.dumps(records), flush=True)
        dist.barrier()                   # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    else:
        print(RESULT + json.dumps([{**record, "checksum": total}]), flush=True)


# ------------------------------------------------------------------------------------------ --load
def torchrun() -> list:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def run_mode(folder: Path, mode: str, ranks: int, timeout: float) -> list:
    me = str(Path(__file__).resolve())
    cmd = ([*torchrun(), "--standalone", f"--nproc_per_node={ranks}", me] if mode != "plain"
           else [sys.executable, me])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*cmd, f"--worker={mode}", str(folder)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(RESULT)]
    if out.returncode or not lines:
        raise SystemExit(f"error: the {mode} load failed (exit {out.returncode}):\n{out.stdout}\n"
                         f"{out.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


NAMES = {"plain": "plain (1 process)", "sharded": "sharded rank {rank}"}


def table(records: list) -> str:
    model = records[0]["model_bytes"]
    mib = lambda kib: f"{kib / 1024:.0f}"
    head = ("| process | start | load peak | +load | x model | touched peak | +touched | x model | "
            "anon max | file max | held | x model | load s |")
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in records:
        load, touch = r["peak_kib"] - r["start_kib"], r["touched_kib"] - r["start_kib"]
        rows.append(" ".join([
            f"| {NAMES[r['mode']].format(rank=r['rank'])} | {mib(r['start_kib'])} |",
            f"{mib(r['peak_kib'])} | {mib(load)} | {load * 1024 / model:.2f} |",
            f"{mib(r['touched_kib'])} | {mib(touch)} | {touch * 1024 / model:.2f} |",
            f"{mib(max(r['anon_kib'], r['touched_anon_kib']))} |",
            f"{mib(max(r['file_kib'], r['touched_file_kib']))} |",
            f"{r['held_bytes'] / MiB:.0f} | {r['held_bytes'] / model:.2f} | {r['seconds']:.1f} |"]))
    return "\n".join(rows)


NOTES = """\
All sizes in MiB. start: ru_maxrss (KiB on Linux) after the imports and the process group.
load peak: ru_maxrss after from_pretrained; touched peak: after then reading every weight the process
holds once (fp32 sums of 1M-element pieces); +load, +touched: minus start; x model: over the full
fp32 model size.
ru_maxrss is the high-water mark of the resident set, and the resident set counts the touched pages of
the memory-mapped safetensors file (page-cache pages, shared and reclaimable, not a copy) as well as
the process's own memory: it overstates what a load costs when the weights are read through a mapping.
anon max / file max: the largest RssAnon (the process's own memory: the tensors it allocated; the
~270 MiB at start are torch and the interpreter) and RssFile (mapped file pages: the shared libraries,
~110 MiB, plus the touched safetensors pages) polled every 2 ms; their sum is about the peak.
held: the bytes of the weights the process holds (its local shards, FSDP padding excluded).
plain: safetensors' get_tensor is a view of the mapped file and .to(float32) of an fp32 file is a no-op,
so the plain model IS the file mapping (copy-on-write): loading reads nothing; reading the weights pulls
them in as file pages (file max), writing them (an optimizer step) would copy them into anon memory.
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--make", type=Path, help="write a random checkpoint into this folder")
    p.add_argument("--params", type=float, default=0.6e9)
    p.add_argument("--hidden", type=int, default=None, help="default: 1024 from 2e8 parameters")
    p.add_argument("--vocab", type=int, default=None, help="default: 32000 from 2e8 parameters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load", type=Path, help="measure loading this folder")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--modes", default=",".join(NAMES),
                   help=f"comma-separated, of {', '.join(NAMES)}")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", action="store_true", help="also print the records as one JSON line")
    p.add_argument("--worker", choices=tuple(NAMES), help=argparse.SUPPRESS)
    p.add_argument("folder", nargs="?", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.folder, a.worker)
    if not (a.make or a.load):
        p.error("give --make FOLDER and/or --load FOLDER")
    if a.make:
        cfg = config_for(a.params, a.hidden, a.vocab)
        t0 = time.perf_counter()
        n = make(a.make, cfg, a.seed)
        size = (a.make / "ema.safetensors").stat().st_size
        print(f"wrote {a.make}: {n:,} parameters ({n / 1e9:.3f}B), ema.safetensors {size:,} bytes "
              f"({size / MiB:.0f} MiB) in {time.perf_counter() - t0:.0f} s, peak RSS of this process "
              f"{maxrss_kib() / 1024:.0f} MiB\n  config: {describe(cfg)}")
    if a.load:
        cfg = checkpoint.config_from_folder(a.load)
        modes = [m for m in a.modes.split(",") if m]
        bad = set(modes) - set(NAMES)
        if bad:
            p.error(f"unknown mode(s) {sorted(bad)}: {', '.join(NAMES)}")
        records = [r for m in modes for r in run_mode(a.load, m, a.ranks, a.timeout)]
        model = records[0]["model_bytes"]
        print(f"{a.load}: {model // 4:,} parameters, fp32 model {model / MiB:.0f} MiB; "
              f"{describe(cfg)}; sharded over {a.ranks} ranks (gloo, CPU)\n")
        print(table(records))
        sums = {m: next(r["checksum"] for r in records if r["mode"] == m) for m in modes}
        ref = next(iter(sums.values()))
        same = all(abs(v - ref) <= 1e-6 * max(abs(ref), 1.0) for v in sums.values())  # fp32 pieces
        print(f"\nchecksum (the sum of every weight, over the ranks): "
              f"{', '.join(f'{m} {v:.6f}' for m, v in sums.items())}: {'equal' if same else 'DIFFER'}")
        print(NOTES)
        if a.json:
            print(json.dumps(records))
        return records


if __name__ == "__main__":
    main()
