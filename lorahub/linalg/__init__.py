"""Low-rank linear algebra on LoRA factors: norms, spectra, products and truncation without ΔW."""
