"""The ``layoutc`` command line.

Exit codes (one per kind of failure of :mod:`layoutc.errors`, mapped in :data:`FAILURES`):
0 success, 1 the input is wrong or unsupported (the message on stderr), 2 usage error (bad
flags, missing files), 3 a bug in layoutc (with a line asking to report it). An exception
layoutc does not raise on purpose (``ValueError``, ``KeyError``, ...) is a bug too: exit 3,
its traceback printed, never reported as a usage error. Every subcommand prints what it
did; nothing runs pickled code or touches a checkpoint unless asked to.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from layoutc import __version__, ir
from layoutc.errors import (
    InputError,
    InternalError,
    LayoutcError,
    LayoutError,
    Unsupported,
    UsageError,
    kind,
)
from layoutc.formats.dcp import DcpCheckpoint, carried, is_dcp
from layoutc.formats.dcp import infer_text as dcp_infer_text
from layoutc.formats.deepspeed import (
    DeepSpeedCheckpoint,
    infer,
    infer_hf,
    is_deepspeed,
    open_checkpoint,
)
from layoutc.formats.sources import SOURCES, open_source
from layoutc.formats.weights import Weights, is_weights, open_weights
from layoutc.formats.weights import infer_text as infer_weights
from layoutc.lang.check import load_text
from layoutc.lang.fmt import fmt
from layoutc.lang.parse import parse, read_source, size_value
from layoutc.place import Placement, place
from layoutc.plan.compile import compile_plan
from layoutc.plan.layouts import target_for
from layoutc.plan.plan import Plan
from layoutc.plan.request import (
    default_param_groups,
    plan_checkpoint,
    source_placement,
    workers_for,
)
from layoutc.plan.request import default_workers as default_workers  # the CLI's default
from layoutc.runtime import distributed
from layoutc.units import human_size

EXIT_OK, EXIT_USER, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a command SIGINT stopped
EXIT_TERMINATED = 143  # SIGTERM, likewise
MIN_MEMORY = 1 << 20  # smallest --memory the command line accepts
SHOWN_DIAGNOSTICS = 20  # a failed command shows this many, then "... and N more"

# Each kind of failure: its exit code and what the message starts with (after the command).
FAILURES: dict[type[LayoutcError], tuple[int, str]] = {
    InputError: (EXIT_USER, ""),
    Unsupported: (EXIT_USER, "unsupported: "),
    UsageError: (EXIT_USAGE, ""),
    InternalError: (EXIT_BUG, "internal error: "),
}
REPORT = "this is a bug in layoutc; please report it with the command and the inputs it ran on"


_UNIT = re.compile(r"(?P<num>[0-9.]+)\s*(?P<unit>[kmgt])(?P<rest>i?b?)", re.IGNORECASE)


def _bytes(text: str) -> int:
    """``2GiB``, ``512MiB``, ``1e9``, ``1.5GB`` or a plain number of bytes; the unit in any
    case, and a bare ``2G`` / ``512m`` binary (GiB, MiB) as ``dd`` and ``du`` read it."""

    t = text.strip().replace("_", "")
    m = _UNIT.fullmatch(t)
    if m:
        decimal = m["rest"].lower() == "b"
        t = m["num"] + m["unit"].upper() + ("B" if decimal else "iB")
    try:
        return int(t) if t.isdigit() else size_value(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (use bytes or a unit: 512MiB, 2GiB, 2G, 1e9, 5GB)"
        ) from None


DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
}  # torch's names


def _dtype(text: str) -> str:
    """``--dtype``: layoutc's name, or torch's (``bfloat16``) for it."""
    return DTYPE_ALIASES.get(text.lower(), text.lower())


def parse_size(text: str) -> int:
    """A memory budget: a size of at least 1 MiB."""
    value = _bytes(text)
    if value < MIN_MEMORY:
        raise argparse.ArgumentTypeError(
            f"{text} is below 1MiB: a budget that small would cut tensors into millions of chunks"
        )
    return value


def _shard_size(text: str) -> int:
    value = _bytes(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a shard size must be positive")
    return value


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _workers_option(p: argparse.ArgumentParser, writers: bool = False) -> None:
    """``--workers``; with ``writers``, its default is the layout's ``store { writers N }``
    (see :func:`~layoutc.plan.request.workers_for`)."""
    n = default_workers()
    p.add_argument(
        "--workers",
        type=_positive,
        default=None if writers else n,
        metavar="N",
        help="workers (threads) to balance the plan over (default: "
        + ("the target layout's `store { writers N }`, else " if writers else "")
        + f"one per CPU, here {n})",
    )


def _read(path: str) -> str:
    """A file's text: UTF-8 and of bounded size, else a diagnostic (E010, E012)."""

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    return read_source(p)


