"""``numerics``: run the matrix, build DeepSpeed's CPU ops, run the fault self-test."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from numerics.cell import matrix
from numerics.cell.spec import RunSpec
from numerics.judge import golden
from numerics.run.launched import add_arguments as add_launched_arguments
from numerics.run.runner import INTERRUPTED_EXIT, CellResult, PoolSet, interrupt_on_sigterm
from numerics.show import shard
from numerics.show.report import print_report, write_report



def make_console() -> Console:
    """Wide enough for the tables in CI logs, where there is no terminal to size them."""
    console = Console()
    return console if console.is_terminal else Console(width=180)


def run_cells(specs: list[RunSpec], backend: str | None, console: Console) -> list[CellResult]:
    """Run cells with a progress bar that names the cell in flight and the verdict of each."""
    results: list[CellResult] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    interrupt_on_sigterm()
    with Progress(*columns, console=console, transient=False) as progress, PoolSet(backend) as pools:
        task = progress.add_task("matrix", total=len(specs))
        try:
            for result in pools.run_all(specs, lambda spec: progress.update(task, description=f"running {spec.cell_id}")):
                results.append(result)
                progress.console.print(f"{result.status:5s} {result.spec.cell_id}  ({result.outcome.wall_s:.1f}s)", highlight=False)
                progress.advance(task)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the report still holds what finished
            progress.console.print(f"[bold yellow]interrupted ({stop or 'Ctrl-C'}) after {len(results)} of "
                                   f"{len(specs)} cells[/]: the report holds those")
    return results


def selected(args: argparse.Namespace, console: Console) -> list[RunSpec]:
    """The cells ``--cover``, ``--cells``, ``--world-size`` and ``--shard`` name; empty (and said so) if none."""
    specs = matrix.named_cells(args.cover, pattern=args.cells)
    specs = [s for s in specs if s.world_size == args.world_size] if args.world_size else specs
    if not specs:
        console.print(f"no cells match {args.cells!r}")
    if getattr(args, "shard", None):
        ids = shard.select([s.cell_id for s in specs], args.shard, shard.load_costs("cells"))
        console.print(f"shard {args.shard}: {len(ids)} of {len(specs)} cells")
        specs = [s for s in specs if s.cell_id in set(ids)]
    return specs


def cmd_run(args: argparse.Namespace) -> int:
    console = make_console()
    if args.job:  # a job of `run --jobs`: it ends with its parent
        from numerics.show.jobs import exit_with_parent

        exit_with_parent(sys.stdin.fileno())
    if not (specs := selected(args, console)):
        return 2
    if args.versions:
        return run_version_matrix(args, specs, console)
    if args.pin:
        return run_with_pins(args, specs, console)
    console.print(f"{len(specs)} cells (cover {args.cover}{'' if args.cover == 'full' else '; --full for every product'})")
    if args.jobs > 1:
        if args.shard:
            console.print("error: --jobs splits the selection into shards itself; drop --shard")
            return 2
        from numerics.show.jobs import run_jobs
        from numerics.versions.combinations import without_options

        return run_jobs(without_options(run_arguments(args), ("--jobs", "--report")), args.jobs, len(specs),
                        Path(args.report), console)
    results = run_cells(specs, args.backend, console)
    if args.golden:
        for result in results:
            golden.judge(result, Path(args.golden))
        missing = [r.spec.cell_id for r in results if any(v.invariant == golden.GOLDEN_INVARIANT and v.status == "n/a"
                                                           for v in r.verdicts)]
        if missing:
            console.print(f"[yellow]no golden in {args.golden} for {len(missing)} cells:[/] {', '.join(missing)}")
    print_report(results, console)
    # A job's page is an intermediate one: the merged report decides which passing cells get curves
    # (each is a matplotlib figure, ~0.1 s; a job of the default matrix drew ~90 that no one saw).
    write_report(results, Path(args.report), all_curves=False if args.job else None)
    console.print(f"wrote {args.report}/results.json, junit.xml and report.html")
    if len(results) < len(specs):
        return INTERRUPTED_EXIT
    return 1 if any(r.status == "fail" for r in results) else 0


def cmd_report(args: argparse.Namespace) -> int:
    """``numerics report``: re-render a report from its results.json, or merge shards into one;
    ``--summary-md`` prints the failures as Markdown (a CI job summary), ``--check`` exits 1
    when a cell failed. Exit 2 for a directory that holds no readable report."""
    from numerics.show import report, results

    console = make_console()
    try:
        if args.merge:
            if len(set(map(os.path.realpath, args.merge))) < len(args.merge):
                raise results.ReportError(f"a directory is named twice in --merge {' '.join(args.merge)}")
            data = report.merge([results.load(Path(d)) for d in args.merge])
            directory = Path(args.out or "reports/merged")
            report.write_data(data, directory)
            console.print(f"merged {len(args.merge)} reports ({len(data['cells'])} cells) into {directory}")
        else:
            directory = Path(args.directory)
            data = results.load(directory)
            if not (args.summary_md or args.check):
                page = report.write_page(data, directory, args.all_curves or None)
                console.print(f"wrote {page}")
    except results.ReportError as err:
        console.print(f"error: {err}", highlight=False)
        return 2
    if args.summary_md:
        print(report.summary_markdown(data))
    if data.get("kind", "matrix") == "matrix":
        console.print(data["summary"], highlight=False)
    return 1 if args.check and report.failed(data) else 0


def run_arguments(args: argparse.Namespace) -> list[str]:
    """What followed ``run`` on the command line, to forward to the run inside an environment."""
    return args.argv[args.argv.index("run") + 1:]


def run_with_pins(args: argparse.Namespace, specs: list[RunSpec], console: Console) -> int:
    """``run --pin``: the same run re-executed inside the pins' environment, so the ranks
    inherit it; exit 2 for bad pins, 3 when the environment cannot be built."""
    from numerics.versions.cells import run_pinned
    from numerics.versions.combinations import without_options
    from numerics.versions.resolve import BadPins, parse_pins

    try:
        return run_pinned(parse_pins(args.pin), without_options(run_arguments(args), ("--pin",)), specs,
                          Path(args.report), console)
    except BadPins as err:
        console.print(f"error: {err}", highlight=False)
        return 2


def run_version_matrix(args: argparse.Namespace, specs: list[RunSpec], console: Console) -> int:
    """``run --versions``: every combination in its environment, then one table; exit 2 for bad input."""
    from numerics.versions.cells import run_pinned
    from numerics.versions.combinations import combinations, parse_axes, run_matrix, without_options
    from numerics.versions.resolve import BadPins

    try:
        combos = combinations(parse_axes(args.versions), args.pin)
    except BadPins as err:
        console.print(f"error: {err}", highlight=False)
        return 2
    console.print(f"{len(combos)} combinations x {len(specs)} cells; baseline: {' '.join(map(str, combos[0]))}")
    arguments = without_options(run_arguments(args), ("--pin", "--versions", "--report"), ("--strict",))

    def run_one(combo: tuple, directory: Path) -> int:
        return run_pinned(combo, [*arguments, "--report", str(directory)], specs, directory, console)

    return run_matrix(combos, run_one, [spec.cell_id for spec in specs], Path(args.report), args.strict, console)


def cmd_env(args: argparse.Namespace) -> int:
    """``numerics env build|list|prune``: exit 2 for bad pins, 3 when a build cannot build."""
    from numerics.versions import environments
    from numerics.versions.cells import CANNOT_BUILD_EXIT
    from numerics.versions.resolve import BadPins, CannotBuild, parse_pins

    console = make_console()
    try:
        pins = parse_pins(args.pins)
        if args.action == "build" and not pins:
            raise BadPins("env build needs at least one PKG==VERSION pin, e.g. peft==0.7.0")
        if args.action == "build":
            environments.build(pins, console)
        elif args.action == "list":
            console.print(environments_table(environments.environments(), environments.failures()))
        else:
            for path in environments.prune(unused_days=args.unused_days, pins=pins):
                console.print(f"removed {path}")
    except BadPins as err:
        console.print(f"error: {err}", highlight=False)
        return 2
    except CannotBuild:
        return CANNOT_BUILD_EXIT
    return 0


def environments_table(built: list, failed: list[dict]) -> Table:
    from numerics.versions.environments import size_bytes

    table = Table(title="Numerics environments")
    for column in ("pins", "resolved set", "kind / policy", "size", "build", "last used", "status"):
        table.add_column(column)
    for environment in built:
        record = environment.record
        table.add_row("\n".join(", ".join(pins) for pins in record["pins"]), ", ".join(record["install"]) or "-",
                      f"{record['kind']} / {record['policy']}", f"{size_bytes(environment.path) / 2**20:.0f} MB",
                      f"{record['built_s']:.0f}s", time.strftime("%Y-%m-%d %H:%M", time.localtime(record["used"])),
                      f"[green]ready[/] {environment.path.name}")
    for failure in failed:
        table.add_row(", ".join(failure["pins"]), "-", "-", "-", "-", "-",
                      f"[magenta]cannot build[/]: {escape(failure['reason'])}")
    return table


def cmd_bisect(args: argparse.Namespace) -> int:
    """``numerics bisect``: exit 0 when the change is found, 1 when it is not (the ends do
    not differ, an end cannot be judged, only skipped releases are left), 2 for bad input,
    3 when the package index cannot be reached."""
    from numerics.show.report import write_page
    from numerics.show.results import write_json
    from numerics.versions import bisect
    from numerics.versions.cells import CANNOT_BUILD_EXIT
    from numerics.versions.releases import IndexUnreachable
    from numerics.versions.resolve import BadPins

    console = make_console()
    try:
        request = bisect.make_request(args.package, args.good, args.bad, args.pin, args.cells, args.invariant, args.pre,
                                      tuple(args.selection))
        found, judge = bisect.bisect(request, console)
    except BadPins as err:
        console.print(f"error: {err}", highlight=False)
        return 2
    except IndexUnreachable as err:
        console.print(f"error: {err}", highlight=False)
        return CANNOT_BUILD_EXIT
    data = bisect.summary(request, found, judge)
    for line in bisect.summary_lines(data):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    write_json(data, Path(args.report) / "results.json")
    console.print(f"wrote {write_page(data, Path(args.report))} and results.json beside it")
    if args.json:
        write_json(data, Path(args.json))
        console.print(f"wrote {args.json}")
    return data["exit"]


def cmd_prepare(args: argparse.Namespace) -> int:
    from numerics.run.prepare import main

    return main()


def cmd_golden(args: argparse.Namespace) -> int:
    """``numerics golden record``: run the selection and keep each passing cell's trace."""
    console = make_console()
    if not (specs := selected(args, console)):
        return 2
    results = run_cells(specs, args.backend, console)
    for line in golden.record(results, Path(args.dir), args.update):
        console.print(line, highlight=False)
    return 1 if any(r.status != "pass" for r in results) else 0


