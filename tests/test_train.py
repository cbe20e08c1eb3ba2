"""train.py end to end at smoke size: artifacts, exact resume after a kill, clear errors."""
import json

import pytest
import torch

import checkpoint
import config
import evaluate
import toy
import toy_policy
import train
import unigrpo

torch.set_num_threads(1)



def test_toy_smoke_run_writes_every_artifact(tmp_path, smoke):
    summary = train.main(smoke + [f"--out_dir={tmp_path}", "--name=smoke"])
    run = tmp_path / "smoke"
    for f in ("metrics.jsonl", "grid_before.png", "grid_after.png", "reward_curve.png",
              "summary.json", "ckpt.pt"):
        assert (run / f).stat().st_size > 0, f
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("reward_mean", "reward_std", "zero_spread_groups", "clip_frac_flow", "ratio_mean",
                "regulariser", "reasoning_len", *train.TIMING):
        assert key in rows[0], key
    on_disk = json.loads((run / "summary.json").read_text())
    for stage in ("before", "after"):
        for key in ("ta", "accuracy", "plan_validity", "ta/counting", "accuracy/position",
                    "plan_validity/colors", "plan_following", "background_noise"):
            assert key in on_disk[stage], (stage, key)
        assert 0.0 <= on_disk[stage]["plan_following"] <= 1.0
    assert set(on_disk["seconds"]) >= {"sft", "rl", "eval_before", "eval_after"}
    assert summary["after"]["ta"] == on_disk["after"]["ta"]


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, smoke, monkeypatch, spread_reward):
    args = smoke + [f"--out_dir={tmp_path}"]
    train.main(args + ["--name=full"])
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()

    real_update = unigrpo.update
    calls = {"n": 0}

    def dying_update(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:          # dies during step 3, after the checkpoint at step 2
            raise Killed
        return real_update(*a, **k)

    monkeypatch.setattr(unigrpo, "update", dying_update)
    with pytest.raises(Killed):
        train.main(args + ["--name=killed"])
    monkeypatch.setattr(unigrpo, "update", real_update)
    train.main(args + ["--name=killed", "--resume"])
    resumed = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    drop = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in train.TIMING} for r in rows]
    assert drop(resumed) == drop(full)
    assert all(json.loads(r)["grad_norm"] > 0 for r in full)     # the steps really moved


def test_resume_refuses_another_runs_checkpoint(tmp_path, smoke):
    args = smoke + [f"--out_dir={tmp_path}", "--name=r", "--rl_steps=2"]
    train.main(args)
    with pytest.raises(SystemExit, match="another config"):
        train.main(args + ["--resume", "--group_size=2"])
    train.main(args + ["--resume", "--rl_steps=3"])          # extending the same run is fine
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [0, 1, 2]


def test_truncate_jsonl_drops_a_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "rew')
    checkpoint.truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


@pytest.mark.parametrize("argv, message", [
    (["--toy", "--nonsense=1"], "unknown option --nonsense"),
    (["--tiny"], "unknown option --tiny"),
    (["toy"], "unexpected argument"),
    ([], "choose a preset"),
    (["--toy", "--group_size=1"], "group_size"),
    (["--toy", "--window_start=0,9"], "window"),
    (["--toy", "--lam=abc"], "lam"),
    (["--toy", "--sft_mse_weight=0"], "sft_mse_weight"),
    (["--toy", "--sft_noise=1"], "sft_noise"),
    (["--bagel"], "--bagel needs --model"),
])
def test_bad_command_lines_fail_clearly(argv, message):
    with pytest.raises(SystemExit, match=message):
        config.parse_args(argv)


def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        checkpoint.load_training(bad)
    assert bad.read_bytes() == b"not a checkpoint"


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.atomic_write(path, lambda tmp: torch.save({"a": torch.ones(3)}, tmp))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.atomic_write(path, lambda tmp: torch.save({"a": torch.zeros(3)}, tmp))
    assert torch.equal(torch.load(path)["a"], torch.ones(3))


@pytest.mark.parametrize("image_noise", [0.0, 0.3])
def test_sft_batch_noise_corrupts_plans_and_images_at_the_configured_rate(image_noise):
    """sft_noise = p: plans are wrong for their prompt at about rate p (one corrupt_layout edit; some edits
    are harmless to the prompt, so the rate is a little lower), the image drawing the wrong plan;
    sft_image_noise = q: images differ from their plan at about rate q."""
    clean, _ = config.parse_args(["--toy", "--sft_batch=400", "--sft_noise=0", "--sft_image_noise=0"])
    noisy, _ = config.parse_args(["--toy", "--sft_batch=400", "--sft_noise=0.3",
                                  f"--sft_image_noise={image_noise}"])
    prompts, plans, images = toy_policy.sft_batch(clean, 0)
    assert toy.score_plans(plans, prompts).all_correct.all()
    assert toy.score_images(images, prompts).all_correct.all()
    prompts_n, plans_n, images_n = toy_policy.sft_batch(noisy, 0)
    assert [p.text for p in prompts_n] == [p.text for p in prompts]
    bad_plan = 1 - toy.score_plans(plans_n, prompts_n).all_correct.float().mean().item()
    drawn, planned = evaluate.plan_following(plans_n, images_n)
    objs = [toy.parse_plan(t) for t in plans_n]
    image_off = sum(sorted((d.colour, d.shape, int(d.y // 8) * 4 + int(d.x // 8)) for d in det)
                    != sorted((o.colour, o.shape, o.cell) for o in obj)
                    for det, obj in zip(toy.detect_batch(images_n), objs)) / len(objs)
    assert 0.15 < bad_plan < 0.3, bad_plan
    if image_noise:
        assert 0.2 < image_off < 0.4 and drawn < planned, image_off
    else:
        assert image_off == 0 and drawn == planned


def test_sft_cache_is_reused_for_the_same_data_and_not_after_a_data_change(tmp_path, monkeypatch):
    cfg, _ = config.parse_args(["--toy", "--sft_steps=3", "--sft_batch=4"])
    policy = train.build_policy(cfg)
    assert toy_policy.sft(policy, cfg, tmp_path, print) > 0                      # trained and saved
    assert len(list(tmp_path.glob("sft-*"))) == 1
    assert toy_policy.sft(train.build_policy(cfg), cfg, tmp_path, print) == 0.0  # loaded
    real = toy.plan_text
    monkeypatch.setattr(toy, "plan_text", lambda layout: real(layout[::-1]))     # other plan order
    # new data: trained again
    assert toy_policy.sft(train.build_policy(cfg), cfg, tmp_path, print) > 0
    assert len(list(tmp_path.glob("sft-*"))) == 2


def test_log_to_needs_its_package_and_logs_every_record(tmp_path, monkeypatch):
    """--log_to stops before any work when its package is missing; with it, each record reaches it."""
    import sys
    import types
    cfg = config.preset("toy", log_to="wandb")
    monkeypatch.setitem(sys.modules, "wandb", None)                    # not installed
    with pytest.raises(SystemExit, match="needs the wandb package"):
        train.metrics_sink(cfg, None)
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: logged.append(("init", kw["name"])),
                                 log=lambda record, step: logged.append((step, record["reward_mean"])))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = train.metrics_sink(cfg, tmp_path)
    sink({"step": 3, "reward_mean": 0.5})
    assert logged == [("init", "toy"), (3, 0.5)]
