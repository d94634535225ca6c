"""The model card of a published adapter: YAML metadata (base_model, license, tags, instance_prompt, widget), trigger
words, usage for diffusers and A1111/ComfyUI, the recipe, the dataset fingerprint and the scores, with local paths
written as `<local: name>`.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtune.adapters.leaks import redact_paths
from sdtune.adapters.manifest import LYCORIS_KINDS, adapter_kind, validation_prompts

WIDGET_IMAGES = 4


def _base_model(manifest) -> str | None:
    """The base as a Hub id for `base_model`; a local or toy base has none (the card names it in words)."""
    return manifest.base.name_or_path if manifest.base.kind == "hub" else None


def widget_prompts(manifest, limit: int = WIDGET_IMAGES) -> list[str]:
    prompts = validation_prompts(manifest.recipe) or manifest.trigger_words or ["a photo"]
    return list(dict.fromkeys(prompts))[:limit]


def _tags(manifest) -> list[str]:
    tags = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "sdtune"]
    kind = {"lora": ["lora"], "dreambooth": ["dreambooth"], "controlnet": ["controlnet"]}.get(manifest.method, [])
    if manifest.method == "dreambooth" and "peft" in manifest.files:
        kind.append("lora")
    if adapter_kind(manifest) in LYCORIS_KINDS:  # the Hub's LyCORIS tags, beside lora (A1111 lists them as LoRAs)
        kind += ["lycoris", adapter_kind(manifest)]
    if "embedding" in manifest.files:  # a textual inversion, or the embedding of a pivotal-tuning LoRA
        kind += ["textual-inversion", "embedding"]
    return kind + tags + ["template:sd-lora"] * ("lora" in kind)


def _usage(manifest, repo: str, files: dict[str, str]) -> str:
    base = _base_model(manifest) or (
        "path/to/sdtune/adapters/toy_base"  # the toy base ships with sdtune, nowhere else
        if manifest.base.kind == "toy"
        else "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    prompt = widget_prompts(manifest, 1)[0]
    if manifest.method == "controlnet":
        return (
            "```python\nimport torch\nfrom diffusers import ControlNetModel, StableDiffusionControlNetPipeline\n"
            f'controlnet = ControlNetModel.from_pretrained("{repo}", torch_dtype=torch.float16)\n'
            f'pipe = StableDiffusionControlNetPipeline.from_pretrained("{base}", controlnet=controlnet, '
            'torch_dtype=torch.float16).to("cuda")\n'
            f'image = pipe("{prompt}", image=condition).images[0]  # condition: a PIL conditioning image\n```\n\n'
            "**A1111 / ComfyUI**: put the single `.safetensors` file in `models/ControlNet` "
            "(ComfyUI: `models/controlnet`) and pick it in the ControlNet unit / `ControlNetLoader` node.\n"
        )
    lines = ["```python", "import torch", "from diffusers import StableDiffusionPipeline", ""]
    lines.append(f'pipe = StableDiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")')
    if "peft" in files and adapter_kind(manifest) in LYCORIS_KINDS:  # peft's adapter folders; diffusers loads none
        lines[1:1] = ["from peft import PeftModel"]
        lines.append(f'pipe.unet = PeftModel.from_pretrained(pipe.unet, "{repo}", subfolder="{files["peft"]}/unet")')
    elif "peft" in files:
        lines.append(f'pipe.load_lora_weights("{repo}", weight_name="{files["peft"]}")')
    lines += [f'image = pipe("{prompt}").images[0]', "```", ""]
    if "kohya" in files:
        stem = Path(files["kohya"]).stem
        lines.append(
            f"**AUTOMATIC1111 / Forge**: download `{files['kohya']}` into `models/Lora` and write "
            f"`<lora:{stem}:1>` in the prompt. **ComfyUI**: put it in `models/loras` and load it with a "
            "`LoraLoader` node between the checkpoint and the sampler."
        )
    if "embedding" in files:
        lines.insert(-3, f'pipe.load_textual_inversion("{repo}", weight_name="{files["embedding"]}")')
    if "a1111" in files:
        name = Path(files["a1111"]).stem
        lines.append(
            f"**AUTOMATIC1111 / Forge**: download `{files['a1111']}` into `embeddings/` and write `{name}` in the "
            f"prompt. **ComfyUI**: put it in `models/embeddings` and write `embedding:{name}` in the prompt."
        )
    if "single_file" in files:
        lines.append(
            f"**A1111 / ComfyUI**: `{files['single_file']}` is a full checkpoint (`models/Stable-diffusion`)."
        )
    return "\n".join(lines) + "\n"


def card_text(manifest, repo: str, files: dict[str, str], widget: list[dict], license: str) -> str:
    """The model card: YAML metadata through huggingface_hub's ModelCardData, then the text."""
    from huggingface_hub import ModelCardData

    trigger = ", ".join(manifest.trigger_words)
    data = ModelCardData(
        base_model=_base_model(manifest),
        license=license,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=_tags(manifest),
        instance_prompt=trigger or None,
        widget=widget or None,
    )
    base = _base_model(manifest) or (
        "the sdtune toy base (64 px, for tests and demos: not loadable by other tools)"
        if manifest.base.kind == "toy"
        else f"a local {manifest.base.kind} base (`{Path(manifest.base.name_or_path).name}`)"
    )
    method = {"lora": "LoRA", "dreambooth": "DreamBooth", "controlnet": "ControlNet"}.get(manifest.method, "")
    if adapter_kind(manifest) in LYCORIS_KINDS:
        method = f"LyCORIS {LYCORIS_KINDS[adapter_kind(manifest)]}"
    method = "textual-inversion" if manifest.method == "textual_inversion" else method
    sections = [
        f"---\n{data.to_yaml()}\n---\n",
        f"# {manifest.name}\n",
        f"A {method or manifest.method} adapter for Stable Diffusion v1-5, {_made_how(manifest.origin)} {base} "
        f"(base sha256 `{manifest.base.hash[:16]}...`).\n",
        f"## Trigger words\n\n{'Use `' + trigger + '` in the prompt.' if trigger else 'None.'}\n",
        "## Use it\n\n" + _usage(manifest, repo, files),
        "## Files\n\n" + "\n".join(f"- `{f}` ({fmt})" for fmt, f in files.items()) + "\n",
    ]
    if manifest.scores:
        scores = json.dumps(redact_paths(manifest.scores), indent=2, default=str)
        sections.append("## Scores\n\n```json\n" + scores + "\n```\n")
    sections.append(_training_section(manifest))
    return "\n".join(sections)


