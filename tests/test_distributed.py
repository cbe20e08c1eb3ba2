"""`torchrun train.py --bagel` on CPU (gloo, 2 processes) on the tiny official-format checkpoint: the same
numbers on 1 and 2 ranks, exact resume after a kill (also onto another rank count), a dead rank ending
the job, the streaming export round trip, LoRA under FSDP2, bad input stopped on every rank."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import config
import distributed
import lora
import unigrpo
from tiny_bagel import save_tiny_bagel
from tiny_models import save_tiny_clip

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--prompts_per_step=2", "--group_size=2", "--max_think_tokens=4", "--num_steps=4",
         "--window_start=0,1", "--window_size=2", "--minibatches=1", "--ckpt_every=1", "--save_model=false",
         "--image_hw=32,32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    (d / "train.txt").write_text("a red cube\ntwo cats on a sofa\na photo of a dog\na blue ball\n")
    return {"model": save_tiny_bagel(d / "bagel"), "clip": save_tiny_clip(d / "clip"), "root": d}


def argv(folders, out, *extra):
    return ["--bagel", f"--model={folders['model']}", f"--prompts={folders['root'] / 'train.txt'}",
            f"--reward=clip:{folders['clip']}", f"--out_dir={out}", *SMALL, *extra]


def torchrun(n: int, args, wait=True, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(ROOT / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_numbers(a: Path, b: Path, tol=1e-4):
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for k in ("reward_mean", "loss", "loss_text", "loss_flow", "grad_norm", "regulariser"):
            assert ra[k] == pytest.approx(rb[k], rel=tol, abs=tol), (k, ra["step"])


def assert_same_weights(a: Path, b: Path, atol=2e-6):
    wa, wb = load_file(a / "ema.safetensors"), load_file(b / "ema.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(folders, tmp_path_factory):
    """Three RL steps on 2 ranks, exported at the end: the reference the other runs must reproduce."""
    out = tmp_path_factory.mktemp("two")
    torchrun(2, argv(folders, out, "--rl_steps=3", f"--export_to={out / 'export'}"))
    return out


def test_one_rank_and_two_ranks_give_the_same_parameters(folders, uninterrupted, tmp_path):
    torchrun(1, argv(folders, tmp_path, "--rl_steps=3", f"--export_to={tmp_path / 'export'}"))
    assert_same_numbers(tmp_path / "bagel", uninterrupted / "bagel")
    assert_same_weights(tmp_path / "export", uninterrupted / "export")
    start = load_file(folders["model"] / "ema.safetensors")
    moved = load_file(tmp_path / "export" / "ema.safetensors")
    assert max((moved[k] - start[k]).abs().max().item() for k in start) > 3e-5     # the steps did something


def trained_policy(folders, run: Path, *extra):
    """The policy of a run's newest step checkpoint, loaded in this (plain) process: DCP reshards."""
    cfg, _ = config.parse_args(argv(folders, run.parent, *extra))
    policy = checkpoint.from_pretrained(cfg.model, dtype=torch.float32)
    if cfg.lora_rank:
        lora.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_experts, seed=cfg.seed)
    opt = unigrpo.make_optimizer(policy, cfg)
    step = checkpoint.load_step(checkpoint.step_folders(run)[-1], policy, opt, torch.Generator(), cfg,
                                distributed.World())
    return policy, step


def outputs(policy):
    g = torch.Generator().manual_seed(0)
    th = policy.think(["a red cube", "two cats"], n=2, max_new_tokens=4, generator=g)
    N, D = policy.latent_shape()
    return policy.train_forward(th, torch.randn(4, 2, N, D, generator=g), torch.tensor([0.9, 0.5]))