def cmd_launched(args: argparse.Namespace) -> int:
    from numerics.run.launched import main as launched

    return launched(args, write_launched_report)


def write_launched_report(results: list[CellResult], directory: Path) -> None:
    """Rank 0 of ``numerics launched``: the table, and the report of the cells judged so far."""
    print_report(results)
    write_report(results, directory)
    print(f"wrote {directory}/results.json, junit.xml and report.html", flush=True)


def cmd_selftest(args: argparse.Namespace) -> int:
    from numerics.show.selftest import detection_table, run_selftest

    console = make_console()
    rows = run_selftest(args.backend, console)
    console.print(detection_table(rows))
    console.print(f"{len(rows)} faults: {sum(r.detected for r in rows)} detected by a targeted invariant, "
                  f"{sum(r.clean.status != 'fail' for r in rows)} clean twins passed")
    return 0 if all(row.ok for row in rows) else 1


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def shard_arg(text: str) -> shard.Shard:
    try:
        return shard.Shard.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_cover(parser: argparse.ArgumentParser) -> None:
    """``--cover`` and its shorthand ``--full``: which cells of each family run (`matrix.COVERS`)."""
    parser.add_argument("--cover", choices=matrix.COVERS, default="triples",
                        help="triples (default): every stage x dtype with every value of each other axis, and "
                             "every pair of values; pairs: every stage x dtype and every pair; full: every product")
    parser.add_argument("--full", dest="cover", action="store_const", const="full", help="--cover full")


