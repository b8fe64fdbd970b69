#!/usr/bin/env python
"""Assemble README.md from docs/readme/NN-*.md (in file-name order)."""

from pathlib import Path

root = Path(__file__).resolve().parent.parent
parts = sorted((root / "docs" / "readme").glob("*.md"))
text = "\n\n".join(p.read_text().strip() for p in parts) + "\n"
(root / "README.md").write_text(text)
print(f"README.md: {len(parts)} sections, {len(text.splitlines())} lines")
