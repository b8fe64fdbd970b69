"""Training: DreamBooth-LoRA with prior preservation, textual inversion, pivotal tuning; captions lint.

``python -m lorahub.train DATA_DIR ...`` (or ``accelerate launch -m lorahub.train DATA_DIR ...``) takes the
same options as ``lorahub train``. From Python: :func:`train_lora`.
"""

from __future__ import annotations

import os


def train_lora(data_dir: str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
               registry=None, on_step=None, log=None, force: bool = False, **settings):
    """Train a LoRA (dreambooth), an embedding (textual-inversion) or both (pivotal) on the images of
    ``data_dir`` and (unless ``register=False``) register the results (lineage: trained-from).

    ``settings``: any :class:`lorahub.train.config.TrainConfig` field (base, method, type, trigger, rank,
    steps, lr, resolution, name, output_dir, …); they override the TOML file ``config``, which overrides
    the defaults. ``registry``: a Registry, a home folder, or None (the default home).
    ``on_step(report)`` gets a dict (step, phase, loss, it_s) per step; ``log(message)`` the trainer's
    notes. Files an earlier run left in the output folder are replaced only with ``force``. ``base``
    may be a Flux.1 or SD3 model (tiny-flux, tiny-sd3, a diffusers folder): dreambooth on the
    transformer with the flow-matching loss. Returns a :class:`lorahub.train.trainer.TrainResult`.
    """
    from lorahub.train.config import build_config
    from lorahub.train.trainer import train

    cfg = build_config(config, check_data=True, data_dir=str(data_dir) if data_dir else None, **settings)
    where = {"home": registry} if registry is None or isinstance(registry, (str, os.PathLike)) else \
        {"registry": registry}
    return train(cfg, report=on_step, log=log, force=force, **where)
