"""``fastsat demo --quick`` writes a report with every recipe."""

import re

from fastsat import cli
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
