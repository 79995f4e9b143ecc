"""Benchmarks (``make bench``): each module of this package measures one part of the pipeline.

A benchmark module defines ``run(out_dir: Path, quick: bool) -> str``: it times what it measures, writes any
raw figures it likes under ``out_dir`` and returns a Markdown section (a heading, a table, a line on how to
read it). ``python -m pipeline.bench`` runs them all, or the ones named, and collects the sections in
``outputs/bench/results.md``.
"""
