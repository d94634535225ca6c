"""Where a kohya config's images go in the recipe: the dataset config's subsets as `data.subsets`, or (without
them) one image folder and DreamBooth's class folder; DreamBooth's prompts from kohya's `class_tokens` or its
`N_sks dog` folder names. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path

from sdtune.adapters.images import image_files, kohya_folder
from sdtune.trainers.tools.kohya_inputs import KohyaImportError, Subset
from sdtune.trainers.tools.kohya_keys import rule_for
from sdtune.trainers.tools.kohya_rules import Map
from sdtune.trainers.tools.kohya_translation import Translation, apply_rule

# -- the dataset config's subsets ------------------------------------------------------------------------------------


def apply_subsets(tr: Translation, subsets: list[Subset], source: str):
    """Each subset as a `data.subsets` entry, its keys under their kohya names (the schema decides which exist)."""
    entries = []
    for i, subset in enumerate(subsets):
        scratch = Translation(method_type=tr.method_type)  # one entry's keys, as data.subsets.KEY
        for key, (value, label) in subset.keys.items():
            rule = rule_for(key, gui=False)
            if isinstance(rule, Map):  # a subset key keeps kohya's name (flip_aug is random_flip, as in data:)
                rule = Map((f"data.subsets.{'random_flip' if key == 'flip_aug' else key}",), rule.convert, rule.note)
            apply_rule(scratch, key, value, rule, source, label=label)
        entries.append(scratch.recipe.get("data", {}).get("subsets", {}))
        for label, dotted in scratch.mapped:
            name = dotted.rsplit(".", 1)[-1]
            tr.mapped.append((label, f"data.subsets[{i}].{name}"))
            tr.origin[f"data.subsets[{i}].{name}"] = scratch.origin[dotted]
        # a [general] key every subset inherits is listed once, not once per subset
        tr.unsupported += [line for line in scratch.unsupported if line not in tr.unsupported]
        tr.ignored += [line for line in scratch.ignored if line not in tr.ignored]
    tr.recipe.setdefault("data", {})["subsets"] = entries


def single_folder(tr: Translation, subsets: list[Subset], source: str) -> tuple[Subset | None, Subset | None]:
    """Without `data.subsets` in the schema: one folder of images and one regularization folder, sdtune's
    DreamBooth prior preservation (kohya's is_reg: images of the class, trained at prior_loss_weight)."""
    main = [s for s in subsets if not s.is_reg]
    reg = [s for s in subsets if s.is_reg]
    why = "sdtune has no data.subsets yet: one image folder and one class folder"
    for extra in main[1:] + reg[1:]:
        for _, label in extra.own():
            tr.skip(label, "not supported", why)
    kept = {label for _, label in main[0].keys.values()} if main else set()
    inherited = {label for s in main[1:] + reg for _, label in s.keys.values() if ".subsets[" not in label}
    for label in sorted(inherited - kept):  # set above, overridden by the one folder that trains
        tr.skip(label, "not supported", why)
    return (main[0] if main else None), (reg[0] if reg else None)


def apply_dataset(tr: Translation, wide: dict, main: Subset | None, reg: Subset | None, source: str):
    """The single-folder dataset (no `data.subsets` yet): the instance subset's keys as data.*, the reg subset as the
    DreamBooth class folder (read in `apply_dreambooth`)."""
    for key, (value, label) in wide.items():
        apply_rule(tr, key, value, rule_for(key, gui=False), source, label=label)
    for key, (value, label) in (main.keys if main else {}).items():
        if key == "class_tokens" and tr.method_type == "dreambooth":
            continue  # the instance prompt
        if key == "is_reg":
            tr.skip(label, "ignored", "false: the images to learn")
        elif key == "class_tokens":
            tr.skip(label, "not supported", "sdtune has no data.subsets yet: the caption of images without one")
        else:
            apply_rule(tr, key, value, rule_for(key, gui=False), source, label=label)
    for key, (_value, label) in (reg.keys if reg else {}).items():
        if ".subsets[" not in label:
            continue  # inherited from [general] or [[datasets]]: reported with the instance subset
        targets = {
            "image_dir": "method.class_data_dir",
            "is_reg": "method.with_prior_preservation",
            "class_tokens": "method.class_prompt",
        }
        if key in targets:
            tr.mapped.append((label, targets[key]))
        else:
            tr.skip(label, "ignored", "class images train on method.class_prompt with the instance images' settings")


# -- DreamBooth: the prompts kohya takes from class_tokens or `N_sks dog` folder names ------------------------------


def _look(folder, may_read) -> Path | None:
    """`folder` if it is one; `may_read(path)` raises for a folder the caller must not read (the studio's rule)."""
    if may_read is not None:
        may_read(str(folder))
    root = Path(str(folder)).expanduser()
    return root if root.is_dir() else None


def _folder_tokens(folder, may_read) -> str | None:
    """The tokens of the first kohya `N_tokens` folder in `folder` (a DreamBooth train or reg dir), if it exists."""
    root = _look(folder, may_read)
    if root is None:
        return None
    names = sorted(child.name for child in root.iterdir() if child.is_dir() and kohya_folder(child.name))
    return kohya_folder(names[0])[1] if names else None


def apply_dreambooth(tr: Translation, train_dir, tokens: tuple, reg: tuple, source: str, full: bool, may_read=None):
    """instance_prompt (+ identifier), class prompt and folder, and prior preservation, as kohya's DreamBooth.
    `tokens` is (class_tokens, its label) of the instance subset or (None, None); `reg` is (folder, class_tokens)."""
    class_tokens, label = tokens
    prompt = class_tokens or (train_dir and _folder_tokens(train_dir, may_read))
    if not prompt:
        raise KohyaImportError(
            f"{source}: train_data_dir: DreamBooth needs the subject's tokens: a `N_sks dog` folder in it, or "
            "class_tokens in a --dataset-config subset"
        )
    where = f"{label} = {json.dumps(prompt)}" if class_tokens else f"the `N_{prompt}` folder in train_data_dir"
    settings = [
        ("method.instance_prompt", prompt, f"from {where}: kohya's caption of images without one"),
        ("method.identifier", prompt.split()[0], "the first word of the instance prompt names the subject"),
        ("method.use_captions", True, "kohya trains on an image's own caption where it has one"),
        ("method.lora", not full, "train_db.py fine-tunes the whole model" if full else "train_network.py: a LoRA"),
    ]
    folder, reg_tokens = reg
    if folder:
        class_prompt = reg_tokens or _folder_tokens(folder, may_read) or " ".join(prompt.split()[1:]) or prompt
        root = _look(folder, may_read)
        count = len(image_files(root)) if root else 0
        settings += [
            ("method.with_prior_preservation", True, "kohya trains the regularization images at prior_loss_weight"),
            ("method.class_prompt", class_prompt, "the regularization folder's class tokens"),
        ] + ([("method.num_class_images", count, "every image of the reg folder, none generated")] if count else [])
    for dotted, value, why in settings:
        tr.put(label or "train_data_dir", dotted, value, source, record=False)
        tr.origin[dotted] = why
    if class_tokens:
        tr.mapped.append((label, "method.instance_prompt"))