def _made_how(origin: dict | None) -> str:
    """How the adapter came to be, as the card's first sentence says it."""
    origin = origin or {}
    if origin.get("kind") == "merged":
        parents = ", ".join(f"`{p}` x {w:g}" for p, w in zip(origin["parents"], origin["weights"]))
        return f"made by sdtune ({origin['merge_method']} of {parents}) for"
    if origin.get("kind") == "imported":
        return f"imported into sdtune from `{Path(origin['source']).name}` ({origin['format']}) and checked against"
    return "trained with sdtune on"


def _training_section(manifest) -> str:
    """What the adapter was trained on and with; for a merge or an import, what it was made from instead."""
    origin = manifest.origin or {}
    facts = {k: v for k, v in (manifest.training or {}).items() if not isinstance(v, (dict, list))}
    if origin.get("kind") == "merged":
        facts |= {"merge method": origin["merge_method"], **(origin.get("params") or {})}
        facts["parents"] = ", ".join(f"{p} (weight {w:g})" for p, w in zip(origin["parents"], origin["weights"]))
    if origin.get("kind") == "imported":
        facts |= {"source file": Path(origin["source"]).name, "format": origin["format"]}
        facts |= {k: v for k, v in (origin.get("hashes") or {}).items() if isinstance(v, str)}
    labels = {"final_loss": "final loss (moving average of the step losses)", "seconds_per_step": "s/step (median)"}
    text = "## Training\n\n" + "".join(f"- {labels.get(k, k)}: {v}\n" for k, v in facts.items())
    dataset, recipe = redact_paths(manifest.dataset), redact_paths(manifest.recipe)
    if dataset:
        text += f"\nDataset fingerprint `{dataset.get('fingerprint', 'n/a')}`:\n\n```json\n"
        text += json.dumps(dataset, indent=2, default=str) + "\n```\n"
    if recipe:
        text += "\nRecipe:\n\n```json\n" + json.dumps(recipe, indent=2, default=str) + "\n```\n"
    return text