def test_export_round_trips_to_the_trained_policy(folders, uninterrupted):
    policy, step = trained_policy(folders, uninterrupted / "bagel", "--rl_steps=3")
    assert step == 3
    exported = checkpoint.from_pretrained(uninterrupted / "export", dtype=torch.float32)
    a, b = outputs(policy), outputs(exported)
    torch.testing.assert_close(a.logp, b.logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.v, b.v, atol=1e-6, rtol=0)
    for f in ("ae.safetensors", "tokenizer.json", "llm_config.json", "bagel_config.json"):
        assert (uninterrupted / "export" / f).is_file()
    assert [p.name for p in checkpoint.step_folders(uninterrupted / "bagel")] == ["step-00000002",
                                                                                   "step-00000003"]  # keep 2


def test_a_run_killed_after_a_checkpoint_resumes_exactly_on_one_rank(folders, uninterrupted, tmp_path):
    run = tmp_path / "bagel"
    proc = torchrun(2, argv(folders, tmp_path, "--rl_steps=3"), wait=False)
    deadline = time.time() + 200
    while not (run / "ckpt" / "step-00000001").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p.name for p in checkpoint.step_folders(run)]
    assert "step-00000003" not in done, "the run finished before the kill; the test needs it mid-run"
    resumed = torchrun(1, argv(folders, tmp_path, "--rl_steps=3", "--resume", f"--export_to={tmp_path / 'e'}"))
    assert "resumed from" in resumed.stdout
    assert_same_numbers(run, uninterrupted / "bagel")
    assert_same_weights(tmp_path / "e", uninterrupted / "export")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_a_dead_rank_ends_the_job_quickly(folders, tmp_path):
    proc = torchrun(2, argv(folders, tmp_path, "--rl_steps=100", "--dist_timeout=30"), wait=False)
    deadline = time.time() + 200
    while not (tmp_path / "bagel" / "ckpt" / "step-00000001").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)                   # one rank dies mid-run
    t0 = time.time()
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0 and time.time() - t0 < 60


def test_lora_under_fsdp_trains_only_adapters_and_exports_merged(folders, tmp_path):
    extra = ["--rl_steps=1", "--lora_rank=2", "--lora_alpha=4", "--lora_experts=both"]
    torchrun(2, argv(folders, tmp_path, *extra, f"--export_to={tmp_path / 'export'}"))
    policy, _ = trained_policy(folders, tmp_path / "bagel", *extra)
    start = load_file(folders["model"] / "ema.safetensors")
    state = policy.model.state_dict()
    for k, v in start.items():
        assert torch.equal(state[k], v), k                # every base weight as it was
    assert any(v.abs().max() > 0 for k, v in lora.lora_parameters(policy).items() if k.endswith("lora_B"))
    exported = checkpoint.from_pretrained(tmp_path / "export", dtype=torch.float32)
    a, b = outputs(policy), outputs(exported)
    torch.testing.assert_close(a.v, b.v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flag, message", [("--prompts_per_step=1", "more ranks (2) than groups"),
                                           ("--prompts_per_step=3", "not divisible by the 2 ranks")])
def test_bad_sizes_stop_every_rank_before_any_work(folders, tmp_path, flag, message):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *argv(folders, tmp_path, "--rl_steps=1"), flag]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = done.stdout + done.stderr
    # each rank checks before any work; the first to stop makes torchrun end the other (which may not
    # have printed yet)
    assert done.returncode != 0 and message in out, out[-2000:]
    assert not (tmp_path / "bagel").exists()


def test_export_only_writes_a_saved_checkpoint_without_training(folders, uninterrupted, tmp_path):
    """--export_only in one plain process reads the 2-rank DCP checkpoint and writes what the run
    exported; without a checkpoint it says so."""
    import train
    out = tmp_path / "again"
    train.main(argv(folders, uninterrupted, "--rl_steps=3", "--export_only", f"--export_to={out}"))
    assert_same_weights(out, uninterrupted / "export", atol=0)
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        train.main(argv(folders, tmp_path, "--export_only", f"--export_to={out}"))


def test_a_checkpoint_of_another_config_is_refused_before_any_model_work(folders, uninterrupted,
                                                                         monkeypatch):
    import train
    monkeypatch.setattr(train, "build_policy", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match="written with another config.*group_size"):
        train.main(argv(folders, uninterrupted, "--rl_steps=4", "--resume", "--group_size=4"))
