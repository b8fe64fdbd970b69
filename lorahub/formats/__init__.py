"""LoRA file formats: detection (header only), canonical form, dialect readers/writers.

Import the submodules directly (``lorahub.formats.detect`` stays torch-free; ``io`` imports torch).
"""
