"""``python -m pipeline.bench [name ...] [--quick] [--out DIR]``: run benchmarks, write ``results.md``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import time
from pathlib import Path

import torch

import pipeline.bench as package


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--quick", action="store_true", help="fewer clips and repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="where results.md goes")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {available()}")
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Benchmarks\n\n{time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {'quick' if args.quick else 'full'} run.\n"
    )
    sections = [header]
    for name in names:
        started = time.perf_counter()
        print(f"bench {name} ...", flush=True)
        section = importlib.import_module(f"pipeline.bench.{name}").run(args.out, args.quick)
        (args.out / f"{name}.md").write_text(section)
        sections.append(section)
        print(section, f"\n({name}: {time.perf_counter() - started:.0f} s)\n", flush=True)
    (args.out / "results.md").write_text("\n".join(sections))
    print(f"results: {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
