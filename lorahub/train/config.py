"""Training configuration: one dataclass, loadable from TOML, overridable by keyword (the command line)."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorahub.errors import LorahubError
from lorahub.vocab import DTYPES, LORA_TYPES

METHODS = ("dreambooth", "textual-inversion", "pivotal")
PRECISIONS = ("no", "fp16", "bf16")
TRAIN_DIALECTS = ("kohya", "diffusers")  # key spellings a trained LoRA file is written in


@dataclass
class TrainConfig:
    data_dir: str = ""
    base: str = "tiny-sd1"
    method: str = "dreambooth"
    type: str | None = None
    name: str | None = None
    output_dir: str | None = None          # default ./<name>
    dialect: str = "kohya"                 # kohya | diffusers (the LoRA file's key spelling)
    save_precision: str = "fp16"
    bundle: bool = False                   # pivotal: also NAME.bundle.safetensors (kohya LoRA + bundle_emb, webui)
    # prompts
    trigger: str | None = None             # dreambooth: rare word (default "sks"); TI/pivotal: the placeholders
    instance_prompt: str | None = None     # default "<trigger> <class prompt>"
    class_prompt: str | None = None
    # prior preservation
    prior_preservation: bool = False
    class_dir: str | None = None
    num_class_images: int = 200
    prior_loss_weight: float = 1.0
    class_inference_steps: int = 25
    # LoRA
    rank: int = 16
    alpha: float | None = None             # default = rank
    train_text_encoder: bool = False
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    # textual inversion
    placeholder_tokens: list[str] = field(default_factory=list)
    init_tokens: list[str] = field(default_factory=list)
    vectors_per_token: int = 1
    # schedule
    steps: int = 500                       # dreambooth / textual-inversion
    ti_steps: int | None = None            # pivotal phase 1 (default steps // 2)
    lora_steps: int | None = None          # pivotal phase 2 (default steps // 2)
    lr: float = 1e-4                       # UNet LoRA
    text_lr: float | None = None           # text-encoder LoRA (default lr)
    ti_lr: float = 5e-4                    # token embeddings
    weight_decay: float = 1e-2
    resolution: int = 512
    buckets: bool = False                  # aspect-ratio buckets instead of centre crop
    flip: bool = False                     # random horizontal flip
    batch_size: int = 1
    grad_accum: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    seed: int = 0
    # bookkeeping
    save_every: int = 0
    resume: str | None = None
    validation_prompt: str | None = None
    validation_images: int = 1
    validation_steps: int = 25
    register: bool = True
    ignore_lint: bool = False
    min_image_size: int | None = None      # lint threshold (default: resolution)

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def replace(self, **overrides) -> "TrainConfig":
        cfg = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def ti_phase_steps(self) -> int:
        if self.method == "textual-inversion":
            return self.steps
        if self.method == "pivotal":
            return self.ti_steps if self.ti_steps is not None else max(1, self.steps // 2)
        return 0

    @property
    def lora_phase_steps(self) -> int:
        if self.method == "dreambooth":
            return self.steps
        if self.method == "pivotal":
            return self.lora_steps if self.lora_steps is not None else max(1, self.steps - self.steps // 2)
        return 0

    @property
    def total_steps(self) -> int:
        return self.ti_phase_steps + self.lora_phase_steps

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def uses_tokens(self) -> bool:
        return self.method in ("textual-inversion", "pivotal")

    def placeholders(self) -> list[str]:
        if self.placeholder_tokens:
            return list(self.placeholder_tokens)
        if self.trigger and self.uses_tokens:
            return [t for t in self.trigger.replace("|", " ").split() if t]
        return ["<s1>"]

    def trigger_words(self) -> list[str]:
        if self.uses_tokens:
            return self.placeholders()
        return [t.strip() for t in (self.trigger or "sks").split("|") if t.strip()]

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise LorahubError(f"setting {f.name!r}: {v!r} is not a finite number")
        if self.method not in METHODS:
            raise LorahubError(f"unknown method {self.method!r} (one of {', '.join(METHODS)})")
        if self.type is not None and self.type not in LORA_TYPES:
            raise LorahubError(f"unknown type {self.type!r} (one of {', '.join(LORA_TYPES)})")
        if self.mixed_precision not in PRECISIONS:
            raise LorahubError(f"mixed_precision must be one of {', '.join(PRECISIONS)}")
        if self.save_precision not in DTYPES:
            raise LorahubError(f"save_precision must be one of {', '.join(DTYPES)}")
        if self.dialect not in TRAIN_DIALECTS:
            raise LorahubError(f"dialect must be one of {', '.join(TRAIN_DIALECTS)}")
        for name in ("rank", "steps", "batch_size", "grad_accum", "resolution", "vectors_per_token",
                     "validation_images", "validation_steps", "class_inference_steps"):
            if getattr(self, name) < 1:
                raise LorahubError(f"{name} must be at least 1")
        for name in ("ti_steps", "lora_steps"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise LorahubError(f"{name} must not be negative")
        if self.total_steps < 1:
            raise LorahubError("nothing to train: the step counts add up to 0")
        if self.save_every < 0 or self.num_class_images < 0:
            raise LorahubError("save_every and num_class_images must not be negative")
        for name in ("lr", "ti_lr"):
            if getattr(self, name) <= 0:
                raise LorahubError(f"{name} must be positive")
        if self.prior_preservation and not self.class_prompt:
            raise LorahubError("prior_preservation needs a class_prompt")
        if self.prior_preservation and self.method == "textual-inversion":
            raise LorahubError("prior preservation applies to dreambooth and pivotal, not textual-inversion")
        if self.uses_tokens:
            ph = self.placeholders()
            if len(set(ph)) != len(ph):
                raise LorahubError("placeholder tokens must be distinct")
            if self.init_tokens and len(self.init_tokens) not in (1, len(ph)):
                raise LorahubError(f"init_tokens gives {len(self.init_tokens)} words for {len(ph)} placeholder tokens")


def split_list(value: str | list | None) -> list[str] | None:
    """'a|b' or ['a', 'b'] -> ['a', 'b'] (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split("|") if v.strip()]
    return [str(v) for v in value]