def add_selection(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_cover(parser)
    parser.add_argument("--cells", metavar="GLOB",
                        help="only cells whose id matches, e.g. 'zero3-*'; also names the fault cells' clean twins")
    parser.add_argument("--world-size", type=int, help="only cells of this world size")
    parser.add_argument("--backend", choices=["gloo", "nccl"], help="default: nccl with a GPU per rank, else gloo")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="numerics", description=__doc__)
    # The DeepSpeed launcher passes --local_rank=N before the command (LOCAL_RANK is in the environment too).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    run = add_selection(sub.add_parser("run", help="run the matrix and write a report"))
    run.add_argument("--report", default="reports/latest", help="directory for results.json and junit.xml")
    run.add_argument("--golden", metavar="DIR", help="compare every trace with its golden in DIR (matches_golden)")
    run.add_argument("--versions", action="append", default=[], metavar="PKG=V1,V2",
                     help="run every combination of these releases (repeatable); the first is the baseline")
    run.add_argument("--strict", action="store_true", help="with --versions: a trace that moved against the baseline fails")
    run.add_argument("--pin", action="append", default=[], metavar="PKG==V",
                     help="run inside the environment for these releases (repeatable; exit 3: cannot build)")
    run.add_argument("--shard", type=shard_arg, metavar="I/N",
                     help="run only the I-th of N cost-balanced slices of the selection (1-based)")
    run.add_argument("--job", action="store_true", help=argparse.SUPPRESS)  # a job of --jobs (show/jobs.py)
    run.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                     help="run the selection as N shards at once, each with its own rank pool, then merge "
                          "(CPU: 2 fills 2 cores; not with GPUs, which every job would share)")
    run.set_defaults(func=cmd_run, argv=sys.argv[1:] if argv is None else argv)
    report = sub.add_parser("report", help="re-render report.html from results.json, or merge shards into one report")
    report.add_argument("directory", nargs="?", default="reports/latest", help="a report directory (results.json)")
    report.add_argument("--merge", nargs="+", metavar="DIR", help="report directories of shards of one run")
    report.add_argument("--out", metavar="DIR", help="with --merge: where the merged report goes (default reports/merged)")
    report.add_argument("--summary-md", action="store_true", help="print the failing cells as Markdown (CI job summaries)")
    report.add_argument("--check", action="store_true", help="exit 1 when a cell failed")
    report.add_argument("--all-curves", action="store_true",
                        help="draw every passing cell's curves too (by default only up to 120 passing cells)")
    report.set_defaults(func=cmd_report)
    env = sub.add_parser("env", help="build, list or prune environments for release pins")
    env.add_argument("action", choices=["build", "list", "prune"])
    env.add_argument("pins", nargs="*", metavar="PKG==V", help="build: the releases; prune: only their environment")
    env.add_argument("--unused-days", type=float, help="prune: only environments not used for this many days")
    env.set_defaults(func=cmd_env)
    bisect = sub.add_parser("bisect", help="find the first release of a package that turned cells red (or green)")
    bisect.add_argument("package", help="the package whose releases are searched, e.g. peft")
    bisect.add_argument("--good", required=True, metavar="V", help="a release where the cells pass")
    bisect.add_argument("--bad", required=True, metavar="V", help="a release where they fail (older: find the fix)")
    bisect.add_argument("--pin", action="append", default=[], metavar="PKG==V", help="held in every candidate (repeatable)")
    bisect.add_argument("--invariant", metavar="NAME", help="the failure to bisect (default: what fails at --bad)")
    bisect.add_argument("--cells", metavar="GLOB", help="cell ids of the full matrix and the fault cells' clean twins")
    bisect.add_argument("--pre", action="store_true", help="also try pre-releases between the ends")
    bisect.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    bisect.add_argument("--report", default="reports/bisect", help="directory for results.json and report.html")
    bisect.set_defaults(selection=[])  # ``-- PYTEST_SELECTION``: instead of --cells, the tests to run
    bisect.set_defaults(func=cmd_bisect)
    golden_parser = sub.add_parser("golden", help="record golden traces of passing cells")
    golden_parser.add_argument("action", choices=["record"])
    add_selection(golden_parser)
    golden_parser.add_argument("--dir", required=True, help="one JSON per cell id")
    golden_parser.add_argument("--update", action="store_true", help="replace goldens that exist (prints what moved)")
    golden_parser.set_defaults(func=cmd_golden)
    sub.add_parser("prepare", help="build DeepSpeed's CPU ops once").set_defaults(func=cmd_prepare)
    launched = sub.add_parser("launched", help="run cells on ranks torchrun or the DeepSpeed launcher started (multi-node)")
    add_launched_arguments(launched)
    add_cover(launched)
    launched.set_defaults(func=cmd_launched)
    selftest = sub.add_parser("selftest", help="inject every fault and show which invariants catch it")
    selftest.add_argument("--backend", choices=["gloo", "nccl"])
    selftest.set_defaults(func=cmd_selftest)
    argv = sys.argv[1:] if argv is None else argv
    selection = argv[argv.index("--") + 1:] if "--" in argv else []  # argparse's subparsers mishandle "--"
    args = parser.parse_args(argv[:len(argv) - len(selection) - 1] if selection else argv)
    if selection and args.command != "bisect":
        parser.error("only numerics bisect takes a pytest selection after --")
    args.selection = selection
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
