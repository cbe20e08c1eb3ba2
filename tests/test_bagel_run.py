"""`python train.py --bagel` end to end on CPU: a tiny official-layout checkpoint (tokenizer, FLUX AE), real
reward models saved in their transformers formats, prompt files, evaluation at two CFG scales, --eval_only,
and every bad input stopped before any model work."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import config
import prompts
import reward
import train
from tiny_bagel import save_tiny_bagel
from tiny_models import save_tiny_clip, save_tiny_geneval, save_tiny_vlm

ROOT = Path(__file__).resolve().parent.parent
GENEVAL = Path(__file__).parent / "fixtures" / "geneval" / "evaluation_metadata.jsonl"
# small enough for CI; every other number is the --bagel preset's
SMALL = ["--prompts_per_step=2", "--group_size=2", "--max_think_tokens=4", "--num_steps=4",
         "--window_start=0,1", "--window_size=2", "--eval_steps=2", "--minibatches=1", "--micro_batch=2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("bagel_run")
    (d / "train.txt").write_text("a red cube\ntwo cats on a sofa\na photo of a dog\n")
    lines = GENEVAL.read_text().splitlines()
    picked = [lines[i] for i in (0, 1, 85, 86, 180, 181, 260, 261, 355, 356, 460, 461)]   # 2 per tag
    (d / "geneval.jsonl").write_text("\n".join(picked) + "\n")
    return {"model": save_tiny_bagel(d / "bagel"), "clip": save_tiny_clip(d / "clip"),
            "vlm": save_tiny_vlm(d / "vlm"), "geneval": save_tiny_geneval(d / "geneval"),
            "train": d / "train.txt", "tagged": d / "geneval.jsonl", "root": d}


def bagel_args(folders, out, rew, *extra):
    return ["--bagel", f"--model={folders['model']}", f"--prompts={folders['train']}", f"--reward={rew}",
            "--rl_steps=2", f"--out_dir={out}", *SMALL, *extra]


def test_bagel_clip_end_to_end_with_two_cfg_scales(folders, tmp_path):
    """The issue's command (sizes made small) trains two steps, evaluates before and after at CFG 1 and 4,
    and writes metrics, grids, summary.json and the trained policy in the official layout. The evaluation
    scores with PickScore's scaling of the same CLIP (the tiny CLIP's cosines are mostly below 0, which
    CLIPScore clamps)."""
    pick = f"--eval_reward=pickscore:{folders['clip']}"
    argv = bagel_args(folders, tmp_path, f"clip:{folders['clip']}", f"--eval_prompts={folders['tagged']}",
                      "--eval_cfg=1,4", "--eval_limit=4", pick, "--export_shard_gb=0.0002")
    summary = train.main(argv)
    run = tmp_path / "bagel"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["images_per_s"] > 0 and r["step_time"] >= r["rollout_time"] > 0 and r["peak_mem_gb"] > 0
        assert "regulariser" in r and "clip_frac_flow" in r
    assert tuple(summary["config"]["image_hw"]) == (32, 32)          # 0,0: the checkpoint's largest
    for stage in ("before", "after"):
        both = summary["by_cfg"][stage]
        assert set(both) == {"1", "4"} and both["1"] == summary[stage]
        assert {"reward/single_object", "reward/two_object"} <= set(both["4"])
        assert both["1"]["reward"] != both["4"]["reward"]                       # CFG changes the images
        assert (run / f"grid_{stage}.png").stat().st_size and (run / f"grid_{stage}_cfg4.png").stat().st_size
    assert json.loads((run / "summary.json").read_text())["by_cfg"] == summary["by_cfg"]
    trained = checkpoint.from_pretrained(run / "model", dtype=torch.float32)
    state = torch.load(run / "ckpt.pt", weights_only=True)["policy"]
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert (run / "model" / "ae.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert len(list((run / "model").glob("ema-*-of-*.safetensors"))) > 1                  # ~210 KB shards

    # --eval_only on the exported folder reproduces the after-RL numbers of the run
    out = tmp_path / "ev"
    again = train.main(["--bagel", f"--model={run / 'model'}", pick, f"--eval_prompts={folders['tagged']}",
                        "--eval_only", "--eval_cfg=1,4", "--eval_limit=4", f"--out_dir={out}", *SMALL])
    for s in ("1", "4"):
        for k, v in summary["by_cfg"]["after"][s].items():
            assert again["by_cfg"]["eval"][s][k] == pytest.approx(v, abs=1e-4), (s, k)
    assert (out / "bagel" / "grid_eval_cfg4.png").is_file() and not (out / "bagel" / "ckpt.pt").exists()


def test_evaluation_applies_each_cfg_scale(folders):
    """The two scales of one evaluation call draw different images from the same noise; one scale twice
    draws the same images (a fixed seed)."""
    import evaluate
    cfg = config.preset("bagel", model=str(folders["model"]), reward="clip:.", image_hw=(32, 32),
                        max_think_tokens=4, eval_steps=3, eval_batch=4)
    policy = checkpoint.from_pretrained(folders["model"], dtype=torch.float32).eval()
    rows = [prompts.Prompt("a red cube"), prompts.Prompt("two cats")]
    _, _, plain = evaluate.generate_eval(policy, rows, cfg, 1.0, samples=2)
    _, _, again = evaluate.generate_eval(policy, rows, cfg, 1.0, samples=2)
    _, _, guided = evaluate.generate_eval(policy, rows, cfg, 4.0, samples=2)
    assert plain.shape == (4, 3, 32, 32) and torch.equal(plain, again)
    assert (plain - guided).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["vlm", "geneval", "clip+vlm", "geneval+clip"])
def test_bagel_runs_with_each_reward(folders, tmp_path, kind):
    kinds = kind.split("+")
    spec = f"{kind}:{folders[kind]}" if len(kinds) == 1 else ",".join(
        f"{k}:{folders[k]}@{w}" for k, w in zip(kinds, (0.5, 2.0)))
    prompts = folders["tagged"] if "geneval" in kinds else folders["train"]
    summary = train.main(bagel_args(folders, tmp_path, spec, f"--prompts={prompts}",
                                    f"--eval_prompts={folders['tagged']}", "--eval_cfg=1"))
    rows = [json.loads(line) for line in (tmp_path / "bagel" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["reward_mean"])) for r in rows)
    after = summary["after"]
    if "geneval" in kinds:                     # verdicts: TA-style score and accuracy, per tag
        assert {"ta", "accuracy", "ta/position", "accuracy/color_attr"} <= set(after)
        assert 0 <= after["accuracy"] <= after["ta"] <= 1
    else:
        assert "ta" not in after
    assert ("reward" in after) == (kind != "geneval")          # a sum also reports its own mean


def test_a_resumed_bagel_run_equals_a_straight_one(folders, tmp_path):
    """Killed after step 1 and resumed: the same prompts, rollouts and weights as a straight 2-step run."""
    clip = f"clip:{folders['clip']}"
    train.main(bagel_args(folders, tmp_path / "a", clip, "--save_model=false"))
    train.main(bagel_args(folders, tmp_path / "b", clip, "--rl_steps=1", "--save_model=false"))
    train.main(bagel_args(folders, tmp_path / "b", clip, "--resume", "--save_model=false"))
    a, b = (torch.load(tmp_path / x / "bagel" / "ckpt.pt", weights_only=True) for x in "ab")
    assert a["step"] == b["step"] == 2
    for k in a["policy"]:
        torch.testing.assert_close(b["policy"][k], a["policy"][k], rtol=0, atol=0, msg=k)
    rewards = [[json.loads(line)["reward_mean"] for line in open(tmp_path / x / "bagel" / "metrics.jsonl")]
               for x in "ab"]
    assert rewards[0] == rewards[1] and not (tmp_path / "a" / "bagel" / "model").exists()


def test_an_eval_reward_judges_what_another_reward_trains(folders, tmp_path):
    """The paper's setting: train on a VLM's judgement, evaluate with GenEval's rules; --eval_only with
    only an --eval_reward."""
    summary = train.main(bagel_args(folders, tmp_path, f"vlm:{folders['vlm']}",
                                    f"--eval_reward=geneval:{folders['geneval']}",
                                    f"--eval_prompts={folders['tagged']}", "--eval_cfg=1", "--rl_steps=1"))
    after = summary["after"]
    assert {"ta", "accuracy", "accuracy/counting"} <= set(after) and "reward" not in after
    again = train.main(["--bagel", f"--model={tmp_path / 'bagel' / 'model'}", "--eval_only",
                        f"--eval_reward=geneval:{folders['geneval']}", f"--eval_prompts={folders['tagged']}",
                        "--eval_cfg=1", f"--out_dir={tmp_path / 'ev'}", *SMALL])
    assert again["eval"] == pytest.approx(summary["after"], abs=1e-4)


def test_bad_eval_reward_and_untagged_eval_prompts_stop_early(folders, tmp_path, no_model_loading):
    clip = f"clip:{folders['clip']}"
    message = _error(bagel_args(folders, tmp_path, clip, f"--eval_reward=dino:{tmp_path}"))
    assert "--eval_reward" in message and "dino" in message
    message = _error(bagel_args(folders, tmp_path, clip, f"--eval_reward=geneval:{folders['geneval']}",
                                f"--eval_prompts={folders['train']}"))
    assert "train.txt: prompt 1" in message


def test_the_issue_command_line_runs_as_a_subprocess(folders, tmp_path):
    """`python train.py --bagel --model=... --prompts=... --reward=clip:... --rl_steps=2`, as a user types it
    (only the group and batch sizes made small for CI)."""
    cmd = [sys.executable, "train.py", *bagel_args(folders, tmp_path, f"clip:{folders['clip']}")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "bagel" / "summary.json").is_file() and (tmp_path / "bagel" / "model").is_dir()


# ---------------------------------------------------------------------------------------------- bad input
def _error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return str(e.value)


def test_bad_reward_specs_stop_before_model_work(folders, tmp_path, no_model_loading):
    base = lambda rew: bagel_args(folders, tmp_path, rew)          # noqa: E731
    message = _error(base(f"dino:{folders['clip']}"))
    assert "kinds" in message and "dino" in message
    assert str(tmp_path / "nowhere") in _error(base(f"clip:{tmp_path / 'nowhere'}"))
    assert "train.txt" in _error(base(f"clip:{folders['train']}"))                  # a file, not a folder
    assert str(folders["clip"]) in _error(base(f"vlm:{folders['clip']}"))           # wrong model type
    assert str(folders["vlm"]) in _error(base(f"clip:{folders['vlm']}"))
    assert "abc" in _error(base(f"clip:{folders['clip']}@abc"))
    assert "nan" in _error(base(f"clip:{folders['clip']}@nan")).lower()
    assert "--reward is empty" in _error(["--bagel", f"--model={folders['model']}",
                                          f"--prompts={folders['train']}"])
    assert "toy world's verifier" in _error(base("toy"))


def test_bad_prompt_files_stop_before_model_work(folders, tmp_path, no_model_loading):
    clip = f"clip:{folders['clip']}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a dog"}\n{"prompt": "a cat", "tag": "counting_things", "include": []}\n')
    message = _error(bagel_args(folders, tmp_path, clip, f"--prompts={bad}"))
    assert "bad.jsonl:2" in message and "counting_things" in message
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a dog"}\n{"prompt": \n')
    assert "broken.jsonl:2" in _error(bagel_args(folders, tmp_path, clip, f"--prompts={broken}"))
    no_prompts = [a for a in bagel_args(folders, tmp_path, clip) if not a.startswith("--prompts")]
    assert "--prompts" in _error(no_prompts)
    message = _error(bagel_args(folders, tmp_path, f"geneval:{folders['geneval']}"))   # plain text prompts
    assert "train.txt: prompt 1" in message and "geneval" in message
    message = _error(["--bagel", f"--model={folders['model']}", f"--reward={clip}", "--eval_only"])
    assert "--eval_prompts" in message


def test_bagel_preset_resolves_device_dtype_and_size():
    cfg = config.preset("bagel", model=".", reward="clip:.")
    assert cfg.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cfg.dtype == ("bfloat16" if cfg.device == "cuda" else "float32")
    assert cfg.image_hw == (0, 0) and cfg.eval_cfg == (1.0, 4.0)
    for key in ("group_size", "prompts_per_step", "num_steps", "lr_reasoning", "lr_denoising", "reg_weight",
                "clip_flow", "noise_level", "window_size", "ppo_epochs"):
        assert getattr(cfg, key) == getattr(config.Config(), key), key     # the paper's numbers
    with pytest.raises(ValueError, match="image_hw"):
        config.preset("toy", image_hw=(0, 0))
    with pytest.raises(ValueError, match="reward"):
        config.preset("toy", reward=f"clip:{ROOT}")
    with pytest.raises(ValueError, match="prompts"):
        config.preset("toy", prompts="train.txt")
