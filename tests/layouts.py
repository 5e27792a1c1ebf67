"""Hypothesis strategies for random *valid* training layouts (as text and as Layout)."""

from __future__ import annotations

import re

from hypothesis import strategies as st

from layoutc.ir import Layout
from layoutc.lang.check import load_text


@st.composite
def dims(draw: st.DrawFn, split_axes: list[str], sizes: dict[str, int]) -> list[str]:
    """A shape: 1-3 dims, at most one split per axis."""
    out = []
    free = list(split_axes)
    for _ in range(draw(st.integers(1, 3))):
        kinds = ["plain", "split", "pad", "fused", "grains"]
        kind = draw(st.sampled_from(kinds)) if free else "plain"
        if kind == "plain":
            out.append(str(draw(st.integers(1, 7))))
            continue
        axis = draw(st.sampled_from(free))
        free.remove(axis)
        n = sizes[axis]
        if kind == "split":
            out.append(f"{n * draw(st.integers(1, 4))} / {axis}")
        elif kind == "pad":
            out.append(
                f"pad({draw(st.integers(1, 13))}, {draw(st.integers(1, 3))} * {axis}) / {axis}"
            )
        elif kind == "grains":  # uneven, maybe empty parts (DeepSpeed's AutoTP)
            size = draw(st.integers(1, 13))
            out.append(f"grains({size}, {draw(st.integers(1, size))}) / {axis}")
        else:
            blocks = [
                f"b{k}: {n * draw(st.integers(1, 3))}" for k in range(draw(st.integers(2, 3)))
            ]
            out.append(f"({', '.join(blocks)}) / {axis}")
    return out


@st.composite
def training_layouts(
    draw: st.DrawFn, fmt: str = "deepspeed", pipeline: bool | None = None
) -> Layout:
    """A random layout stored in ``fmt`` that DeepSpeed's rules accept."""
    zero = draw(st.integers(0, 3))
    pp = 1
    use_pp = draw(st.booleans()) if pipeline is None else pipeline
    if use_pp and zero <= 1:
        pp = draw(st.integers(1, 3))
    dp = draw(st.integers(1, 4))
    tp = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(["bf16", "fp32"]))
    sizes = {"dp": dp, "tp": tp}
    piped = zero <= 1 and use_pp  # DeepSpeed pipelines run ZeRO 0 or 1 only
    lines = [f"mesh {{ pp = {pp}, dp = {dp}, tp = {tp} }}", f"dtype {dtype}", "optimizer adam"]
    if piped:
        lines.append("pipeline over pp")
    if zero == 3 and draw(st.booleans()):
        lines.append(f"zero 3 over dp {{ sub_group {draw(st.integers(1, 40))} }}")
    else:
        lines.append(f"zero {zero} over dp")
    n = draw(st.integers(1, 6))
    if piped and pp > 1 and draw(st.booleans()):  # a layer tied across stages, as DeepSpeed's
        stages = sorted(draw(st.sets(st.integers(0, pp - 1), min_size=2)))
        shape = draw(dims(["tp"], sizes))
        lines.append(
            f"tensor tied_modules.t.weight [{', '.join(shape)}] "
            f"stage ({', '.join(map(str, stages))}) layer {n}"
        )
    names = []
    for i in range(n):
        kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "frozen", "buffer"]))
        shape = draw(dims(["tp"], sizes))
        stage = draw(st.integers(0, pp - 1))
        group = draw(st.sampled_from(["", "", "nd"])) if kind == "tensor" else ""
        name = f"{i}.w{i}"
        decl = f"{kind} {name} [{', '.join(shape)}]" + (f" stage {stage}" if piped else "")
        lines.append(f"group {group} {{ {decl} }}" if group else decl)
        names.append((name, kind))
    params = [nm for nm, k in names if k == "tensor"]
    if len(params) >= 1 and draw(st.booleans()):
        lines.append(f"tie {n}.alias = {params[0]}")
    lines.append(f"store {fmt}")
    return load_text("\n".join(lines) + "\n")


def with_format(layout: Layout, fmt: str) -> Layout:
    from dataclasses import replace

    return layout.with_store(replace(layout.store, format=fmt))


