"""config.py: every field documented and on the command line, unknown keys answered with the nearest
names, and every bad value refused at the command line, naming its key, before any work."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import config
import train

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_has_a_help_line_and_a_group():
    for f in dataclasses.fields(config.Config):
        assert f.metadata.get("help"), f.name
        assert f.metadata["group"] in config.GROUPS, f.name


def test_help_lists_every_field_with_its_help_grouped():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())                       # argparse wraps the help lines
    for title in config.GROUPS.values():
        assert title in text
    for f in dataclasses.fields(config.Config):
        assert f"--{f.name} V" in text, f.name
        assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "--toy" in text and "--resume" in text and "--overwrite" in text
    assert "(paper: 24)" in text and "[default 24; --toy 8]" in text   # paper value, default, toy preset


@pytest.mark.parametrize("argv, near", [(["--toy", "--group_siz=3"], "--group_size"),
                                        (["--toy", "--lr_reasonin", "1"], "--lr_reasoning"),
                                        (["--tooy"], "--toy"), (["--toy", "--lr=1"], "--lr_reasoning"),
                                        (["--toy", "--eps_clip=1"], "--clip_text")])
def test_unknown_key_names_the_nearest_valid_ones(argv, near):
    with pytest.raises(SystemExit, match=f"unknown option.*did you mean.*{near}"):
        config.parse_args(argv)


def test_values_parse_by_the_fields_type():
    cfg, args = config.parse_args(["--toy", "--think=false", "--window_start", "1,4", "--lam=0.5",
                                   "--adv_clip_max=none", "--group_size", "4", "--resume"])
    assert (cfg.think, cfg.window_start, cfg.lam, cfg.adv_clip_max, cfg.group_size) == \
        (False, (1, 4), 0.5, None, 4)
    assert args.resume and not args.overwrite and args.preset == "toy"
    with pytest.raises(SystemExit, match="lr"):        # no prefix abbreviations
        config.parse_args(["--toy", "--lr=1e-3"])


@pytest.mark.parametrize("override, key", [
    ("--ckpt_every=0", "ckpt_every"), ("--window_start=3", "window_start"),
    ("--window_start=0,2,4", "window_start"), ("--temperature=-1", "temperature"),
    ("--device=cuda:7", "device"), ("--device=gpu", "device"), ("--lr_reasoning=inf", "lr_reasoning"),
    ("--lr_denoising=nan", "lr_denoising"), ("--sft_lr=-1e-3", "sft_lr"), ("--sft_batch=0", "sft_batch"),
    ("--image_hw=32", "image_hw"), ("--rl_steps=-1", "rl_steps"), ("--grad_clip=0", "grad_clip"),
    ("--clip_flow=0", "clip_flow"), ("--noise_level=inf", "noise_level"), ("--sft_ema=1", "sft_ema"),
    ("--name=a/b", "name"), ("--prompts_per_step=0", "prompts_per_step"), ("--seed=-1", "seed"),
    ("--adv_clip_max=0", "adv_clip_max"), ("--eval_steps=0", "eval_steps"), ("--dtype=int8", "dtype"),
    ("--minibatches=3", "minibatches"), ("--reg_weight=-1", "reg_weight"),
    ("--noise_level=0", "noise_level"), ("--seed=4294967296", "seed")])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(SystemExit, match=key):
        config.parse_args(["--toy", override])


def test_bad_values_stop_train_before_any_work(monkeypatch, tmp_path):
    def no_work(*a, **k):
        raise AssertionError("work started before the config was checked")
    monkeypatch.setattr(train, "build_policy", no_work)
    monkeypatch.setattr(train, "build_reward", no_work)
    with pytest.raises(SystemExit, match="ckpt_every"):
        train.main(["--toy", "--ckpt_every=0", f"--out_dir={tmp_path}"])
    assert not (tmp_path / "toy").exists()


def test_validate_checks_types_of_direct_configs():
    with pytest.raises(ValueError, match="group_size"):
        config.Config(group_size=2.5).validate()
    with pytest.raises(ValueError, match="think"):
        config.Config(think="yes").validate()
    with pytest.raises(ValueError, match="preset"):
        config.preset("tiny")
    assert config.preset("toy", group_size=4).group_size == 4


def test_resume_may_change_only_where_how_long_and_how_it_evaluates():
    may = {f.name for f in dataclasses.fields(config.Config) if f.metadata["resume_may_change"]}
    assert may == {"name", "out_dir", "device", "ckpt_every", "rl_steps", "eval_per_category",
                   "eval_steps", "eval_temperature", "eval_prompts", "eval_cfg", "eval_samples", "eval_batch",
                   "eval_limit", "reward_batch", "save_model", "eval_reward", "eval_every", "eval_curve_size",
                   "export_shard_gb", "ckpt_keep", "export_to", "log_to", "dist_timeout", "attention",
                   "activation_checkpointing"}
    assert set(config.algorithm_fields()) == {f.name for f in dataclasses.fields(config.Config)} - may


def test_bagel_refuses_the_toy_only_stages(tmp_path):
    for flag, key in (("--eval_per_category=4", "eval_per_category"), ("--sft_steps=10", "sft_steps")):
        with pytest.raises(SystemExit, match=key):
            config.parse_args(["--bagel", f"--model={tmp_path}", "--device=cpu", flag])


def test_resume_and_overwrite_exclude_each_other(tmp_path, smoke):
    with pytest.raises(SystemExit, match="choose one"):
        train.main(smoke + [f"--out_dir={tmp_path}", "--resume", "--overwrite"])
