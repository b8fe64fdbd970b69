"""Training: DreamBooth-LoRA with prior preservation, textual inversion, pivotal tuning; captions lint.

``python -m lorahub.train DATA_DIR ...`` (or ``accelerate launch -m lorahub.train DATA_DIR ...``) takes the
same options as ``lorahub train``.
"""