@st.composite
def model_bodies(draw: st.DrawFn, m: int) -> str:
    """Tensor declarations valid for any tp dividing ``m`` (stages spread over ``pp``)."""
    n = draw(st.integers(1, 5))
    lines = []
    for i in range(n):
        kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "frozen", "buffer"]))
        shape = []
        split = False
        for _ in range(draw(st.integers(1, 3))):
            choice = (
                draw(st.sampled_from(["plain", "split", "pad", "fused", "grains"]))
                if not split
                else "plain"
            )
            if choice == "plain":
                shape.append(str(draw(st.integers(1, 6))))
            elif choice == "split":
                shape.append(f"{m * draw(st.integers(1, 3))} / tp")
            elif choice == "pad":
                shape.append(f"pad({draw(st.integers(1, 11))}, 2 * tp) / tp")
            elif choice == "grains":
                size = draw(st.integers(1, 11))
                shape.append(f"grains({size}, {draw(st.integers(1, size))}) / tp")
            else:
                blocks = ", ".join(
                    f"b{k}: {m * draw(st.integers(1, 2))}" for k in range(draw(st.integers(2, 3)))
                )
                shape.append(f"({blocks}) / tp")
            split = split or choice != "plain"
        group = draw(st.sampled_from(["", "nd"])) if kind == "tensor" else ""
        decl = f"{kind} {i}.w{i} [{', '.join(shape)}] stage {i} * pp / {n}"
        lines.append(f"group {group} {{ {decl} }}" if group else decl)
    return "\n".join(lines)


@st.composite
def topologies(draw: st.DrawFn, tp: int) -> str:
    zero = draw(st.integers(0, 3))
    pp = draw(st.integers(1, 2)) if zero <= 1 else 1
    piped = zero <= 1 and draw(st.booleans())  # DeepSpeed pipelines run ZeRO 0 or 1 only
    dp = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(["bf16", "fp32"]))
    zero_line = f"zero {zero} over dp" + (
        f" {{ sub_group {draw(st.integers(1, 30))} }}" if zero == 3 else ""
    )
    pipeline = "pipeline over pp\n" if piped else ""
    return f"mesh {{ pp = {pp}, dp = {dp}, tp = {tp} }}\n{pipeline}dtype {dtype}\noptimizer adam\n{zero_line}\n"


@st.composite
def layout_pairs(draw: st.DrawFn) -> tuple[Layout, Layout]:
    """Two DeepSpeed layouts of one model at different topologies (same dtype)."""
    import math

    tp_a, tp_b = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    body = draw(model_bodies(math.lcm(tp_a, tp_b)))
    a = draw(topologies(tp_a))
    b = draw(topologies(tp_b))
    dtype = "bf16" if "bf16" in a else "fp32"
    b = b.replace("dtype bf16", f"dtype {dtype}").replace("dtype fp32", f"dtype {dtype}")

    def text(top: str) -> str:
        decls = body if "pipeline over pp" in top else re.sub(r" stage [^\n}]*", "", body)
        return top + decls + "\nstore deepspeed\n"

    return load_text(text(a)), load_text(text(b))


@st.composite
def moe_layouts(draw: st.DrawFn, fmt: str = "deepspeed") -> Layout:
    """A random mixture-of-experts layout at ZeRO 0 to 3: dense tensors partitioned over
    every data-parallel rank, one or two MoE layers whose experts are dealt over ``ep``
    (native MoE at ZeRO 0 to 2, maybe split over ``tp`` too) or stacked split over ``ep``
    (AutoEP, at ZeRO 1 to 3), partitioned over ``edp``."""
    edp, ep, tp = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 2))
    sizes = {"tp": tp}
    zero = draw(st.integers(0, 3))  # native experts at 0, 1, 2; AutoEP's at 1, 2, 3
    lines = [
        f"let dp = {edp * ep}",
        f"mesh {{ edp = dp / ep, ep = {ep}, tp = {tp} }}",
        # bf16 without ZeRO is DeepSpeed's bf16 optimizer, which native MoE is not placed with
        f"dtype {draw(st.sampled_from(['bf16', 'fp32'])) if zero else 'fp32'}",
        "optimizer adam",
        f"zero {zero} over (edp, ep)",
    ]
    for i in range(draw(st.integers(1, 3))):
        lines.append(f"tensor d{i}.w [{', '.join(draw(dims(['tp'], sizes)))}]")
    fused = zero == 3 or (zero > 0 and draw(st.booleans()))  # AutoEP's, stacked: [E / ep, ...]
    legacy = draw(st.booleans())  # native experts in DeepSpeed's older expert_<id> files
    for layer in range(draw(st.integers(1, 2))):
        count = ep * draw(st.integers(1, 3))
        group = draw(st.sampled_from(["experts", f"experts{layer}"]))
        if fused:
            body = [
                f"tensor m{layer}.experts.w{k} [{count} / ep, {draw(st.integers(1, 4))}, "
                f"{draw(st.integers(1, 4))}] layer {layer}"
                for k in range(draw(st.integers(1, 3)))
            ]
            lines.append(f"group {group} {{ {' '.join(body)} }}")
            continue
        body = [
            f"tensor m{layer}.experts.{{e}}.w{k} [{', '.join(draw(dims(['tp'], sizes)))}]"
            + ("" if legacy else f" layer {layer}")
            for k in range(draw(st.integers(1, 2)))
        ]
        lines.append(f"group {group} {{ for e in 0..{count} over ep {{ {' '.join(body)} }} }}")
    if draw(st.booleans()):
        lines.append("frozen f.w [3]")
    lines.append(f"store {fmt}")
    return load_text("\n".join(lines) + "\n")
