"""The dry run as people read it: text, markdown and the HTML report."""

from __future__ import annotations

from layoutc.lang.check import load_layout
from layoutc.place import place
from layoutc.plan.compile import compile_plan
from layoutc.render import drawings, human_size, render


def _plan():
    src, dst = load_layout("specs/llama2-7b.layout"), load_layout("specs/llama2-7b-tp4.layout")
    return src, dst, compile_plan(src, dst, memory=2 << 30, workers=4)


def test_text_dry_run_states_the_totals_of_the_summary():
    _, _, plan = _plan()
    text = render(plan)
    s = plan.summary()
    assert f"units        {s['units']:,}" in text
    assert f"read         {human_size(s['bytes_read'])} from {s['files_read']:,} files" in text
    assert (
        f"peak memory  {human_size(s['peak_memory_bytes'])} (budget 2.0 GiB) with 4 workers" in text
    )
    assert text.count("\n  ") > 10 and "largest tensors" in text
    assert "0.embed_tokens.weight" in text


def test_markdown_lists_every_op_kind():
    _, _, plan = _plan()
    md = render(plan, "markdown")
    for kind, n in plan.summary()["ops_by_kind"].items():
        assert f"| {kind} ops | {n:,} |" in md


def test_html_report_draws_source_and_target_slices_of_the_largest_tensors():
    src, dst, plan = _plan()
    pictures = drawings(plan, place(src), place(dst))
    html = render(plan, "html", drawings=pictures)
    assert html.startswith("<!doctype html>") and "</html>" in html
    first = pictures[0]
    assert first["tensor"] == plan.largest(1)[0]["tensor"]
    labels = [{r["label"] for r in side["rects"]} for side in first["sides"]]
    assert labels == [{"tp0", "tp1"}, {"tp0", "tp1", "tp2", "tp3"}]
    assert html.count("<rect") > 20


def test_human_sizes_use_binary_units():
    assert human_size(0) == "0 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(2 << 30) == "2.0 GiB"
