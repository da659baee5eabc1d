"""Tests of fastsat.report: the files analyze() writes (checked against fastsat.alignment's
per-sample functions and textbook formulas) and the figures."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from matplotlib.image import imread
from test_alignment import C, H, K, W, images, pearson_textbook, relu_net

from fastsat import alignment as al
from fastsat import report


def read_csv_rows(path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def same_number(a: float | None, b: float) -> bool:
    """JSON writes non-finite numbers as null."""
    return (a is None and not math.isfinite(b)) or a == b


def test_analyze_writes_files_that_match_the_table(tmp_path) -> None:
    torch.manual_seed(7)
    model, x = relu_net(bias=True), images(10)
    y = torch.randint(0, K, (10,))
    batches = [{"image": x[:4], "label": y[:4], "index": 0}, (x[4:], y[4:])]
    result = report.analyze(
        model, batches, out_dir=tmp_path / "out", grid_samples=3,
        smoothgrad_kwargs={"n_samples": 3}, ig_kwargs={"steps": 4}, deepfool_kwargs={},
    )
    rows = result.rows
    assert [r["index"] for r in rows] == list(range(10))
    assert [r["label"] for r in rows] == y.tolist()
    # The table holds what the per-sample functions return.
    lin = al.linearization(model, x)
    stats = al.saliency_alignment(model, x)
    for col, want in (("alpha", stats.alignment), ("alpha_bin", lin.alpha_bin), ("rho_tilde", lin.rho_tilde),
                      ("beta", lin.beta), ("prediction", lin.prediction), ("cosine", stats.cosine)):
        got = torch.tensor([r[col] for r in rows], dtype=want.dtype)
        assert torch.allclose(got, want, rtol=1e-12, atol=0), f"column {col} differs from the direct call"
    rho = torch.tensor([r["rho"] for r in rows], dtype=torch.float64)
    assert rho.isfinite().all(), f"ρ not measured: {rho.tolist()}"
    assert torch.equal(rho, al.boundary_distance(model, x)), "column rho differs from boundary_distance"

    assert set(result.files) == {"csv", "json", "scatter", "saliency_grid"}
    csv_rows = read_csv_rows(result.files["csv"])
    assert len(csv_rows) == 10
    for got, want in zip(csv_rows, rows, strict=True):
        for k, v in want.items():
            assert got[k] == v or (math.isnan(got[k]) and math.isnan(v)), f"CSV {k}: {got[k]!r} vs {v!r}"
    payload = json.loads(result.files["json"].read_text())
    for got, want in zip(payload["rows"], rows, strict=True):
        assert all(same_number(got[k], v) for k, v in want.items()), f"JSON row {got} vs {want}"
    assert all(same_number(payload["summary"][k], v) if isinstance(v, float) else payload["summary"][k] == v
               for k, v in result.summary.items())
    # The summary is recomputed from the table with the reference formulas.
    s = result.summary
    assert s["n"] == 10 and s["accuracy"] == sum(r["label"] == r["prediction"] for r in rows) / 10
    alphas = sorted(r["alpha"] for r in rows)
    assert s["median_alpha"] == (alphas[4] + alphas[5]) / 2
    ab, rt = [r["alpha_bin"] for r in rows], [r["rho_tilde"] for r in rows]
    assert s["pearson_alpha_bin_rho_tilde"] == pytest.approx(pearson_textbook(ab, rt), rel=1e-9)
    assert s["pearson_alpha_rho"] == pytest.approx(pearson_textbook([r["alpha"] for r in rows], rho.tolist()), rel=1e-9)
    # PNGs decode; the grid has one 200-px row per grid sample and 4 columns (input | 3 maps).
    scatter = imread(result.files["scatter"])
    assert scatter.shape[:2] == (450, 1000)
    grid = imread(result.files["saliency_grid"])
    assert grid.shape[:2] == (3 * 200, 4 * 200)
    assert not list((tmp_path / "out").glob(".*.tmp")), "temporary files left behind"


def test_analyze_without_rho_and_from_a_tensor_pair() -> None:
    torch.manual_seed(8)
    model, x = relu_net(bias=False), images(5)
    y = torch.randint(0, K, (5,))
    result = report.analyze(model, (x, y), measure_rho=False)
    assert result.files == {}
    assert all(math.isnan(r["rho"]) for r in result.rows)
    assert math.isnan(result.summary["pearson_alpha_rho"]) and result.summary["n_pairs_alpha_rho"] == 0
    # Bias-free: α_bin = ρ̃ for every sample, so their correlations are 1.
    assert result.summary["spearman_alpha_bin_rho_tilde"] == pytest.approx(1.0, abs=1e-12)


def test_analyze_rejects_bad_data() -> None:
    model = relu_net(bias=True)
    with pytest.raises(ValueError, match="image"):
        report.analyze(model, [{"x": images(2), "label": torch.zeros(2, dtype=torch.long)}], measure_rho=False)
    with pytest.raises(ValueError, match="labels"):
        report.analyze(model, (images(3), torch.zeros(2, dtype=torch.long)), measure_rho=False)
    with pytest.raises(ValueError, match="no samples"):
        report.analyze(model, [], measure_rho=False)
    with pytest.raises(ValueError, match="target"):
        report.analyze(model, (images(3), torch.zeros(3, dtype=torch.long)), target="logit")


def test_saliency_grid_takes_any_map_shape_and_checks_it(tmp_path) -> None:
    torch.manual_seed(9)
    x = images(2).float()
    maps = {"gradient": torch.randn(2, C, H, W), "Grad-CAM++": torch.rand(2, 1, H, W)}
    path = tmp_path / "grid.png"
    assert report.saliency_grid(str(path), x, maps) == path
    # One 200-px row per image, one 200-px column for the input and each map.
    assert imread(path).shape[:2] == (2 * 200, 3 * 200)
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"
    # One public name for the grid, in the report layer; the metrics module has no plotting left.
    assert not any(hasattr(al, name) for name in ("plot_saliency_grid", "_plot_saliency_grid", "analyze"))
    with pytest.raises(ValueError, match=r"maps\['bad'\]"):
        report.saliency_grid(path, x, {"bad": torch.rand(3, 1, H, W)})
    with pytest.raises(ValueError, match="x: expected"):
        report.saliency_grid(path, x[0], maps)
