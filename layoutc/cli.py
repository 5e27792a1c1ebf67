"""The ``layoutc`` command line.

Exit codes: 0 success, 1 the input is wrong (diagnostics printed to stderr), 2 usage
error (bad flags, missing files). Every subcommand prints what it did; nothing runs
pickled code or touches a checkpoint unless asked to.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from layoutc import ir
from layoutc.errors import LayoutError, PlanError, Unsupported

EXIT_OK, EXIT_USER, EXIT_USAGE = 0, 1, 2


class _Usage(Exception):
    pass


def parse_size(text: str) -> int:
    """``2GiB``, ``512MiB``, ``1e9``, ``1.5GB`` or a plain number of bytes."""
    from layoutc.lang.parse import size_value

    t = text.strip().replace("_", "")
    if t.isdigit():
        return int(t)
    try:
        return size_value(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (use bytes or a unit: 512MiB, 2GiB, 1e9, 5GB)"
        ) from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _read(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise _Usage(f"{path}: no such file")
    return p.read_text(encoding="utf-8")


def _load(path: str) -> ir.Layout:
    from layoutc.lang.check import load_text

    return load_text(_read(path), path)


def cmd_check(args: argparse.Namespace) -> int:
    from layoutc.place import place

    failed = False
    for path in args.files:
        try:
            layout = _load(path)
            p = place(layout)
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
    from layoutc.lang.fmt import fmt
    from layoutc.lang.parse import parse

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


def cmd_plan(args: argparse.Namespace) -> int:
    from layoutc.plan.compile import compile_plan
    from layoutc.render import render

    if args.ops and not args.json:
        raise _Usage("--ops adds every op to the JSON output; use it with --json")
    source = _load(args.source)
    if args.to not in ir.FORMATS and not Path(args.to).is_file():
        guess = difflib.get_close_matches(args.to, ir.FORMATS, n=1, cutoff=0.6)
        hint = f"did you mean `{guess[0]}`? " if guess else ""
        raise _Usage(
            f"--to {args.to}: no such file and not a format; {hint}formats: {', '.join(ir.FORMATS)}"
        )
    target: ir.Layout | str = args.to if args.to in ir.FORMATS else _load(args.to)
    try:
        plan = compile_plan(source, target, memory=args.memory, workers=args.workers)
    except ValueError as e:
        raise _Usage(str(e)) from None
    if args.validate:
        from layoutc.place import place
        from layoutc.plan.compile import target_layout

        plan.validate(place(source), place(target_layout(source, target)))
    if args.json:
        import json

        doc = {"summary": plan.summary()}
        if args.ops:
            doc["plan"] = plan.to_dict()
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(plan, "markdown" if args.markdown else "text"))
    if args.html:
        from layoutc.place import place
        from layoutc.plan.compile import target_layout
        from layoutc.render import drawings

        pictures = drawings(plan, place(source), place(target_layout(source, target)))
        Path(args.html).write_text(render(plan, "html", drawings=pictures), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(plan.to_json(indent=1), encoding="utf-8")
        print(f"wrote the plan to {args.output}", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="layoutc",
        description="Declarative checkpoint-layout compiler: check layouts, plan conversions between them.",
    )
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
        description="Compile SRC and a target into a plan and show it; nothing is read or written.",
    )
    p.add_argument("source", metavar="SRC.layout")
    p.add_argument(
        "--to",
        required=True,
        metavar="TARGET",
        help="TARGET.layout, or a format: " + ", ".join(ir.FORMATS),
    )
    p.add_argument(
        "--memory",
        type=parse_size,
        metavar="SIZE",
        help="memory budget, e.g. 2GiB (default: unbounded)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="workers (threads or ranks) to balance over (default 1)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the summary as JSON")
    out.add_argument("--markdown", action="store_true", help="print the summary as Markdown")
    p.add_argument("--ops", action="store_true", help="with --json: include every op (large)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    p.add_argument("-o", "--output", metavar="FILE", help="also write the full plan as JSON")
    p.add_argument(
        "--validate",
        action="store_true",
        help="also run the full plan validation (slow for huge plans)",
    )
    p.set_defaults(func=cmd_plan)
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
    try:
        return int(args.func(args))
    except _Usage as e:
        print(f"layoutc {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LayoutError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_USER
    except Unsupported as e:
        print(f"layoutc {args.command}: unsupported: {e}", file=sys.stderr)
        return EXIT_USER
    except PlanError as e:
        print(f"layoutc {args.command}: internal error, the plan is invalid: {e}", file=sys.stderr)
        return EXIT_USER
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
