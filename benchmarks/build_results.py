#!/usr/bin/env python
"""Assemble benchmarks/RESULTS.md from benchmarks/results/*.md (each written by its benchmark)."""

from pathlib import Path

here = Path(__file__).resolve().parent
order = ["gpu", "startup", "registry", "detect_speed", "peers", "inspect", "extract", "merge", "dit_formats", "dit_extract", "sweep", "train", "web"]
parts = sorted((here / "results").glob("*.md"), key=lambda p: (order.index(p.stem) if p.stem in order else 99, p.name))
head = ("# Benchmark results\n\nEach section below was written by the benchmark script it names, with the exact command, "
        "the machine and the date. Ratios compare against a baseline measured in the same run. The CPU "
        "figures come from this project's 2-core development machine; several were measured while the "
        "machine was shared with other jobs, which each section states.\n")
text = head + "\n\n" + "\n\n".join(p.read_text().strip() for p in parts) + "\n"
(here / "RESULTS.md").write_text(text)
print(f"RESULTS.md: {len(parts)} sections")
