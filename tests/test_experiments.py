"""What RESULTS.md's claims rest on: the toy's learned proxy reward (its fit, its file, --reward=proxy:),
SFT's unconditional branch (sft_cfg_drop), the held-out curve (eval_every), and experiments/results.py
end to end on a 1-seed, few-step setting."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import toy
import toy_policy
import train
import unigrpo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import fit_proxy  # noqa: E402
import results  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def proxy_file(tmp_path_factory):
    """A proxy fitted by experiments/fit_proxy.py at a tiny size (its own 20-step SFT base)."""
    out = tmp_path_factory.mktemp("proxy")
    fit_proxy.main(["--samples=256", "--epochs=1", f"--out={out / 'proxy.safetensors'}",
                    f"--out_dir={out}", "--sft_steps=20", "--sft_batch=16"])
    return out / "proxy.safetensors"


def test_proxy_reward_round_trips_and_scores_in_unit_interval(proxy_file):
    proxy = toy.ProxyReward.load(proxy_file)
    prompts = toy.train_prompts(0, 5, 6)
    images = toy.render_batch([toy.random_layout(p, i) for i, p in enumerate(prompts)])
    s = proxy(images, prompts)
    assert s.shape == (6,) and s.dtype == torch.float32 and ((s > 0) & (s < 1)).all()
    again = toy.ProxyReward.load(proxy_file)
    assert torch.equal(again(images, prompts), s)             # deterministic, no pickle
    assert not torch.equal(proxy(images.flip(-1), prompts), s)  # it looks at the image


def test_proxy_reward_fits_the_verifier_better_than_a_constant():
    """A few epochs on renders: the fitted scores track TA (the proxy is a reward model, not noise)."""
    prompts, images = fit_proxy.render_images(4096, seed=3)
    ta = toy.ToyReward()(images, prompts)
    proxy = fit_proxy.fit(toy.ProxyReward(seed=0), prompts[:3584], images[:3584], ta[:3584], epochs=8)
    pred = proxy(images[3584:], prompts[3584:])
    constant = (ta[3584:] - ta[:3584].mean()).abs().mean()
    assert (pred - ta[3584:]).abs().mean() < 0.85 * constant


def test_a_bad_proxy_file_is_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not safetensors")
    with pytest.raises(ValueError, match="bad.safetensors"):
        toy.ProxyReward.load(bad)
    with pytest.raises(ValueError, match="no file"):
        config.preset("toy", reward=f"proxy:{tmp_path / 'missing.safetensors'}")
    with pytest.raises(ValueError, match="proxy:FILE"):
        config.preset("toy", reward="clip:/x")


def test_training_on_the_proxy_logs_the_verifier_and_evaluates_with_it(tmp_path, smoke, proxy_file):
    train.main(smoke + [f"--out_dir={tmp_path}", "--name=p", f"--reward=proxy:{proxy_file}",
                        "--eval_every=2", "--eval_curve_size=1"])
    rows = [json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    proxy = toy.ProxyReward.load(proxy_file)
    assert all(0 <= r["verifier_mean"] <= 1 for r in rows)
    assert [("heldout_ta" in r) for r in rows] == [False, True, False, True]      # every 2 steps
    assert all(0 <= r["heldout_ta"] <= 1 and "heldout_background_noise" in r for r in rows if "heldout_ta" in r)
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert "accuracy" in summary["after"]           # evaluation is the exact verifier's, not the proxy's
    assert isinstance(proxy, torch.nn.Module)


def test_sft_cfg_drop_trains_the_unconditional_input_cfg_reads():
    """A dropped triple is trained on exactly what CFG's unconditional branch feeds (an empty prompt
    chunk, no reasoning), without a plan CE; the rate follows sft_cfg_drop."""
    cfg = config.preset("toy", sft_batch=400, sft_cfg_drop=0.25)
    drop = toy_policy.sft_drop(cfg, 0)
    assert drop.shape == (400,) and 70 < int(drop.sum()) < 130
    assert torch.equal(drop, toy_policy.sft_drop(cfg, 0)) and not torch.equal(drop, toy_policy.sft_drop(cfg, 1))
    policy = toy_policy.build_policy(0)
    prompts, plans, images = toy_policy.sft_batch(dataclasses.replace(cfg, sft_batch=4), 0)
    captured = {}
    real = policy.train_forward

    def spy(thoughts, x_t, t, image_hw=None):
        captured["th"] = thoughts
        return real(thoughts, x_t, t, image_hw)

    policy.train_forward = spy
    toy_policy.sft_loss(policy, prompts, plans, images, torch.Generator().manual_seed(0), 1.0,
                        drop=torch.tensor([True, False, True, False]))
    th, uncond = captured["th"], unigrpo.uncond_thoughts(policy, 1)
    for r in (0, 2):
        assert th.mask[r].sum() == 0
        assert th.prompt_ids[r][th.prompt_mask[r]].tolist() == uncond.prompt_ids[0].tolist()
    assert th.mask[1].sum() > 0 and th.prompt_mask[1].sum() > uncond.prompt_ids.shape[1]


def test_results_script_runs_a_table_and_writes_it(tmp_path, proxy_file):
    """The documented command end to end on 1 seed and a few steps (four of its variants): runs, raw
    records, the equal-time SFT control, the tables between their markers, the plots; a second call reuses
    every finished run."""
    md = tmp_path / "RESULTS.md"
    md.write_text("# notes\n<!-- results:table1 -->old<!-- /results:table1 -->\nkept\n"
                  "<!-- results:fig5 --><!-- /results:fig5 -->\n")
    args = ["table1", "fig5", "--quick", "--seeds=0", "--jobs=2", "--only=unigrpo,text_only,sft_more,proxy_kl",
            f"--out_dir={tmp_path / 'runs'}",
            f"--raw={tmp_path / 'raw'}", f"--results_md={md}", f"--plots={tmp_path / 'plots'}",
            f"--proxy={proxy_file}"]
    out = subprocess.run([sys.executable, "experiments/results.py", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    raw = sorted(p.name for p in (tmp_path / "raw").iterdir())
    assert raw == sorted(f"{v}-s0.json" for v in ["sft_more", "text_only", "unigrpo", "proxy_kl"])
    rec = json.loads((tmp_path / "raw" / "proxy_kl-s0.json").read_text())
    assert rec["seed"] == 0 and "--regulariser=latent_kl" in rec["flags"] and len(rec["curve"]) == 2
    assert "verifier_mean" in rec["curve"][0] and "after" in rec["summary"]
    text = md.read_text()
    assert "old" not in text and "kept" in text and text.count("| SFT base (no RL) | 1 |") == 1
    assert "| FlowGRPO only (reasoning frozen, thinking on) | 0 | — |" in text      # not run: shown as missing
    more = json.loads((tmp_path / "raw" / "sft_more-s0.json").read_text())
    assert more["sft_steps"] == 20 + results.sft_more_steps(json.loads((tmp_path / "raw" / "unigrpo-s0.json")
                                                                       .read_text()))
    for name in ("table1", "fig5"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 0
    t1 = text[text.index("<!-- results:table1 -->"):text.index("<!-- /results:table1 -->")]
    assert len([line for line in t1.splitlines() if line.startswith("| ")]) == 1 + len(results.TABLES["table1"][1])
    stamp = {p: p.stat().st_mtime for p in (tmp_path / "raw").iterdir()}
    again = subprocess.run([sys.executable, "experiments/results.py", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "wrote table1, fig5" in again.stdout
    assert {p: p.stat().st_mtime for p in (tmp_path / "raw").iterdir()} == stamp      # reused


def test_results_script_runs_the_multi_round_table(tmp_path):
    """The rounds table at quick size: the two-round run, then the one-round run given as many RL steps as take
    the two-round run's time, on the same SFT base with reflection rows; the table shows both rounds."""
    md = tmp_path / "RESULTS.md"
    md.write_text("<!-- results:rounds --><!-- /results:rounds -->\n")
    args = ["table1", "rounds", "--quick", "--seeds=0", "--jobs=2", "--only=unigrpo,rounds2,rounds1_time",
            f"--out_dir={tmp_path / 'runs'}", f"--raw={tmp_path / 'raw'}", f"--results_md={md}",
            f"--plots={tmp_path / 'plots'}"]
    md.write_text(md.read_text() + "<!-- results:table1 --><!-- /results:table1 -->\n")
    out = subprocess.run([sys.executable, "experiments/results.py", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    load = {v: json.loads((tmp_path / "raw" / f"{v}-s0.json").read_text()) for v in ("unigrpo", "rounds2",
                                                                                      "rounds1_time")}
    two, one = load["rounds2"], load["rounds1_time"]
    assert "--rounds=2" in two["flags"] and "--sft_reflect=0.5" in one["flags"]
    assert len(one["curve"]) == results.equal_time_steps(two, load["unigrpo"])
    assert two["summary"]["before"]["round1/ta"] >= 0 and "round2/ta" in two["summary"]["after"]
    text = md.read_text()
    block = text[text.index("<!-- results:rounds -->"):text.index("<!-- /results:rounds -->")]
    assert "TA round 2" in block and len([x for x in block.splitlines() if x.startswith("| ")]) == 1 + 3
    assert (tmp_path / "plots" / "rounds.png").stat().st_size > 0


def test_results_script_refuses_bad_input_before_any_run(tmp_path):
    for argv, message in ((["tableX"], "unknown table"), (["--seeds=a"], "expected integers"),
                          (["fig5", f"--proxy={tmp_path}/none"], "fit_proxy.py"),
                          (["table1", "--rl_steps=-1", f"--raw={tmp_path}"], "variant")):
        with pytest.raises(SystemExit, match=message):
            results.main(argv)
    assert not any(tmp_path.iterdir())
