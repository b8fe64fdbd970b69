"""`lorahub train` and `lorahub captions lint`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorahub.cli.app import ForceOpt, app
from lorahub.cli.common import HomeOpt, JsonOpt, console, print_json, progress

captions_app = typer.Typer(name="captions", help="Check training captions.", no_args_is_help=True,
                           rich_markup_mode=None)
app.add_typer(captions_app, name="captions")

_TYPE_HELP = "LoRA type: character|style|pose|clothing|object|concept."


def train(
    data_dir: Annotated[Optional[Path], typer.Argument(help="Folder of training images (png/jpg/webp) "
                                                       "with optional same-name .txt captions.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model: tiny-sd1, tiny-sdxl, tiny-flux, "
                                                "tiny-sd3, a diffusers folder (SD1/SD2/SDXL, Flux.1, SD3: "
                                                "dreambooth) or a registry reference.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="dreambooth | textual-inversion | pivotal.")] = None,
    type_: Annotated[Optional[str], typer.Option("--type", help=_TYPE_HELP)] = None,
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="Trigger word(s), '|'-separated "
                                                   "(dreambooth default 'sks'; TI/pivotal: the placeholders).")] = None,
    instance_prompt: Annotated[Optional[str], typer.Option("--instance-prompt", help="Prompt of images "
                                                           "without caption (default '<trigger> <class prompt>').")] = None,
    class_prompt: Annotated[Optional[str], typer.Option("--class-prompt", help="Class prompt, e.g. 'a girl'.")] = None,
    prior_preservation: Annotated[Optional[bool], typer.Option("--prior-preservation/--no-prior-preservation",
                                                               help="Add the class-image loss.")] = None,
    class_dir: Annotated[Optional[Path], typer.Option("--class-dir", help="Class images folder (missing "
                                                      "ones are generated; default: a cache in the home).")] = None,
    num_class_images: Annotated[Optional[int], typer.Option("--num-class-images", help="Class images to use (200).")] = None,
    prior_loss_weight: Annotated[Optional[float], typer.Option("--prior-loss-weight", help="Weight of the class loss (1.0).")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank (16).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha (default: rank).")] = None,
    train_text_encoder: Annotated[Optional[bool], typer.Option("--train-text-encoder/--no-train-text-encoder",
                                                               help="dreambooth: LoRA on the text encoder too.")] = None,
    placeholder_tokens: Annotated[Optional[str], typer.Option("--placeholder-tokens", help="New tokens, "
                                                              "'|'-separated (default '<s1>').")] = None,
    init_tokens: Annotated[Optional[str], typer.Option("--init-tokens", help="Initialising words, '|'-separated.")] = None,
    vectors_per_token: Annotated[Optional[int], typer.Option("--vectors-per-token", help="Vectors per new token (1).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (500); pivotal: split in two.")] = None,
    ti_steps: Annotated[Optional[int], typer.Option("--ti-steps", help="pivotal: textual-inversion phase steps.")] = None,
    lora_steps: Annotated[Optional[int], typer.Option("--lora-steps", help="pivotal: LoRA phase steps.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="UNet LoRA learning rate (1e-4).")] = None,
    text_lr: Annotated[Optional[float], typer.Option("--text-lr", help="Text-encoder LoRA learning rate (default --lr).")] = None,
    ti_lr: Annotated[Optional[float], typer.Option("--ti-lr", help="Token-embedding learning rate (5e-4).")] = None,
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Training resolution (512).")] = None,
    buckets: Annotated[Optional[bool], typer.Option("--buckets/--center-crop", help="Aspect-ratio buckets "
                                                    "instead of centre crop.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Batch size per device (1).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Gradient accumulation steps (1).")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option("--mixed-precision", help="no | fp16 | bf16.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing",
                                                                   help="Trade compute for memory.")] = None,
    cache_latents: Annotated[Optional[bool], typer.Option("--cache-latents/--no-cache-latents",
                                                          help="Encode every image once (no flips).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (0).")] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint every N steps.")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Checkpoint folder (step-N), a run "
                                                  "folder, or 'latest'.")] = None,
    validation_prompt: Annotated[Optional[str], typer.Option("--validation-prompt", help="Render this prompt "
                                                             "at α=1 after training, saved beside the output.")] = None,
    validation_steps: Annotated[Optional[int], typer.Option("--validation-steps", help="Sampling steps (25).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Output and registry name.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Output folder (default ./NAME).")] = None,
    dialect: Annotated[Optional[str], typer.Option("--dialect", help="LoRA file key style: kohya | diffusers.")] = None,
    save_precision: Annotated[Optional[str], typer.Option("--save-precision", help="fp16 | bf16 | fp32.")] = None,
    bundle: Annotated[Optional[bool], typer.Option("--bundle/--no-bundle", help="pivotal: also write "
                                                   "NAME.bundle.safetensors (kohya LoRA + embeddings in one "
                                                   "file, for the webui; diffusers cannot load it).")] = None,
    register: Annotated[Optional[bool], typer.Option("--register/--no-register", help="Add the result to the registry.")] = None,
    ignore_lint: Annotated[Optional[bool], typer.Option("--ignore-lint", help="Train despite caption-lint errors.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="train.toml with any of these settings.")] = None,
    force: ForceOpt = False,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train a LoRA (dreambooth), an embedding (textual-inversion) or both (pivotal) on DATA_DIR."""
    from lorahub.train import train_lora
    from lorahub.train.config import split_list

    settings = dict(
        base=base, method=method, type=type_,
        trigger=trigger, instance_prompt=instance_prompt, class_prompt=class_prompt,
        prior_preservation=prior_preservation, class_dir=str(class_dir) if class_dir else None,
        num_class_images=num_class_images, prior_loss_weight=prior_loss_weight, rank=rank, alpha=alpha,
        train_text_encoder=train_text_encoder, placeholder_tokens=split_list(placeholder_tokens),
        init_tokens=split_list(init_tokens), vectors_per_token=vectors_per_token, steps=steps,
        ti_steps=ti_steps, lora_steps=lora_steps, lr=lr, text_lr=text_lr, ti_lr=ti_lr,
        resolution=resolution, buckets=buckets, batch_size=batch_size, grad_accum=grad_accum,
        mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        cache_latents=cache_latents, seed=seed, save_every=save_every, resume=resume,
        validation_prompt=validation_prompt, validation_steps=validation_steps, name=name,
        output_dir=str(output_dir) if output_dir else None, dialect=dialect, save_precision=save_precision,
        bundle=bundle,
        register=register, ignore_lint=ignore_lint)
    err = console(stderr=True)
    with progress(transient=False) as bar:
        task = bar.add_task("loading", total=None, start=False)

        def report(r: dict) -> None:
            if not bar.tasks[0].started:
                bar.start_task(task)
            bar.update(task, completed=r["step"], total=r["total"],
                       description=f"{r['phase']} loss {r['loss']:.4f} {r['it_s']:.2f} it/s")

        def log(msg: str) -> None:
            bar.console.print(msg, markup=False, highlight=False)

        res = train_lora(data_dir, config=config, registry=home, on_step=report, log=log, force=force, **settings)
    if not res.is_main:  # accelerate launch: the main process reports
        return
    if json_out:
        print_json(res.to_dict())
        return
    out = [p for p in [res.lora_path, *res.embedding_paths] if p]
    final = f"{res.losses[-1]:.4f}" if res.losses else "n/a"
    err.print(f"trained {res.steps} steps in {res.seconds:.1f} s (final loss {final})", markup=False)
    for p in out:
        console().print(str(p))
    for e in res.entries:
        err.print(f"registered {e['id']} {e['name']} type={e.get('type')} triggers={e.get('triggers')}",
                  markup=False)


app.command("train")(train)


@captions_app.command("lint")
def captions_lint(
    data_dir: Annotated[Path, typer.Argument(help="Folder of training images and .txt captions.")],
    type_: Annotated[Optional[str], typer.Option("--type", help=_TYPE_HELP)] = None,
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="Trigger word every caption must carry "
                                                   "(alternatives separated by '|').")] = None,
    min_size: Annotated[int, typer.Option("--min-size", help="Warn about images whose short side is "
                                          "smaller (px).")] = 512,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 on warnings too.")] = False,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check captions: triggers (character), style words (style), missing/empty captions, duplicates,
    unreadable or too-small images. Exits 1 when errors are found."""
    from lorahub.train.captions import lint

    rep = lint(data_dir, type=type_, trigger=trigger, min_size=min_size)
    if json_out:
        print_json(rep.to_dict())
    else:
        out = console()
        for f in rep.findings:
            out.print(f"{f.level:7} {f.code:18} {f.file or '-'}: {f.message}", markup=False)
        out.print(f"{rep.images} image(s), {rep.captioned} captioned: {len(rep.errors)} error(s), "
                  f"{len(rep.warnings)} warning(s)", markup=False)
    if rep.errors or (strict and rep.warnings):
        raise typer.Exit(1)
