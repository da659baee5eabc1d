"""``fastsat demo --quick`` writes a report with every recipe; its findings are verdicts decided from the numbers."""

import re

import pytest

from fastsat import cli, demo
from fastsat.demo import DEMO_RECIPES


def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out-dir", str(out), "--device", "cpu"]) == 0
    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(DEMO_RECIPES), "header + one row per recipe"
    for name in DEMO_RECIPES:
        assert any(line.startswith(f"| {name} |") for line in table), f"{name} missing from the table"
        assert f"<td>{name}</td>" in page
    for column in ("cost vs standard", "train s", "clean acc", "PGD 2/255", "PGD 4/255", "PGD 8/255", "median α", "median ρ", "Spearman(α, ρ)"):
        assert column in table[0]
    # Every image the Markdown links exists; the HTML embeds them (self-contained).
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(images) == 1 + 2 * len(DEMO_RECIPES)
    assert all((out / path).is_file() for path in images)
    assert page.count("data:image/png;base64,") == len(images) and "src=\"" not in page.replace('src="data:', "")
    # The standard row's cost is 1 by definition; the numbers are measured, not canned.
    standard = next(line for line in table if line.startswith("| standard |")).split("|")
    assert standard[4].strip() == "1.000"
    assert "robust AUC" in table[0] and "Holm's correction" in markdown


# --- the findings are decided from the numbers, then rendered -------------------------------------

def _runs(auc_by_name: dict[str, list[float]], clean: float = 0.9) -> dict[str, list[dict]]:
    return {name: [{"recipe": demo.DEMO_RECIPES[name][0], "auc": a, "clean": clean} for a in values]
            for name, values in auc_by_name.items()}


def test_the_comparisons_are_every_run_against_standard_sat_against_the_control_and_sat_pgd_against_pgd():
    pairs = [(run, ref) for _, _, run, ref in demo.comparisons(list(DEMO_RECIPES))]
    assert pairs == [(name, "standard") for name in DEMO_RECIPES if name != "standard"] + [
        ("sat-boxes", demo.CONTROL), ("sat-masks", demo.CONTROL), ("sat+pgd", "pgd")]
    assert demo.comparisons(["standard"]) == []
    assert [(r, ref) for _, _, r, ref in demo.comparisons(["pgd", "sat+pgd"])] == [("sat+pgd", "pgd")]


def test_findings_are_paired_verdicts_over_seeds_with_holm_and_the_prose_follows_them():
    base = [0.50, 0.52, 0.49]
    runs = _runs({
        "standard": base,
        "sat-boxes": [b + d for b, d in zip(base, (0.10, 0.11, 0.09))],   # a clear gain: higher
        "sat-masks": [b + d for b, d in zip(base, (0.001, -0.001, 0.0))],  # a tight null: within the margin
        "pgd": [b + d for b, d in zip(base, (0.20, -0.15, 0.05))],        # wide: not distinguishable
    })
    lines = demo._findings(runs)
    assert "Holm's correction runs over the 3 comparisons" in lines[0]
    said = {line.split(":")[0][2:]: line for line in lines if line.startswith("- ")}
    assert said["sat-boxes vs standard"].startswith("- sat-boxes vs standard: robust AUC higher (Δ = +0.100")
    assert "robust AUC not higher (the interval lies below +0.02)" in said["sat-masks vs standard"]
    assert "robust AUC not distinguishable" in said["pgd vs standard"]
    assert all("clean accuracy the same difference in every seed: not weighed" in line for line in said.values())


def test_the_cost_is_the_cpu_time_ratio_to_standard_in_the_same_seed():
    runs = {"standard": [{"train_cpu_s": 10.0}, {"train_cpu_s": 20.0}],
            "pgd": [{"train_cpu_s": 40.0}, {"train_cpu_s": 100.0}]}
    assert demo.cost_vs_standard(runs) == {"standard": 1.0, "pgd": pytest.approx(4.5)}  # mean of 4 and 5
    assert demo.cost_vs_standard({"pgd": runs["pgd"]}) == {}


def test_the_curriculum_is_compressed_to_the_run_and_pgd_warms_up():
    for epochs in (5, 10, 37):
        a = demo.compressed_curriculum(epochs)
        # After `epochs` epochs the compressed schedule is where the authors' is after 100.
        assert a ** (epochs / 10) == pytest.approx(0.6 ** 10)
    assert demo._options("sat", {"maps": "boxes"}, 10)["a"] == pytest.approx(0.6 ** 10)
    assert demo._options("sat", DEMO_RECIPES[demo.CONTROL][1], 10)["a"] == 1.0  # the control keeps its a = 1
    assert demo._options("pgd", {"steps": 5}, 10) == {"steps": 5, "eps_warmup": 3}
    assert demo._options("sat+pgd", {}, 9)["eps_warmup"] == 3
    assert "eps_warmup" not in demo._options("standard", {}, 10)
    with pytest.raises(ValueError, match="epochs"):
        demo.compressed_curriculum(0)


def test_a_bad_device_name_is_refused_with_its_argument_named(tmp_path):
    with pytest.raises(ValueError, match="device: .*gpu7"):
        demo.run_demo(out_dir=tmp_path, device="gpu7")
    assert not any(tmp_path.iterdir())  # refused before any work
