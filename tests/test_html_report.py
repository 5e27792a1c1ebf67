"""The HTML report, rendered by a real browser (headless Chromium, tests/browser.py): the
page raises no error, the ZeRO partitions are drawn rank by rank at both ends over the
page's width, the largest tensors are the text summary's, the per-worker timeline is
labelled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from browser import open_page

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "deepspeed-zero2"
WIDTH = 1400


def _report(tmp: Path, *argv: str | Path) -> tuple[Path, dict]:
    html = tmp / "plan.html"
    run = [sys.executable, "-m", "layoutc", "plan", *map(str, argv)]
    subprocess.run([*run, "--html", str(html)], check=True, capture_output=True)
    summary = json.loads(subprocess.run([*run, "--json"], check=True, capture_output=True).stdout)
    return html, summary["summary"]


PAGE = """(() => {
  const wide = [...document.querySelectorAll('svg.wide')].map(s => s.getBoundingClientRect().width);
  const sides = [...document.querySelectorAll('.partitions')].map(d => ({
    side: d.querySelector('h3').textContent,
    groups: [...d.querySelectorAll('svg')].map(svg => ({
      rows: [...svg.querySelectorAll('text.rank')].map(t => t.lastChild.textContent.trim()),
      labels: [...svg.querySelectorAll('rect > title')].map(t => t.textContent.split('[')[0]),
      drawn: [...svg.querySelectorAll('rect')].filter(r => r.getBoundingClientRect().width > 0).length,
    })),
  }));
  const largest = [...document.querySelectorAll('.largest > div > b')].map(b => b.textContent);
  const workers = [...document.querySelectorAll('#timeline ~ svg text')].map(t => t.textContent);
  return {wide, sides, largest, workers, page: document.documentElement.clientWidth};
})()"""


def test_a_deepspeed_reshard_draws_each_ranks_partition_before_and_after(tmp_path: Path) -> None:
    html, summary = _report(tmp_path, EXAMPLE, "--to", "deepspeed", "--set", "dp=3")
    with open_page(html, width=WIDTH) as page:
        seen = page.evaluate(PAGE)
        assert page.errors == []
    source, target = seen["sides"]
    assert source["side"].startswith("source") and target["side"].startswith("target")
    for side, ranks in ((source, 2), (target, 3)):
        assert len(side["groups"]) == 2  # the example's two param groups
        for g in side["groups"]:
            assert g["rows"] == [f"rank {r}" for r in range(ranks)]
            assert g["drawn"] > ranks  # a frame per rank and its tensors' segments
    tensors = {t for side in (source, target) for g in side["groups"] for t in g["labels"]}
    assert {"embed.weight", "fc1.weight", "fc2.weight", "norm.weight"} <= tensors
    assert min(seen["wide"]) > 0.9 * (seen["page"] - 64)  # the page's width, margins aside
    assert seen["largest"] == [t["tensor"] for t in summary["largest"]]  # as the text
    assert "worker 0" in seen["workers"] and "worker 1" in seen["workers"]


def test_a_tensor_parallel_reshard_draws_its_slices(tmp_path: Path) -> None:
    specs = ROOT / "specs"
    html, summary = _report(
        tmp_path, specs / "llama2-7b.layout", "--to", specs / "llama2-7b-tp4.layout"
    )
    with open_page(html, width=WIDTH) as page:
        slices = page.evaluate(
            "[...document.querySelectorAll('.largest figure')].map(f => ["
            "f.querySelector('figcaption').textContent,"
            "f.querySelectorAll('rect').length])"
        )
        assert page.errors == []
    assert slices and all(rects > 1 for _, rects in slices)
    assert any("4 slices" in caption for caption, _ in slices)
    assert len(slices) == 2 * len(summary["largest"])  # a source and a target map each


def test_the_browser_reports_an_error_the_page_raises(tmp_path: Path) -> None:
    page_file = tmp_path / "bad.html"
    page_file.write_text("<!doctype html><script>undefinedCall()</script><p>x</p>")
    with open_page(page_file) as page:
        assert page.evaluate("document.querySelector('p').textContent") == "x"
        assert any("undefinedCall" in e or "exception" in e for e in page.errors), page.errors
