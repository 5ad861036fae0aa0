"""recipes.compare_loss: zero error on identical runs, the right numbers on runs that differ,
thresholds, and a PNG with both curves."""

import json

import pytest

from recipes.train import compare_loss


def _write(path, losses, start=1):
    path.write_text("".join(json.dumps({"iteration": i, "loss": l}) + "\n" for i, l in enumerate(losses, start)))
    return path


def test_identical_runs_have_zero_error(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [4.0, 3.0, 2.0])
    b = _write(tmp_path / "b.jsonl", [4.0, 3.0, 2.0])
    assert compare_loss.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "mean 0.0000%" in out and "mean 0.000000" in out and "PASS" in out


def test_numbers_for_runs_that_differ(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [4.0, 3.0, 2.0, 1.0])
    b = _write(tmp_path / "b.jsonl", [4.0, 3.3, 2.0, 0.9, 0.8])  # b has one more iteration
    r = compare_loss.compare(compare_loss.read_losses(a), compare_loss.read_losses(b))
    assert r["iterations"] == 4
    assert r["max_abs"] == pytest.approx(0.3) and r["max_abs_at"] == 2
    assert r["mean_abs"] == pytest.approx((0.3 + 0.1) / 4)
    assert r["mean_rel"] == pytest.approx((0.3 / 3.3 + 0.1 / 0.9) / 4)
    assert r["max_rel"] == pytest.approx(0.1 / 0.9)
    assert compare_loss.main([str(a), str(b)]) == 1  # 5 % mean relative error > 2 %
    assert "FAIL" in capsys.readouterr().out
    assert compare_loss.main([str(a), str(b), "--rel-threshold", "0.06", "--abs-threshold", "0.2"]) == 0


def test_plot_is_written(tmp_path):
    a = _write(tmp_path / "a.jsonl", [5 - 0.1 * i for i in range(30)])
    b = _write(tmp_path / "b.jsonl", [5 - 0.1 * i + 0.002 * (i % 3) for i in range(30)])
    png = tmp_path / "cmp.png"
    assert compare_loss.main([str(a), str(b), "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_files_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"iteration": 1, "loss": 2.0}\nnot json\n')
    good = _write(tmp_path / "g.jsonl", [1.0])
    assert compare_loss.main([str(bad), str(good)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert compare_loss.main([str(tmp_path / "missing.jsonl"), str(good)]) == 2


def test_binary_file_is_named(tmp_path):
    from tests.helpers.launch import run_module

    good, binary = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good.write_text('{"iteration": 1, "loss": 2.0}\n')
    binary.write_bytes(b"\x00\xe9\xff" * 50)
    out = run_module("recipes.compare_loss", good, binary)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: {binary}: not a text metrics file (byte 1 is not UTF-8); give the run's metrics.jsonl")
