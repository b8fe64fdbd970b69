"""Model cards (README.md) for the Hugging Face Hub: written by us, read defensively.

The front matter follows what diffusers' training scripts write for LoRA repos (``base_model``,
``tags`` with ``lora``/``text-to-image``/``diffusers``/``template:sd-lora``, ``instance_prompt``,
``license``, ``widget`` and ``library_name: diffusers``), so the Hub shows a LoRA widget and search
filters find it. Output is deterministic: the same entry gives byte-identical cards, which is what
makes a re-push a no-op.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lorahub.errors import LorahubError

# Default base-model repo per family (what a card's `base_model` names when the entry doesn't say).
BASE_MODEL_IDS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
LICENSES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++"}
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
                "unknown": "an unknown Stable Diffusion base"}

MAX_CARD_BYTES = 1024 * 1024
MAX_YAML_NODES = 20000


def base_family(base_model: Any) -> str | None:
    """sd1 / sd2 / sdxl from a card's ``base_model`` (a repo id, or a list of them)."""
    if isinstance(base_model, list):
        for b in base_model:
            fam = base_family(b)
            if fam:
                return fam
        return None
    if not isinstance(base_model, str):
        return None
    t = base_model.lower()
    if re.search(r"xl|sdxl|pony|illustrious|playground-v2", t):
        return "sdxl"
    if re.search(r"stable-diffusion-2|sd-?2|sd_v2|v2-1|2-base", t):
        return "sd2"
    if re.search(r"stable-diffusion-v1|sd-?1|v1-[45]|sd15|1-5|compvis|runwayml", t):
        return "sd1"
    return None


