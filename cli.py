"""The ``qcorrect`` command: ``demo`` (the main job on the reference model) and ``bench ...``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qcorrect", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print a table (--json: one JSON object last)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from .bench import demo, errors, gram, memory, overhead, pcr, quality, quantizers, solve, speed, tuning

    memory.add_parser(bench_sub)
    quality.add_parser(bench_sub)
    overhead.add_parser(bench_sub)
    errors.add_parser(bench_sub)
    pcr.add_parser(bench_sub)
    quantizers.add_parser(bench_sub)
    tuning.add_parser(bench_sub)
    solve.add_parser(bench_sub)
    gram.add_parser(bench_sub)
    speed.add_parser(bench_sub)
    demo.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
