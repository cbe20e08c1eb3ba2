"""Checkpoints and run folders, tried as a hostile or careless user would: crafted checkpoint and cache
files run no code, non-finite values never reach a checkpoint, a rerun never deletes another run, two
writers never share a temp file, a run folder is held by one process, resume follows the config (not the
folder's name), loader errors name the file; and a kill -9 followed by --resume is exact."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import config
import toy_policy
import train

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "bagel" / "model"
torch.set_num_threads(1)
UMASK = os.umask(0)
os.umask(UMASK)


class Evil:
    """Unpickling this runs os.mkdir(marker): proof that a loader executed pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def drop_timing(path):
    return [{k: v for k, v in json.loads(line).items() if k not in train.TIMING}
            for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------ no pickled code
def test_crafted_checkpoint_runs_no_code_on_resume(tmp_path, smoke):
    run = tmp_path / "r"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"step": Evil(marker), "policy": {}}, run / "ckpt.pt")
    with pytest.raises(SystemExit, match="ckpt.pt.*possibly crafted"):
        train.main(smoke + [f"--out_dir={tmp_path}", "--name=r", "--resume"])
    assert not marker.exists()


def test_crafted_sft_cache_runs_no_code_on_a_plain_rerun(tmp_path):
    cfg = config.preset("toy", sft_steps=3, sft_batch=4, out_dir=str(tmp_path))
    policy = toy_policy.build_policy(cfg.seed)
    path = toy_policy.sft_cache_path(policy, cfg, tmp_path / "sft-cache")
    path.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"policy": Evil(marker)}, path)          # a pickle where the safetensors cache belongs
    with pytest.raises(RuntimeError, match=path.name):
        toy_policy.sft(policy, cfg, tmp_path / "sft-cache", print)
    assert not marker.exists()
    state = {k: v.contiguous() for k, v in policy.state_dict().items()}
    state["model.vae2llm.bias"] = state["model.vae2llm.bias"] * float("nan")
    save_file(state, str(path))                          # a readable cache with NaN weights
    with pytest.raises(RuntimeError, match=f"{path.name}.*non-finite model.vae2llm.bias"):
        toy_policy.sft(policy, cfg, tmp_path / "sft-cache", print)


def test_training_checkpoints_hold_plain_tensors_only(tmp_path, smoke):
    train.main(smoke + [f"--out_dir={tmp_path}", "--name=r"])
    state = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)   # loads: nothing but plain data
    assert set(state) == {"step", "policy", "opt", "gen", "config", "ref"} and state["step"] == 4
    assert isinstance(state["ref"], str)                                 # the reference's fingerprint
    assert oct((tmp_path / "r" / "ckpt.pt").stat().st_mode & 0o777) == oct(0o666 & ~UMASK)


# ------------------------------------------------------------------------------------- non-finite
def test_a_nan_reward_stops_the_run_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, smoke,
                                                                                 monkeypatch):
    args = smoke + [f"--out_dir={tmp_path}", "--name=r", "--ckpt_every=1"]
    real = train.build_reward

    def poisoned(cfg):
        reward = real(cfg)
        calls = {"n": 0}

        def fn(images, prompts):
            calls["n"] += 1
            r = reward(images, prompts)
            return r * float("nan") if calls["n"] == 3 else r      # the third rollout: RL step 2
        return fn

    monkeypatch.setattr(train, "build_reward", poisoned)
    with pytest.raises(SystemExit, match=r"RL step 2: the reward model returned non-finite rewards"):
        train.main(args)
    state = checkpoint.load_training(tmp_path / "r" / "ckpt.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["policy"].values() if v.is_floating_point())


def test_an_infinite_learning_rate_mid_run_stops_it_and_writes_no_non_finite_checkpoint(
        tmp_path, smoke, monkeypatch):
    """The command line refuses lr=inf; set inside a run at step 2, the weights turn non-finite after
    its first optimizer step: the run stops naming the step and the quantity, and the checkpoint written
    after 2 steps is kept, not overwritten."""
    args = smoke + [f"--out_dir={tmp_path}", "--name=r", "--ckpt_every=1"]
    real, calls = train.unigrpo.update, {"n": 0}

    def update(policy, ref, optimizer, ro, cfg, generator):
        calls["n"] += 1
        if calls["n"] == 3:                                   # RL step 2
            for group in optimizer.param_groups:
                group["lr"] = float("inf")
        return real(policy, ref, optimizer, ro, cfg, generator)

    monkeypatch.setattr(train.unigrpo, "update", update)
    with pytest.raises(SystemExit, match=r"RL step 2: non-finite .*last good checkpoint"):
        train.main(args)
    state = checkpoint.load_training(tmp_path / "r" / "ckpt.pt")
    assert state["step"] == 2
    checkpoint.check_finite("ckpt", **state["policy"])


def test_infinite_learning_rates_are_refused_before_any_work(tmp_path, smoke):
    with pytest.raises(SystemExit, match="lr_denoising=inf"):
        train.main(smoke + [f"--out_dir={tmp_path}", "--lr_denoising=inf"])
    assert not any(tmp_path.iterdir())


def test_save_training_refuses_non_finite_values_and_keeps_the_old_file(tmp_path):
    cfg = config.preset("toy", sft_steps=0)
    policy = toy_policy.build_policy(cfg.seed)
    opt = torch.optim.AdamW(policy.parameters())
    gen = torch.Generator()
    path = tmp_path / "ckpt.pt"
    checkpoint.save_training(path, 1, policy, opt, gen, cfg)
    before = path.read_bytes()
    with torch.no_grad():
        policy.model.vae2llm.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="vae2llm.weight"):
        checkpoint.save_training(path, 2, policy, opt, gen, cfg)
    assert path.read_bytes() == before


