"""The benchmark scripts run on public functions at tiny sizes: the verifier's throughput check, the rollout
(cached vs naive, and against its batched bound), the packed forward, the attention, the load-memory and
the toy's time-to-quality benchmarks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_attention  # noqa: E402
import bench_load_memory  # noqa: E402
import bench_verifier  # noqa: E402
import bench_rollout_bound  # noqa: E402
import bench_toy  # noqa: E402


def test_verifier_benchmark_scores_renders_all_correct():
    assert bench_verifier.benchmark(n=120, seed=1)["all_correct"] == 1.0


def test_rollout_benchmark_paths_agree():
    out = subprocess.run([sys.executable, "benchmarks/bench_rollout.py", "--repeats=1", "--group_size=2",
                          "--num_steps=3", "--window_start=0,0", "--window_size=1",
                          "--max_think_tokens=3"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "same tokens: True" in out.stdout and "speed-up naive / cached" in out.stdout


def test_attention_benchmark_prints_its_table(capsys):
    tiny = ["--sizes=64", "--repeats=1", "--layers=1", "--hidden=128", "--text=40", "--ragged=8"]
    bench_attention.main([*tiny, "--no_memory"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[:2] == ["64", "16"] and len(row) == 13
    assert all(float(x) > 0 for x in row[3:8])          # three times and the two ratios to the bound
    bench_attention.main([*tiny, "--measure=blocks,64"])  # one memory probe (a fresh process's body)
    assert json.loads(capsys.readouterr().out)["peak"] >= 0


def test_load_memory_benchmark_prints_its_table(tmp_path, capsys):
    folder = tmp_path / "ckpt"              # about 2M parameters: a plain process, then 2 ranks
    records = bench_load_memory.main(["--make", str(folder), "--params=2e6", "--load", str(folder),
                                      "--ranks=2", "--modes=plain,sharded"])
    out = capsys.readouterr().out
    assert (folder / "ema.safetensors").is_file() and "parameters" in out and "checksum" in out
    plain, *ranks = records
    assert plain["mode"] == "plain" and [r["rank"] for r in ranks] == [0, 1]
    assert plain["held_bytes"] == plain["model_bytes"] == sum(r["held_bytes"] for r in ranks)
    assert all(r["checksum"] == pytest.approx(plain["checksum"], rel=1e-6) for r in ranks)  # all read
    assert all(r["touched_kib"] >= r["peak_kib"] >= r["start_kib"] > 0 for r in records)
    rows = [ln for ln in out.splitlines() if ln.startswith(("| plain (", "| sharded rank"))]
    assert len(rows) == 3 and all(ln.count("|") == 14 for ln in rows)


def test_rollout_bound_benchmark_prints_its_ratios(capsys):
    bench_rollout_bound.main(["--layers=1", "--hidden=128", "--px=64", "--max_think_tokens=6", "--num_steps=3",
                              "--repeats=1", "--clock=wall"])
    out = capsys.readouterr().out
    for text in ("rollout / bound", "think + context", "denoise + decode", "separate / packed dense",
                 "separate / packed blocks"):
        assert text in out, out


def test_toy_time_to_quality_benchmark_prints_sft_and_rl_points(tmp_path, capsys, smoke):
    plot = tmp_path / "ttq.png"
    bench_toy.main([*smoke[1:], "--probe_every=10", "--probe_size=1", f"--plot={plot}",
                    f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| SFT |") or line.startswith("| RL |")]
    assert [r.split("|")[1].strip() for r in rows] == ["SFT"] * 3 + ["RL"], out
    assert "peak resident memory" in out and plot.stat().st_size > 0