def _load(path: str) -> tuple[ir.Layout, Placement]:
    """A layout and its shard map: of a ``.layout`` file, or inferred from a checkpoint
    folder and checked against its files."""
    if Path(path).is_dir():
        return source_placement(open_checkpoint(path))
    layout = load_text(_read(path), path)
    return layout, place(layout)


def _setting(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    if not eq or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be an integer") from None


def _set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a mesh axis size or let constant of the target layout, e.g. --set dp=3 "
        "(repeatable; with a format as --to, the target is the source layout with these)",
    )


def cmd_check(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            layout, p = _load(path)
        except LayoutError as e:
            print(e.render(), file=sys.stderr)
            n = len(e.diagnostics)
            print(f"{path}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
            failed = True
            continue
        except Unsupported as e:
            print(f"unsupported: {e}", file=sys.stderr)
            failed = True
            continue
        params = sum(t.numel for t in p.tensors if t.trainable)
        mesh = ", ".join(f"{a.name} = {a.size}" for a in layout.mesh.axes)
        print(
            f"{path}: ok — layout {layout.name}, mesh {{ {mesh} }} ({layout.mesh.world:,} ranks), "
            f"{len(layout.tensors)} tensors, {params:,} trainable parameters, "
            f"zero {layout.zero.stage}, store {layout.store.format} ({p.file_count():,} files)"
        )
    return EXIT_USER if failed else EXIT_OK


def cmd_fmt(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.files:
        text = _read(path)
        try:
            out = fmt(parse(text, path))
        except LayoutError as e:
            print(e.render(), file=sys.stderr)
            status = EXIT_USER
            continue
        if args.check:
            if out != text:
                diff = difflib.unified_diff(
                    text.splitlines(keepends=True),
                    out.splitlines(keepends=True),
                    path,
                    f"{path} (formatted)",
                )
                sys.stderr.writelines(diff)
                print(f"{path}: not formatted", file=sys.stderr)
                status = EXIT_USER
        elif args.write:
            if out != text:
                Path(path).write_text(out, encoding="utf-8")
                print(f"{path}: formatted")
        else:
            sys.stdout.write(out)
    return status


def _check_target(to: str) -> None:
    """``--to``: a format, or a file that exists (else the closest format as a hint)."""
    if to not in ir.FORMATS and not Path(to).is_file():
        guess = difflib.get_close_matches(to, ir.FORMATS, n=1, cutoff=0.6)
        hint = f"did you mean `{guess[0]}`? " if guess else ""
        raise UsageError(
            f"--to {to}: no such file and not a format; {hint}formats: {', '.join(ir.FORMATS)}"
        )


def _plan(args: argparse.Namespace) -> Plan:
    """The plan ``layoutc plan`` shows: of a checkpoint as ``convert`` would make it (its
    layout checked against the files; the plan records both layouts and the files, so
    ``-o`` saves a plan ``layoutc execute`` runs), or of a ``.layout`` file."""

    options = {
        "overrides": dict(args.overrides),
        "dtype": args.dtype,
        "max_shard_size": args.max_shard_size,
        "zero": args.zero,
    }
    groups = _param_groups(args.param_groups)
    if any(test(Path(args.source)) for _, test, _ in SOURCES):
        handle = open_source(args.source, args.tag)
        try:
            plan = plan_checkpoint(
                handle,
                args.to,
                spec=args.spec,
                memory=args.memory,
                workers=args.workers,
                ranks=args.ranks,
                **options,
            )
            plan, groups = default_param_groups(plan, handle, groups)
            if args.param_groups:  # the writers take them, as convert's would
                from layoutc.conversion import check_writers  # lazy: the writers load numpy

                check_writers(plan, handle, groups)
            return plan
        finally:
            handle.close()
    if args.spec or args.tag or args.param_groups:
        raise UsageError(
            f"{args.source}: --spec, --tag and --param-groups apply to a checkpoint, not a .layout"
        )
    text = (_read(args.source), args.source)
    source = load_text(*text)
    target = target_for(
        source,
        text,
        args.to,
        options["overrides"],
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        zero=args.zero,
    )
    workers = workers_for(target, args.workers)
    return compile_plan(source, target, memory=args.memory, workers=workers, ranks=args.ranks)


def _rendered(plan: Plan, fmt: str) -> str:
    """The plan as ``text``, ``markdown`` or ``html`` (the whole report)."""
    from layoutc import render  # lazy: render loads jinja2

    return render.html_report(plan) if fmt == "html" else render.render(plan, fmt)


def cmd_plan(args: argparse.Namespace) -> int:
    if args.ops and not args.json:
        raise UsageError("--ops adds every op to the JSON output; use it with --json")
    _check_target(args.to)
    plan = _plan(args)
    if args.validate:
        plan.validate(plan.source_placement, plan.target_placement)
    if args.json:
        doc = {"summary": plan.summary()}
        if args.ops:
            doc["plan"] = plan.to_dict()
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        sys.stdout.write(_rendered(plan, "markdown" if args.markdown else "text"))
    if args.html:
        Path(args.html).write_text(_rendered(plan, "html"), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(plan.to_json(indent=1), encoding="utf-8")
        print(f"wrote the plan to {args.output}", file=sys.stderr)
    return EXIT_OK


def _open(args: argparse.Namespace) -> DeepSpeedCheckpoint | DcpCheckpoint | Weights:
    """The checkpoint ``infer`` and ``inspect`` read: a distributed checkpoint (DCP) or,
    by default, DeepSpeed's (whose errors name what a DeepSpeed folder lacks). A path that
    does not exist is a usage error, as for every command."""
    if not Path(args.checkpoint).exists():
        raise UsageError(f"{args.checkpoint}: no such file or folder")
    if is_dcp(args.checkpoint):
        if args.tag:
            raise UsageError(f"{args.checkpoint}: --tag applies to DeepSpeed checkpoints, not DCP")
        return DcpCheckpoint(Path(args.checkpoint))
    if is_weights(args.checkpoint) and not is_deepspeed(Path(args.checkpoint)):
        if args.tag:
            raise UsageError(f"{args.checkpoint}: --tag applies to DeepSpeed checkpoints")
        return open_weights(args.checkpoint)
    return open_checkpoint(args.checkpoint, args.tag)


def cmd_infer(args: argparse.Namespace) -> int:
    ckpt = _open(args)
    if isinstance(ckpt, DcpCheckpoint):
        if args.hf:
            raise UsageError(
                f"{args.checkpoint}: --hf names a DeepSpeed MoE checkpoint's tensors as Hugging "
                "Face's; a distributed checkpoint already holds the model's own names"
            )
        text = fmt(parse(dcp_infer_text(ckpt), f"{ckpt.folder}.layout"))
    elif isinstance(ckpt, Weights):
        if args.hf:
            raise UsageError(f"{args.checkpoint}: --hf is for a DeepSpeed AutoEP checkpoint")
        text = infer_weights(ckpt)
    else:
        text = infer_hf(ckpt) if args.hf else infer(ckpt)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


class _Progress:
    """One line on stderr: bytes done, rate, ETA (redrawn in place on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and done < total):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate else 0.0
        width = 30
        filled = int(width * done / max(total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {100 * done / max(total, 1):5.1f}% "
            f"{human_size(done)}/{human_size(total)}  {human_size(rate)}/s  ETA {eta:4.1f}s"
        )
        end = "\n" if done >= total or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def _param_groups(path: str | None) -> list[dict[str, object]] | None:
    if path is None:
        return None

    try:
        groups = json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise UsageError(f"--param-groups {path}: not JSON: {e}") from None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise UsageError(f"--param-groups {path}: expected a JSON list of objects, one per group")
    return groups


def _run(body: Callable[[argparse.Namespace, bool], int], args: argparse.Namespace) -> int:
    """``body(args, lead)``, under torchrun in one process group for the run; ``lead``:
    this process speaks for the run (rank 0, or the only process)."""

    made = distributed.init_from_env()
    try:
        group = distributed.current()
        return body(args, group is None or group.rank == 0)
    finally:
        distributed.finish(made)


def cmd_convert(args: argparse.Namespace) -> int:
    return _run(_convert, args)


def _convert(args: argparse.Namespace, lead: bool) -> int:
    from layoutc.conversion import convert  # lazy: the conversion loads numpy

    _check_target(args.to)
    if args.dry_run:
        args.quiet = True  # the plan is the output; no progress
    report = convert(
        args.checkpoint,
        args.output,
        args.to,
        spec=args.spec,
        tag=args.tag,
        memory_budget=args.memory,
        workers=args.workers,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        zero=args.zero,
        progress=_Progress(not args.quiet and lead),
        on_plan=_show_plan if lead and not args.quiet else None,
        overrides=dict(args.overrides),
        param_groups=_param_groups(args.param_groups),
        sha256=args.sha256,
        dry_run=args.dry_run,
        restart=args.restart,
        tell=_tell if lead else None,
    )
    if args.dry_run:
        if lead:
            sys.stdout.write(_rendered(report.plan, "text"))
            sys.stdout.flush()  # the plan, then what follows it on stderr
            for w in report.warnings:
                print(f"warning: {w}", file=sys.stderr)
            print(
                f"dry run: every check passed and nothing was written; without --dry-run "
                f"this command writes {args.output}",
                file=sys.stderr,
            )
        return EXIT_OK
    return _reported(report, lead)


def _tell(line: str) -> None:
    """What a run does with what earlier runs left, on stderr."""
    print(f"note: {line}", file=sys.stderr, flush=True)


def _show_plan(plan: Plan) -> None:
    """The plan's summary on stderr, before it runs."""
    text = _rendered(plan, "text")
    print(text.split("\nper worker")[0].rstrip() + "\n", file=sys.stderr)


def _reported(report: Any, lead: bool) -> int:
    """A run's warnings and summary (rank 0 speaks for a run under torchrun)."""
    if lead:
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(report.summary())
    return EXIT_OK


def cmd_execute(args: argparse.Namespace) -> int:
    return _run(_execute, args)


def _execute(args: argparse.Namespace, lead: bool) -> int:
    from layoutc.conversion import execute_saved  # lazy: the conversion loads numpy

    plan = Plan.from_json(_read(args.plan), args.plan)
    report = execute_saved(
        plan,
        args.checkpoint,
        args.output,
        progress=_Progress(not args.quiet and lead),
        on_plan=_show_plan if lead and not args.quiet else None,
        param_groups=_param_groups(args.param_groups),
        sha256=args.sha256,
        restart=args.restart,
        tell=_tell if lead else None,
    )
    return _reported(report, lead)


def cmd_verify(args: argparse.Namespace) -> int:
    from layoutc.conversion import MANIFEST, verify  # lazy: the conversion loads numpy

    out = Path(args.output)
    if not out.is_dir():
        raise UsageError(f"{out}: no such folder")
    if not os.path.lexists(out / MANIFEST):
        raise UsageError(f"{out}: no {MANIFEST} (not written by layoutc convert)")
    bad = verify(out, strong=args.strong)
    for line in bad:
        print(f"{out}/{line}", file=sys.stderr)
    if bad:
        print(f"{out}: {len(bad)} problem(s) against the manifest", file=sys.stderr)
        return EXIT_USER
    sums = "CRC-32 and SHA-256" if args.strong else "size and CRC-32"
    print(f"{out}: every file matches the manifest (the exact file set, markers, {sums})")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    ckpt = _open(args)
    layout, p = source_placement(ckpt)
    mesh = ", ".join(f"{a.name} = {a.size}" for a in layout.mesh.axes)
    params = sum(t.numel for t in p.tensors if t.trainable)
    kinds = {
        k: sum(1 for t in layout.tensors if t.kind == k) for k in ("param", "frozen", "buffer")
    }
    if isinstance(ckpt, Weights):  # what a layout would add is not theirs: `infer` shows it
        print(f"{ckpt.folder}: full weights ({ckpt.format}), no optimizer state")
        print(f"  dtype {layout.dtype}; `layoutc infer {args.checkpoint}` writes a starting layout")
        print(f"  {kinds['param']} tensors ({params:,} elements), {len(layout.ties)} ties")
    else:
        if isinstance(ckpt, DcpCheckpoint):
            print(f"{ckpt.folder}: PyTorch distributed checkpoint (DCP {ckpt.metadata.version})")
        else:
            print(f"{ckpt.folder}: deepspeed checkpoint, tag {ckpt.tag}")
        print(
            f"  mesh {{ {mesh} }}, zero {layout.zero.stage}{' (bf16 optimizer)' if layout.zero.bf16_optimizer else ''}, dtype {layout.dtype}"
        )
        print(
            f"  {kinds['param']} parameters ({params:,} elements), {kinds['frozen']} frozen, {kinds['buffer']} buffers, {len(layout.ties)} ties"
        )
    per_file: dict[str, int] = dict.fromkeys(p.files(), 0)  # metadata-only files too
    for b in p.buffers():
        per_file[b.file] = per_file.get(b.file, 0) + b.nbytes
    disk = {f: (ckpt.folder / f).stat().st_size for f in per_file}
    print(f"  {'file':<56}{'tensor bytes':>14}{'on disk':>12}")
    for f in sorted(per_file):
        print(f"  {f:<56}{human_size(per_file[f]):>14}{human_size(disk[f]):>12}")
    total = human_size(sum(per_file.values()))
    print(f"  {'':<56}{total:>14}{human_size(sum(disk.values())):>12}")
    for line in _expert_lines(layout):
        print(f"  {line}")
    if isinstance(ckpt, DcpCheckpoint):
        for line in _dcp_lines(ckpt, p):
            print(f"  {line}")
    return EXIT_OK


def _dcp_lines(ckpt: DcpCheckpoint, p: Placement) -> list[str]:
    """What a distributed checkpoint holds besides the layout's tensors."""
    keys = ckpt.keys
    tensors, items = carried(p, ckpt)
    out = [f'keys: model "{keys.model_prefix}", optimizer "{keys.optimizer_prefix}"']
    for what, names in (("tensors", tensors), ("byte items (non-tensor state)", items)):
        if names:
            shown = ", ".join(names[:6]) + (
                f", ... ({len(names)} in all)" if len(names) > 6 else ""
            )
            out.append(f"{len(names)} other {what}, carried as saved to a dcp output: {shown}")
    return out


def _expert_lines(layout: ir.Layout) -> list[str]:
    """The mixture-of-experts layout: each MoE layer's experts, and which ranks hold which."""
    layers: dict[tuple[int | None, str], list[ir.Tensor]] = {}
    axis, count = "", 0
    for t in layout.tensors:
        dealt = layout.experts_of(t)
        if dealt is None:
            continue
        axis, count = dealt
        # native: one tensor per expert, <module>.<id>.<name>; AutoEP: <module>.w1 fused
        module = t.name.split(f".{t.expert.id}.", 1)[0] if t.expert else t.name.rsplit(".", 1)[0]
        layers.setdefault((t.layer, module), []).append(t)
    if not layers:
        return []
    size = layout.mesh.sizes[axis]
    out = [
        f"experts: {len(layers)} MoE layers dealt over {axis} = {size}",
        f"  {'layer':<7}{'experts':>8}  {'per expert':<26}module",
    ]
    counts = {}
    for (layer, module), ts in layers.items():
        counts[layer, module] = count = (layout.experts_of(ts[0]) or ("", 1))[1]
        first = [t for t in ts if t.expert is None or t.expert.id == 0]
        elements = sum(t.numel for t in first) // (1 if ts[0].expert else count)
        per = f"{len(first)} tensors, {elements:,} elements"
        out.append(f"  {'-' if layer is None else layer:<7}{count:>8}  {per:<26}{module}")
    for c in range(size):
        ranks = [r for r in range(layout.mesh.world) if layout.mesh.coords(r)[axis] == c]
        shown = ", ".join(map(str, ranks[:8])) + (
            f", … ({len(ranks)} ranks)" if len(ranks) > 8 else ""
        )
        held = []
        for (layer, _), n in counts.items():
            per_rank = n // size  # experts are dealt in equal runs, both ways
            held.append(
                f"layer {'-' if layer is None else layer} experts {c * per_rank}-{(c + 1) * per_rank - 1}"
            )
        out.append(f"{axis} {c} (ranks {shown}): {', '.join(held)}")
    return out


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--spec",
        metavar="SRC.layout",
        help="the source layout (default: inferred from the checkpoint); for full weights, "
        "the model's layout, whose topology a format target (--to deepspeed) takes",
    )
    p.add_argument("--tag", help="the tag folder to read (default: from `latest`)")


def _target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        type=_dtype,
        choices=("fp32", "bf16", "fp16"),
        help="dtype of safetensors/torch output (default: the fp32 masters), or of a "
        "deepspeed output's parameters (its masters stay fp32)",
    )
    p.add_argument(
        "--zero",
        type=int,
        choices=(0, 1, 2, 3),
        metavar="K",
        help="deepspeed output: its ZeRO stage, 0-3 (default: the source's); universal "
        "output: the stage of the job that loads it",
    )
    p.add_argument(
        "--max-shard-size",
        type=_shard_size,
        metavar="SIZE",
        help="safetensors: shards of at most SIZE (default 5GB)",
    )


def _output_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output folder (must not exist or be empty)",
    )


def _param_groups_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--param-groups",
        metavar="FILE.json",
        help="optimizer hyperparameters for a fresh optimizer state (from full weights): a "
        "JSON list, one object per param group (lr, betas, eps, weight_decay, ...)",
    )


