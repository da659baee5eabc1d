"""``fastsat demo --quick`` writes a report with every recipe; its findings are verdicts decided from the numbers."""

import math
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
    for column in ("cost vs standard", "clean acc", "PGD 2/255", "PGD 4/255", "PGD 8/255", "median α", "median ρ", "Spearman(α, ρ)"):
        assert column in table[0]
    # Every image the Markdown links exists; the HTML embeds them (self-contained).
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(images) == 1 + 2 * len(DEMO_RECIPES)
    assert all((out / path).is_file() for path in images)
    assert page.count("data:image/png;base64,") == len(images) and "src=\"" not in page.replace('src="data:', "")
    # The standard row's cost is 1 by definition; the numbers are measured, not canned.
    standard = next(line for line in table if line.startswith("| standard |")).split("|")
    assert standard[4].strip() == "1.000"


# --- the findings are decided from the numbers, then rendered -------------------------------------

def test_compare_decides_from_the_difference_and_its_standard_error():
    # n = 100, reference 0.5: SE of the difference = sqrt((a(1 − a) + 0.25) / 100); the edge of
    # "beyond two SE" lies between 0.63 (Δ 0.13 ≤ 2 SE 0.139) and 0.64 (Δ 0.14 > 2 SE 0.1386).
    for value, verdict in ((0.5, "equal"), (0.63, "indistinguishable"), (0.37, "indistinguishable"),
                           (0.64, "higher"), (0.36, "lower")):
        c = demo.compare(value, 0.5, 100)
        se = math.sqrt((value * (1 - value) + 0.25) / 100)
        assert c.verdict == verdict, f"{value} vs 0.5: {c}"
        assert c.difference == pytest.approx(value - 0.5) and c.standard_error == pytest.approx(se)
    assert demo.compare(1.0, 0.0, 1).verdict == "higher", "both SEs are 0: any difference counts"
    with pytest.raises(ValueError, match="value"):
        demo.compare(1.5, 0.5, 100)
    with pytest.raises(ValueError, match="n"):
        demo.compare(0.5, 0.5, 0)


def run(recipe: str, clean: float, pgd8: float) -> dict:
    return {"recipe": recipe, "clean": clean, "pgd": {e: pgd8 for e in demo.EVAL_EPS}}


def test_findings_are_verdicts_from_numbers_and_the_prose_follows_them():
    results = {
        "standard": run("standard", 0.90, 0.10),
        "sat-boxes": run("sat", 0.88, 0.30),   # +20 points, 2 SE ≈ 7.7 → higher
        "sat-masks": run("sat", 0.70, 0.12),   # +2 points, 2 SE ≈ 6.2 → indistinguishable
        "pgd": run("pgd", 0.70, 0.40),
    }
    found = demo.findings(results, 200)
    verdicts = {(f.run, f.reference, f.metric): f.comparison.verdict for f in found}
    assert verdicts == {
        ("sat-boxes", "standard", "pgd"): "higher", ("sat-boxes", "standard", "clean"): "indistinguishable",
        ("sat-masks", "standard", "pgd"): "indistinguishable", ("sat-masks", "standard", "clean"): "lower",
        ("pgd", "standard", "pgd"): "higher", ("pgd", "standard", "clean"): "lower",
        ("standard", "pgd", "pgd"): "lower", ("standard", "pgd", "clean"): "higher",
        ("sat-boxes", "pgd", "pgd"): "lower", ("sat-boxes", "pgd", "clean"): "higher",
        ("sat-masks", "pgd", "pgd"): "lower", ("sat-masks", "pgd", "clean"): "equal",
    }
    for f in found:  # each verdict is what compare() says of the two numbers
        r, ref = results[f.run], results[f.reference]
        key = "clean" if f.metric == "clean" else "pgd"
        a = r[key] if key == "clean" else r[key][max(demo.EVAL_EPS)]
        b = ref[key] if key == "clean" else ref[key][max(demo.EVAL_EPS)]
        assert f.comparison == demo.compare(a, b, 200)
    assert demo.sat_verdicts(results, found) == {"sat-boxes": "higher", "sat-masks": "indistinguishable"}
    lines = demo._findings(results, 200)
    assert "- SAT alone raised PGD-8/255 accuracy over standard training beyond noise here: sat-boxes." in lines
    assert "- SAT alone did not raise PGD-8/255 accuracy over standard training beyond noise here: sat-masks." in lines
    assert any(line.startswith("- sat-boxes vs standard: PGD-8/255 accuracy 0.300 is 20.0 points higher than 0.100")
               for line in lines)


def test_the_sat_verdict_follows_the_numbers_not_the_wording():
    # With more test images the same +2 points become significant: the verdict changes with n alone.
    results = {"standard": run("standard", 0.90, 0.10), "sat-masks": run("sat", 0.90, 0.12)}
    assert demo.sat_verdicts(results, demo.findings(results, 200)) == {"sat-masks": "indistinguishable"}
    assert demo.sat_verdicts(results, demo.findings(results, 20000)) == {"sat-masks": "higher"}


def test_the_noise_only_control_is_compared_with_the_sat_runs_only():
    results = {
        "standard": run("standard", 0.90, 0.10),
        demo.CONTROL: {**run("sat", 0.88, 0.25), "control": True},
        "sat-boxes": run("sat", 0.88, 0.40),   # +15 points over the control, 2 SE ≈ 9.1 → higher
        "sat-masks": run("sat", 0.88, 0.27),   # +2 points → indistinguishable
        "pgd": run("pgd", 0.70, 0.45),
    }
    found = demo.findings(results, 200)
    against_control = {(f.run, f.metric): f.comparison.verdict for f in found if f.reference == demo.CONTROL}
    assert set(against_control) == {(r, m) for r in ("sat-boxes", "sat-masks") for m in ("pgd", "clean")}
    assert demo.sat_verdicts(results, found, demo.CONTROL) == {"sat-boxes": "higher", "sat-masks": "indistinguishable"}
    # The control is not itself a "SAT alone" run.
    assert set(demo.sat_verdicts(results, found)) == {"sat-boxes", "sat-masks"}
    lines = demo._findings(results, 200)
    assert any(line.startswith("- The map mattered") and line.endswith(": sat-boxes.") for line in lines)
    assert any(line.startswith("- The map did not matter") and line.endswith(": sat-masks.") for line in lines)


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