# ---------------------------------------------------------------------------------------- reading
def split_front_matter(text: str) -> tuple[str | None, str]:
    """(YAML text or None, body) of a README."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.startswith("---"):
        return None, text
    m = re.match(r"^---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*(?:\r?\n|$)", text, re.S | re.M)
    if not m:
        raise LorahubError("model card front matter has no closing '---' line")
    return m.group(1), text[m.end():]


def _count_nodes(obj: Any, budget: list[int], depth: int = 0) -> None:
    budget[0] -= 1
    if budget[0] < 0 or depth > 20:
        raise LorahubError("model card front matter is too large or too deeply nested")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _count_nodes(k, budget, depth + 1)
            _count_nodes(v, budget, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _count_nodes(v, budget, depth + 1)


def parse_card(data: bytes, *, where: str = "README.md") -> dict:
    """The front matter of a model card as a dict ({} without one). Bad input -> LorahubError."""
    if len(data) > MAX_CARD_BYTES:
        raise LorahubError(f"{where}: model card is larger than {MAX_CARD_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LorahubError(f"{where}: model card is not UTF-8 text") from None
    try:
        raw, _body = split_front_matter(text)
    except LorahubError as exc:
        raise LorahubError(f"{where}: {exc}") from None
    if raw is None or not raw.strip():
        return {}
    import yaml

    try:
        meta = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 2})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise LorahubError(f"{where}: model card front matter is not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise LorahubError(f"{where}: model card front matter is nested too deeply") from None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise LorahubError(f"{where}: model card front matter is not a mapping")
    _count_nodes(meta, [MAX_YAML_NODES])
    return meta


def _str_list(value: Any, *, limit: int = 64) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        value = [value]
    if not isinstance(value, list):
        return []
    out = []
    for v in value:
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            s = " ".join(str(v).split())[:200]
            if s and s not in out:
                out.append(s)
    return out[:limit]


def card_fields(meta: dict) -> dict:
    """What a pull takes from a card: base_model, family, triggers, tags, license (all optional)."""
    base_model = meta.get("base_model")
    base_models = _str_list(base_model, limit=4)
    prompt = meta.get("instance_prompt")
    triggers: list[str] = []
    if isinstance(prompt, str):
        triggers = [t for t in (" ".join(p.split()) for p in prompt.split(",")) if t][:16]
    lic = meta.get("license")
    return {
        "base_model": base_models[0] if base_models else None,
        "family": base_family(base_models),
        "triggers": triggers,
        "tags": _str_list(meta.get("tags")),
        "license": lic if isinstance(lic, str) else None,
    }


# ---------------------------------------------------------------------------------------- writing
def _fmt_alpha(a: Any) -> str:
    try:
        return f"{float(a):g}"
    except (TypeError, ValueError):
        return str(a)


def recommended_alpha(previews: list[dict], entry_id: str | None = None) -> tuple[float | None, list[float]]:
    """(recommended α, α values swept) from the params a sweep stored with its previews.

    A sweep of two LoRAs stores the second one's strengths as ``alphas2``; ``entry_id`` picks the list.
    """
    def num(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    rec, alphas = None, []
    for p in previews:
        params = p.get("params") or {}
        keys = ["alphas", "alpha", "scales"]
        loras = params.get("loras")
        if entry_id and isinstance(loras, list) and len(loras) > 1 and isinstance(loras[1], dict) \
                and loras[1].get("id") == entry_id:
            keys = ["alphas2"]
        for key in ("recommended_alpha", "recommended", "best_alpha"):
            if num(params.get(key)) and rec is None:
                rec = float(params[key])
        for key in keys:
            v = params.get(key)
            for x in (v if isinstance(v, list) else [v]):
                if num(x) and float(x) not in alphas:
                    alphas.append(float(x))
    return rec, sorted(alphas)


def front_matter(entry: dict, *, base_model: str | None, triggers: list[str], widget: list[dict],
                 extra_tags: list[str] = ()) -> dict:
    base = entry.get("base") or "unknown"
    tags = ["text-to-image", "stable-diffusion"]
    tags += ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"] if base == "sdxl" else \
        ["stable-diffusion-diffusers"]
    tags += ["lora", "diffusers", "template:sd-lora"]
    for t in [entry.get("kind"), entry.get("type"), *(entry.get("tags") or []), *extra_tags]:
        if t and isinstance(t, str) and t not in tags:
            tags.append(t)
    fm: dict[str, Any] = {}
    if base_model:
        fm["base_model"] = base_model
    fm["tags"] = tags
    fm["instance_prompt"] = ", ".join(triggers) if triggers else None
    fm["license"] = LICENSES.get(base, "other")
    if widget:
        fm["widget"] = widget
    fm["library_name"] = "diffusers"
    return fm


def _dump_yaml(fm: dict) -> str:
    import yaml

    return yaml.safe_dump(fm, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def render(plan: dict) -> str:
    """README.md text of a push ``plan`` (built by :func:`lorahub.hub.push.plan_push`)."""
    main = plan["main"]
    entry = main["entry"]
    base = entry.get("base") or "unknown"
    triggers = plan["triggers"]
    rec, swept = plan["alpha"], plan["alphas"]
    fm = front_matter(entry, base_model=plan["base_model"], triggers=triggers, widget=plan["widget"],
                      extra_tags=plan.get("tags", []))
    L: list[str] = ["---", _dump_yaml(fm).rstrip("\n"), "---", "", f"# {entry['name']}", ""]
    kind = entry.get("kind") or "lora"
    what = "Textual-inversion embedding" if kind == "textual-inversion" else f"{kind.upper() if kind != 'lora' else 'LoRA'} adapter"
    rank = entry.get("rank")
    bits = [f"{what} for {FAMILY_NAMES.get(base, base)}"]
    if plan["base_model"]:
        bits.append(f"(base model `{plan['base_model']}`)")
    L.append(" ".join(bits) + ".")
    details = []
    if rank:
        details.append(f"rank {rank}" if not entry.get("rank_max") or entry.get("rank_min") == entry.get("rank_max")
                       else f"rank {entry.get('rank_min')}–{entry.get('rank_max')}")
    if entry.get("alpha") is not None:
        details.append(f"network alpha {_fmt_alpha(entry['alpha'])}")
    if entry.get("parts"):
        details.append("trains " + ", ".join(entry["parts"]))
    if entry.get("type"):
        details.append(f"type: {entry['type']}")
    if details:
        L += ["", "; ".join(details[:1]).capitalize() + ("; " + "; ".join(details[1:]) if details[1:] else "") + "."]
    if entry.get("description"):
        L += ["", str(entry["description"]).strip()]

    L += ["", "## Trigger words", ""]
    if triggers:
        L.append("Use " + ", ".join(f"`{t}`" for t in triggers) + " in the prompt to activate it.")
    else:
        L.append("No trigger words are recorded for this adapter.")

    L += ["", "## Recommended strength", ""]
    if rec is not None:
        L.append(f"Recommended α (LoRA scale) from a lorahub sweep: **{_fmt_alpha(rec)}**"
                 + (f" (swept α = {', '.join(_fmt_alpha(a) for a in swept)})." if swept else "."))
    elif swept:
        L.append(f"A lorahub sweep rendered α = {', '.join(_fmt_alpha(a) for a in swept)} (see the images); "
                 "no single value was recorded as best.")
    else:
        L.append("No sweep was recorded; start at α = 1.0 and lower it if the effect is too strong.")

    L += ["", "## Files", "", "| file | form | for |", "|---|---|---|"]
    for f in plan["files"]:
        if f["role"] == "preview":
            continue
        L.append(f"| `{f['path']}` | {f['form']} | {f['for']} |")

    alpha = _fmt_alpha(rec if rec is not None else 1.0)
    pipe_cls = "StableDiffusionXLPipeline" if base == "sdxl" else "StableDiffusionPipeline"
    repo = plan["repo"]
    prompt = (", ".join(triggers) + ", " if triggers else "") + "a photo"
    L += ["", "## Use with diffusers", "", "```python", "import torch",
          f"from diffusers import {pipe_cls}", "",
          f"pipe = {pipe_cls}.from_pretrained(\"{plan['base_model'] or 'BASE_MODEL'}\", torch_dtype=torch.float16).to(\"cuda\")"]
    diff = plan.get("diffusers_file")
    if diff:
        L.append(f"pipe.load_lora_weights(\"{repo}\", weight_name=\"{diff}\")")
    for emb in plan.get("embeddings", []):
        tok = emb["token"]
        L.append(f"pipe.load_textual_inversion(\"{repo}\", weight_name=\"{emb['path']}\", token=\"{tok}\")")
    scale = f", cross_attention_kwargs={{\"scale\": {alpha}}}" if diff else ""
    L += [f"image = pipe(\"{prompt}\"{scale}).images[0]", "```"]
    if not diff and kind != "textual-inversion":
        L += ["", f"diffusers cannot load this {kind} adapter directly; use the webui file below."]

    L += ["", "## Use in the AUTOMATIC1111 / Forge webui", ""]
    webui = plan.get("webui_file")
    if webui:
        stem = webui.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        L.append(f"Download `{webui}` into `models/Lora/` and add `<lora:{stem}:{alpha}>` to the prompt"
                 + (f" together with {', '.join(f'`{t}`' for t in triggers)}." if triggers else "."))
    for emb in plan.get("embeddings", []):
        stem = emb["path"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        L.append(f"Download `{emb['path']}` into `embeddings/` and write `{stem}` in the prompt.")

    L += ["", "## Lineage", ""]
    if plan["lineage"]:
        for item in plan["lineage"]:
            parent = item.get("parent_name") or item.get("parent")
            pid = f" (`{item['parent_id']}`)" if item.get("parent_id") else ""
            detail = item.get("detail") or {}
            det = ", ".join(f"{k}={v}" for k, v in sorted(detail.items()) if isinstance(v, (str, int, float)))
            L.append(f"- {item['relation']} **{parent}**{pid}" + (f": {det}" if det else ""))
    else:
        L.append("No training or merge lineage is recorded.")

    L += ["", "## Hashes", "", "| file | SHA256 | AutoV2 | BLAKE3 | CRC32 |", "|---|---|---|---|---|"]
    for f in plan["files"]:
        e = f.get("entry")
        if f["role"] in ("original", "embedding") and e is not None:
            L.append(f"| `{f['path']}` | `{(e.get('sha256') or '-').upper()}` | `{(e.get('autov2') or '-').upper()}` "
                     f"| `{e.get('blake3') or '-'}` | `{(e.get('crc32') or '-').upper()}` |")
    if diff and plan.get("diffusers_converted"):
        L.append("")
        L.append(f"`{diff}` was converted by lorahub from `{plan['webui_file']}` (same weights, diffusers key names).")
    L += ["", "---", "", "Card written by lorahub from its local registry.", ""]
    conv = {f["path"]: {"from": f["from_sha256"], "dialect": f["dialect"]}
            for f in plan["files"] if f["role"] == "converted"}
    if conv:
        L += [f"<!-- lorahub-converted: {json.dumps(conv, sort_keys=True)} -->", ""]
    return "\n".join(L)


def converted_marker(text: str) -> dict:
    """The ``lorahub-converted`` record of a card we wrote: {path: {"from": sha256, "dialect": d}}."""
    m = re.search(r"<!-- lorahub-converted: (\{.*?\}) -->", text or "")
    if not m:
        return {}
    try:
        data = json.loads(m.group(1))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