def _run_options(p: argparse.ArgumentParser) -> None:
    _param_groups_option(p)
    p.add_argument(
        "--sha256",
        action="store_true",
        help="also record each file's SHA-256 in the manifest (reads the output back once), "
        "for `verify --strong`",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start over: remove what earlier runs into OUT that did not finish left "
        "(by default a run of the same command on the same source goes on from its output, "
        "read back and verified first)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no plan summary and no progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="layoutc",
        description="Declarative checkpoint-layout compiler: check layouts, plan conversions between them.",
    )
    ap.add_argument("--version", action="version", version=f"layoutc {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "check",
        help="parse and check .layout files",
        description="Parse and check .layout files; print every diagnostic.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "fmt",
        help="print .layout files in canonical form",
        description="Print .layout files in canonical form (comments kept).",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="exit 1 (and show a diff) if a file is not formatted"
    )
    mode.add_argument("-w", "--write", action="store_true", help="rewrite files in place")
    p.set_defaults(func=cmd_fmt)

    p = sub.add_parser(
        "plan",
        help="dry run: plan moving a checkpoint from one layout to another",
        description="Compile SRC and a target into a plan and show it. No tensor data is read "
        "(of a checkpoint, only its metadata) and nothing is written but what -o and --html ask "
        "for.",
    )
    p.add_argument(
        "source",
        metavar="SRC",
        help="a .layout file, or a checkpoint as convert takes it (planned as convert plans "
        "it: its layout checked against the files)",
    )
    p.add_argument(
        "--to",
        required=True,
        metavar="TARGET",
        help="TARGET.layout, or a format: " + ", ".join(ir.FORMATS),
    )
    _source_options(p)
    p.add_argument(
        "--memory",
        type=parse_size,
        metavar="SIZE",
        help="memory budget, e.g. 2GiB (default: unbounded)",
    )
    _workers_option(p, writers=True)
    p.add_argument(
        "--ranks",
        type=_positive,
        default=1,
        metavar="N",
        help="the processes that will run the plan (torchrun's --nproc_per_node x nodes), "
        "each with --workers threads and its own --memory budget (default 1); convert and "
        "execute under torchrun plan for the world they run in",
    )
    _set_option(p)
    _target_options(p)
    _param_groups_option(p)  # checked as convert's writers check them
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the summary as JSON")
    out.add_argument("--markdown", action="store_true", help="print the summary as Markdown")
    p.add_argument("--ops", action="store_true", help="with --json: include every op (large)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="also write the full plan as JSON (of a checkpoint: a plan `layoutc execute` runs)",
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="also run the full plan validation (slow for huge plans)",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "infer",
        help="write the .layout of a DeepSpeed or distributed (DCP) checkpoint, or of weights",
        description="Describe an existing DeepSpeed checkpoint, or a PyTorch distributed "
        "checkpoint (DCP) folder, as a .layout (reads metadata only); for full weights, write "
        "a starting layout (every tensor trainable, Adam, ZeRO-2 over dp = 1) to edit.",
    )
    p.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="DeepSpeed checkpoint root (with `latest`) or tag folder, a DCP folder, or full "
        "weights (a .safetensors file, a torch state dict, a Hugging Face folder)",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--tag", help="the tag folder to read (default: from `latest`)")
    p.add_argument(
        "--hf",
        action="store_true",
        help="an AutoEP checkpoint: the layout of the Hugging Face model it was made from "
        "(its names and fused experts, each tensor `from` the checkpoint's), to convert to",
    )
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint",
        description="Convert a DeepSpeed checkpoint, a PyTorch distributed checkpoint (DCP), "
        "or full weights with --spec: check the layout against the files, plan, execute, "
        "commit atomically with a checksum manifest.",
    )
    p.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="DeepSpeed checkpoint root (with `latest`) or tag folder; a DCP folder "
        "(.metadata and __R_N.distcp, or torch's Hugging Face layout); or full weights: "
        "a .safetensors file, a torch state dict, a Hugging Face folder (with --spec, or its "
        "layout inferred)",
    )
    _output_option(p)
    p.add_argument(
        "--to",
        required=True,
        metavar="TARGET",
        help=", ".join(ir.FORMATS) + ", or a TARGET.layout",
    )
    _source_options(p)
    p.add_argument("--memory", type=parse_size, metavar="SIZE", help="memory budget, e.g. 256MiB")
    _workers_option(p, writers=True)
    _set_option(p)
    _target_options(p)
    _run_options(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="plan this very command and run every check it would (source, output folder, "
        "free space, param groups), print the plan, write nothing",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "execute",
        help="run a plan saved by `layoutc plan CKPT -o PLAN.json`",
        description="Run a saved plan on the checkpoint it was made from, as convert would "
        "have run it: refused if the checkpoint's files changed since (a file missing, of "
        "another size, or with other metadata); committed atomically with a manifest.",
    )
    p.add_argument("plan", metavar="PLAN.json", help="written by `layoutc plan CKPT -o`")
    p.add_argument("checkpoint", metavar="CKPT", help="the checkpoint the plan was made from")
    _output_option(p)
    _run_options(p)
    p.set_defaults(func=cmd_execute)

    p = sub.add_parser(
        "verify",
        help="check an output against its checksum manifest",
        description="Check a layoutc output against its manifest: exactly its files, the "
        "markers a loader needs and what they point at, each size, then each CRC-32; name "
        "everything that differs.",
    )
    p.add_argument("output", metavar="OUT")
    p.add_argument(
        "--strong",
        action="store_true",
        help="check each file's SHA-256 too (recorded by `convert --sha256`)",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "inspect",
        help="what a checkpoint holds",
        description="Print a DeepSpeed or distributed (DCP) checkpoint's layout facts, or full "
        "weights' tensors, and bytes per file.",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--tag", help="the tag folder to read (default: from `latest`)")
    p.set_defaults(func=cmd_inspect)
    for command in sub.choices.values():  # a usage error shows its command's usage
        command.set_defaults(usage=command.format_usage)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    if not getattr(args, "func", None):
        ap.print_help(sys.stderr)
        return EXIT_USAGE
    previous = _on_sigterm(_terminate)
    try:
        return int(args.func(args))
    except LayoutcError as e:
        code, prefix = FAILURES[kind(e) or InternalError]  # a class without a kind is a bug
        if isinstance(e, LayoutError):  # its diagnostics say where themselves
            print(e.render(limit=SHOWN_DIAGNOSTICS), file=sys.stderr)
        else:
            print(f"layoutc {args.command}: {prefix}{e}", file=sys.stderr)
        if code == EXIT_USAGE:  # the request does not apply: show how the command is used
            print(args.usage().rstrip(), file=sys.stderr)
        if code == EXIT_BUG:
            print(REPORT, file=sys.stderr)
        return code
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (:class:`_Terminated`)
        how = "terminated" if isinstance(e, _Terminated) else "interrupted"
        running = args.command in ("convert", "execute")
        done = "nothing was committed" if running else "stopped"
        if running and str(e):  # what the run kept
            done = f"nothing was committed; {e}"
        print(f"layoutc {args.command}: {how}; {done}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, _Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except OSError as e:  # the input: a file the command reads or writes failed under it
        where = f"{e.filename}: " if e.filename else ""
        print(f"layoutc {args.command}: {where}{e.strerror or e}", file=sys.stderr)
        return FAILURES[InputError][0]
    except Exception as e:  # not raised on purpose (ValueError, KeyError, ...): a bug
        traceback.print_exc()
        code, prefix = FAILURES[InternalError]
        print(f"layoutc {args.command}: {prefix}{type(e).__name__}: {e}", file=sys.stderr)
        print(REPORT, file=sys.stderr)
        return code
    finally:
        if previous is not None:
            _on_sigterm(previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``): stops a command as Ctrl-C does."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated()


def _on_sigterm(handler: Any) -> Any:
    """Install ``handler`` for SIGTERM where this thread can (the main one); the previous."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (main() called from another)
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