# --------------------------------------------------------------------------------- run folders
def test_a_rerun_without_resume_refuses_and_deletes_nothing(tmp_path, smoke):
    args = smoke + [f"--out_dir={tmp_path}", "--name=r", "--rl_steps=2"]
    train.main(args)
    run = tmp_path / "r"
    files = {f: (run / f).read_bytes() for f in ("ckpt.pt", "metrics.jsonl", "summary.json")}
    with pytest.raises(SystemExit, match="holds a run.*--resume.*--overwrite"):
        train.main(args)
    assert {f: (run / f).read_bytes() for f in files} == files
    train.main(args + ["--overwrite", "--rl_steps=1"])                  # asked for: starts over
    assert [r["step"] for r in drop_timing(run / "metrics.jsonl")] == [0]


def test_a_run_folder_is_held_by_one_process(tmp_path, smoke):
    with checkpoint.run_folder(tmp_path / "r", resume=False, overwrite=False):
        with pytest.raises(SystemExit, match="in use by another process.*pid"):
            train.main(smoke + [f"--out_dir={tmp_path}", "--name=r"])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, checkpoint\n"
         f"with checkpoint.run_folder({str(tmp_path / 'p')!r}, False, False):\n"
         "    print('held', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match="in use by another process"):
            with checkpoint.run_folder(tmp_path / "p", resume=False, overwrite=False):
                pass
    finally:
        holder.communicate("", timeout=60)
    with checkpoint.run_folder(tmp_path / "p", resume=False, overwrite=False):   # released at exit
        pass


def test_concurrent_writers_never_share_a_temp_file(tmp_path):
    path, errors = tmp_path / "ckpt.pt", []

    def writer(k):
        for i in range(15):
            try:
                checkpoint.atomic_write(path, lambda tmp: torch.save({"k": torch.full((64,), k)}, tmp))
            except Exception as e:   # noqa: BLE001 - the test counts any failure
                errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert torch.load(path, weights_only=True)["k"].unique().numel() == 1     # one whole write
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]                 # no temp file left


# -------------------------------------------------------------------------------------- resume
def test_a_moved_run_folder_resumes_exactly(tmp_path, smoke, spread_reward):
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(smoke + [f"--out_dir={a}", "--name=r", "--rl_steps=2"])
    full = tmp_path / "full"
    train.main(smoke + [f"--out_dir={full}", "--name=r", "--rl_steps=4"])
    shutil.move(str(a), str(b))
    train.main(smoke + [f"--out_dir={b}", "--name=r", "--rl_steps=4", "--resume"])
    assert drop_timing(b / "r" / "metrics.jsonl") == drop_timing(full / "r" / "metrics.jsonl")


def test_resume_tolerates_a_field_added_since_at_its_default(tmp_path, smoke, spread_reward):
    train.main(smoke + [f"--out_dir={tmp_path}", "--name=r", "--rl_steps=2"])
    path = tmp_path / "r" / "ckpt.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["text_kl"], state["config"]["adv_clip_max"]  # as written before they existed
    torch.save(state, path)
    train.main(smoke + [f"--out_dir={tmp_path}", "--name=r", "--rl_steps=3", "--resume"])
    with pytest.raises(SystemExit, match="text_kl"):
        train.main(smoke + [f"--out_dir={tmp_path}", "--name=r", "--rl_steps=4", "--resume",
                            "--text_kl=0.1"])


