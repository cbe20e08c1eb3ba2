"""The benchmark scripts run on public functions: the comparisons table (the one RESULTS.md shows) from
finished runs, the verifier's throughput check, the rollout, the attention and the load-memory benchmarks
at tiny sizes."""
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
import toy_comparisons  # noqa: E402
from reward import CATEGORIES  # noqa: E402


def fake_summary(ta_before, ta_after, rl_seconds):
    stage = lambda ta: {"ta": ta, "accuracy": ta - 0.2, "plan_validity": 0.7, "plan_following": 0.8,
                        "background_noise": 0.01, **{f"accuracy/{c}": 0.5 for c in CATEGORIES}}
    return {"before": stage(ta_before), "after": stage(ta_after), "seconds": {"rl": rl_seconds}}


def test_comparisons_print_the_results_table_from_finished_runs(tmp_path, capsys):
    for name, after in (("unigrpo", 0.9), ("reg_none", 0.95)):
        (tmp_path / f"cmp-{name}").mkdir()
        (tmp_path / f"cmp-{name}" / "summary.json").write_text(json.dumps(fake_summary(0.8, after, 300)))
    toy_comparisons.main(["unigrpo", "reg_none", "--reuse", f"--out_dir={tmp_path}"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == toy_comparisons.HEADER and lines[1] == "|---" * 13 + "|"
    assert lines[2] == ("| **unigrpo** (the toy preset) | 0.800 → 0.900 | 0.600 → 0.700 | "
                        "0.700 → 0.700 | 0.800 → 0.800 | 0.010 | " + " | ".join(["0.50"] * 6)
                        + " | 300 |")
    assert lines[3].startswith("| reg_none (no regulariser) | 0.800 → 0.950 |")
    assert lines[4].startswith("| (SFT base, for reference) | 0.800 | 0.600 | 0.700 | 0.800 | 0.010 |")
    assert all(line.count("|") == 14 for line in lines)
    saved = json.loads((tmp_path / "comparisons.json").read_text())
    assert set(saved) == {"unigrpo", "reg_none"}
    with pytest.raises(SystemExit, match="unknown variant"):
        toy_comparisons.main(["uni"])


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