def load_toml(path) -> dict[str, Any]:
    """Read a train.toml: keys are TrainConfig fields (dashes or underscores), optionally under [train]."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorahubError(f"{p}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LorahubError(f"{p}: not valid TOML ({exc})") from None
    if isinstance(data.get("train"), dict):
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    out: dict[str, Any] = {}
    names = TrainConfig.field_names()
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in names:
            raise LorahubError(f"{p}: unknown setting {key!r}")
        if k in ("placeholder_tokens", "init_tokens", "unet_targets", "text_targets"):
            value = split_list(value)
        if k in ("data_dir", "class_dir", "output_dir", "resume") and isinstance(value, str) \
                and value not in ("latest", "auto") and not Path(value).expanduser().is_absolute():
            value = str(p.parent / value)  # relative paths in a config file: relative to the file
        out[k] = value
    return out


def build_config(toml_path=None, *, check_data: bool = False, **cli) -> TrainConfig:
    """Defaults < TOML file < command-line options that were given (not None)."""
    values: dict[str, Any] = {}
    if toml_path:
        values.update(load_toml(toml_path))
    values.update({k: v for k, v in cli.items() if v is not None})
    names = TrainConfig.field_names()
    unknown = set(values) - names
    if unknown:
        raise LorahubError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for k, v in list(values.items()):
        t = str(types[k])
        if isinstance(v, float) and not math.isfinite(v):
            raise LorahubError(f"setting {k!r}: {v!r} is not a finite number")
        try:
            if t.startswith("int") and not isinstance(v, bool):
                values[k] = int(v)
            elif t.startswith("float"):
                values[k] = float(v)
            elif t == "bool" and not isinstance(v, bool):
                raise LorahubError(f"setting {k!r} must be true or false")
        except (TypeError, ValueError):
            raise LorahubError(f"setting {k!r}: {v!r} is not a number") from None
    cfg = TrainConfig(**values)
    if not cfg.data_dir:
        raise LorahubError("no DATA_DIR given (argument or data_dir in the config)")
    if check_data and not Path(cfg.data_dir).expanduser().is_dir():
        raise LorahubError(f"{cfg.data_dir}: not a folder")
    cfg.validate()
    return cfg