def test_kill_9_then_resume_is_exact(tmp_path, smoke, spread_reward):
    """A real SIGKILL mid-run (after a checkpoint), then --resume: the same metrics and weights as an
    uninterrupted run."""
    args = smoke + ["--rl_steps=6", "--ckpt_every=2"]
    train.main(args + [f"--out_dir={tmp_path}", "--name=full"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = ("import sys; sys.path.insert(0, 'tests'); import conftest, train; "
             "train.build_reward = lambda cfg: conftest.spread; train.main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", child, *args, f"--out_dir={tmp_path}", "--name=k"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "k" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:   # after the step-2 ckpt
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    train.main(args + [f"--out_dir={tmp_path}", "--name=k", "--resume"])
    assert drop_timing(metrics) == drop_timing(tmp_path / "full" / "metrics.jsonl")
    assert all(r["grad_norm"] > 0 for r in drop_timing(metrics))
    a = checkpoint.load_training(tmp_path / "full" / "ckpt.pt")["policy"]
    b = checkpoint.load_training(tmp_path / "k" / "ckpt.pt")["policy"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ loaders
def test_loader_errors_name_the_damaged_file(tmp_path):
    folder = Path(shutil.copytree(FIX, tmp_path / "m"))
    weights = folder / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="ema.safetensors"):
        checkpoint.from_pretrained(folder)
    (folder / "llm_config.json").write_text('{"hidden_size": 8,')
    with pytest.raises(ValueError, match="llm_config.json"):
        checkpoint.from_pretrained(folder)
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(RuntimeError, match="ckpt.pt"):
        checkpoint.load_training(bad)


def test_bagel_checks_the_model_folder_first(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="llm_config.json"):
        train.main(["--bagel", f"--model={empty}", "--device=cpu", f"--out_dir={tmp_path}"])
    assert not (tmp_path / "bagel").exists()


@pytest.mark.parametrize("flag, key", [("--image_hw=24,24", "image_hw"), ("--image_hw=64,64", "image_hw"),
                                       ("--max_think_tokens=5000", "max_think_tokens")])
def test_sizes_that_do_not_fit_the_model_stop_before_the_sft(tmp_path, smoke, flag, key):
    with pytest.raises(SystemExit, match=key):
        train.main(smoke + [f"--out_dir={tmp_path}", flag])
    assert not (tmp_path / "sft-cache").exists()


def test_bagel_with_a_good_folder_and_no_reward_stops_with_a_message(tmp_path):
    args = ["--bagel", f"--model={FIX}", "--device=cpu", f"--out_dir={tmp_path}"]
    with pytest.raises(SystemExit, match="--reward is empty"):
        train.main(args)
    assert not (tmp_path / "bagel").exists()
    folder = Path(shutil.copytree(FIX, tmp_path / "m"))
    (folder / "ema.safetensors").write_bytes((folder / "ema.safetensors").read_bytes()[:64])
    with pytest.raises(SystemExit, match="ema.safetensors"):
        train.main(["--bagel", f"--model={folder}", "--device=cpu", f"--out_dir={tmp_path}"])


@pytest.mark.parametrize("content", [[1, 2], {"step": 1, "config": {}}, {"step": "x", "policy": {},
                                                                          "opt": {}, "config": {}}])
def test_a_plain_data_file_of_the_wrong_layout_is_named_not_a_traceback(tmp_path, smoke, content):
    (tmp_path / "r").mkdir()
    torch.save(content, tmp_path / "r" / "ckpt.pt")
    with pytest.raises(SystemExit, match="ckpt.pt is corrupt or not a training checkpoint"):
        train.main(smoke + [f"--out_dir={tmp_path}", "--name=r", "--resume"])


def test_resume_refuses_a_different_frozen_reference(tmp_path, smoke):
    args = smoke + [f"--out_dir={tmp_path}", "--name=r", "--rl_steps=2"]
    train.main(args)
    path = tmp_path / "r" / "ckpt.pt"
    state = torch.load(path, weights_only=True)
    state["ref"] = "0" * 40                              # as if the SFT had been retrained differently
    torch.save(state, path)
    with pytest.raises(SystemExit, match="frozen reference differs"):
        train.main(smoke + [f"--out_dir={tmp_path}", "--name=r", "--rl_steps=3", "--resume"])


def test_overwrite_removes_every_artifact_of_the_old_run(tmp_path, smoke):
    args = smoke + [f"--out_dir={tmp_path}", "--name=r", "--rl_steps=1"]
    train.main(args)
    run = tmp_path / "r"
    assert (run / "grid_after.png").exists()
    train.main(args + ["--overwrite", "--eval_per_category=0"])
    assert not any((run / f).exists() for f in ("grid_before.png", "grid_after.png"))
    assert (run / "ckpt.pt").exists() and (run / "reward_curve.png").exists()
