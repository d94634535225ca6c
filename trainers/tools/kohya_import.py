"""`sdtune recipe from-kohya`: an sd-scripts or kohya_ss training config becomes a commented sdtune recipe.

    sdtune recipe from-kohya my_lora.toml -o recipe.yaml                 # sd-scripts `--config_file` TOML
    sdtune recipe from-kohya train.sh --dataset-config dataset.toml -o recipe.yaml   # its command line
    sdtune recipe from-kohya "SD15 - my preset.json" -o recipe.yaml      # a kohya_ss GUI preset

Nothing is dropped without a word: every key of the inputs is mapped to the recipe key it means (the recipe says
where each value came from), or listed at the top of the recipe and in the report as "not supported: KEY (why)" or
"ignored: KEY (no effect in sdtune, because ...)". The key table is `kohya_keys.py`; a key it maps to a recipe key
the schema does not have yet is "not supported" until that key lands, with no change here. Torch-free.
"""

from __future__ import annotations

import json
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tomllib
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from sdtune.adapters.atomic import write_text_atomic
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.images import image_files, kohya_folder
from sdtune.trainers.core.recipe import Recipe, RecipeError, recipe_from_dict
from sdtune.trainers.tools.kohya_keys import NETWORK_ARGS, Ignore, Map, Skip, Unsupported, rule_for, to_float


class KohyaImportError(SdtuneError, ValueError):
    """An input the importer cannot read; one line naming the file and the key."""


# sd-scripts' defaults where sdtune's differ: a config that leaves them out trains with these in sd-scripts.
KOHYA_DEFAULTS = {
    "network_dim": 4,
    "network_alpha": 1,
    "learning_rate": 2e-6,
    "max_train_steps": 1600,
    "enable_bucket": False,
    "caption_extension": ".caption",
}
# GUI fields where 0 means "unset" (the GUI passes them to sd-scripts only when non-zero).
GUI_ZERO_IS_UNSET = {
    "clip_skip", "ip_noise_gamma", "max_timestep", "min_timestep", "max_train_epochs", "max_train_steps",
    "min_snr_gamma", "multires_noise_iterations", "noise_offset", "sample_every_n_epochs", "sample_every_n_steps",
    "save_every_n_epochs", "save_every_n_steps", "save_last_n_steps", "save_last_n_steps_state", "save_last_n_epochs",
    "save_last_n_epochs_state", "seed", "stop_text_encoder_training", "unet_lr", "text_encoder_lr", "v_pred_like_loss",
    "vae_batch_size", "lr_warmup_steps", "lr_warmup", "adaptive_noise_scale", "lr_scheduler_num_cycles",
    "lr_scheduler_power", "conv_dim", "conv_alpha", "network_dropout", "caption_dropout_every_n_epochs",
}  # fmt: skip
KOHYA_MODULES = {"networks.lora": "lora", "networks.loha": "loha", "networks.lokr": "lokr"}  # sd-scripts' own
GUI_TYPES = {"Standard": "lora", "Kohya LoCon": "locon", "LoCon": "locon", "LyCORIS/LoCon": "locon",
             "LyCORIS/LoHa": "loha", "Kohya LoHa": "loha", "LyCORIS/LoKr": "lokr", "Kohya LoKr": "lokr"}  # fmt: skip


# -- reading the inputs ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One input, as sd-scripts would see it: a flat dict of argument names (GUI presets keep their field names)."""

    file: Path
    kind: str  # "toml" | "flags" | "gui"
    args: dict[str, Any]
    script: str | None = None  # the training script a command line names


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise KohyaImportError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KohyaImportError(f"{path}: not UTF-8 text") from None


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise KohyaImportError(f"{path}: not valid TOML ({exc})") from None


def parse_flags(text: str, file: Path) -> tuple[str | None, dict[str, Any]]:
    """(script, args) of an sd-scripts command line: `--key=value`, `--key value`, `--key v1 v2` (a list), `--flag`;
    `\\` and `^` line continuations; everything before the `.py` script (accelerate's own flags) is not its args."""
    text = text.replace("\\\r\n", " ").replace("\\\n", " ").replace("^\r\n", " ").replace("^\n", " ")
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as exc:
        raise KohyaImportError(f"{file}: cannot split the command line ({exc})") from None
    scripts = [i for i, token in enumerate(tokens) if token.endswith(".py")]
    script = Path(tokens[scripts[0]]).name if scripts else None
    args: dict[str, Any] = {}
    key = None
    for token in tokens[scripts[0] + 1 if scripts else 0 :]:
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            args[key] = value if value else True
        elif key is None:
            raise KohyaImportError(f"{file}: {token!r}: expected --key value arguments")
        elif args[key] is True:
            args[key] = token
        else:
            args[key] = [*(args[key] if isinstance(args[key], list) else [args[key]]), token]
    return script, args


def read_config(path: str | Path) -> Source:
    """An sd-scripts TOML, a command line in a .sh/.txt/.bat/.ps1 file, or a kohya_ss GUI JSON preset."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        data = _read_toml(path)
        if "datasets" in data or "general" in data:
            raise KohyaImportError(
                f"{path}: a dataset config ([general], [[datasets]]): pass it with --dataset-config"
            )
        flat = {}  # sd-scripts flattens the sections of a config file into one namespace
        for key, value in data.items():
            flat.update(value if isinstance(value, dict) else {key: value})
        return Source(path, "toml", flat)
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as exc:
            raise KohyaImportError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise KohyaImportError(f"{path}: a kohya_ss preset is a JSON object of settings")
        return Source(path, "gui", data)
    if suffix in (".sh", ".txt", ".bat", ".ps1", ".cmd"):
        script, args = parse_flags(_read_text(path), path)
        # --config_file: its keys under the flags (the command line wins, as in sd-scripts)
        if isinstance(args.get("config_file"), str):
            named = Path(args["config_file"]).expanduser()
            named = named if named.is_absolute() else path.parent / named
            args = {**read_config(named.with_suffix(".toml")).args, **args}
        return Source(path, "flags", args, script)
    raise KohyaImportError(f"{path}: expected an sd-scripts .toml, a command line (.sh/.txt) or a kohya_ss .json")


# -- the schema: which recipe keys exist today ----------------------------------------------------------------------


def _models(annotation) -> list[type[BaseModel]]:
    """The model classes an annotation may hold (through Optional, Union, Annotated, list)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Annotated:
        return _models(args[0])
    if args:
        return [model for arg in args for model in _models(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def method_types() -> dict[str, type[BaseModel]]:
    """method.type -> its recipe class, as the schema has them now."""
    return {model.model_fields["type"].default: model for model in _models(Recipe.model_fields["method"].annotation)}


def schema_field(dotted: str, method_type: str):
    """The pydantic field at `section.key` (`data.subsets.image_dir` looks inside the list's items), or None."""
    model: type[BaseModel] = Recipe
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            return None
        if i == len(parts) - 1:
            return info
        found = [method_types()[method_type]] if part == "method" else _models(info.annotation)
        if not found:
            return None
        model = found[0]
    return None


def check_value(dotted: str, method_type: str, value):
    """The value as the schema takes it; raises Skip naming what sdtune lacks."""
    info = schema_field(dotted, method_type)
    if info is None:
        raise Skip("not supported", f"sdtune has no {dotted} yet")
    try:
        kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"]
        raise Skip("not supported", f"sdtune's {dotted} refuses {value!r}: {message}") from None


# -- translating ----------------------------------------------------------------------------------------------------


@dataclass
class Translation:
    """The recipe, where each of its keys came from, and the three report lists."""

    recipe: dict = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # "data.resolution" -> "resolution = 512 (note)"
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (input key, recipe key)
    unsupported: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    method_type: str = "lora"

    def reported(self) -> set[str]:
        """Every input key that got a word (its first word is the key)."""
        return {key for key, _ in self.mapped} | {line.split(" ", 1)[0] for line in self.unsupported + self.ignored}

    def drop(self, dotted: str, why: str, kind: str = "ignored"):
        """Takes a mapped key back out of the recipe and lists what set it as `kind` ("ignored": no effect here)."""
        section, key = dotted.split(".")
        self.recipe.get(section, {}).pop(key, None)
        self.origin.pop(dotted, None)
        for label in [k for k, d in self.mapped if d == dotted]:
            self.mapped.remove((label, dotted))
            self.skip(label, kind, why)

    def skip(self, key: str, kind: str, why: str):
        (self.ignored if kind == "ignored" else self.unsupported).append(f"{key} ({why})")

    def put(self, key: str, dotted: str, value, source: str, note: str = "", shown=None, record: bool = True):
        """Sets `dotted` (after the schema check) and records where it came from; a failed check is a report line.
        A later key for the same recipe key wins (a dataset config over the command line, as in sd-scripts), and the
        earlier one is listed as ignored."""
        try:
            value = check_value(dotted, self.method_type, value)
        except Skip as skip:
            return self.skip(key, skip.kind, skip.why)
        for earlier in [k for k, d in self.mapped if d == dotted and k != key]:
            self.mapped.remove((earlier, dotted))
            self.skip(earlier, "ignored", f"{key} sets {dotted} and wins, as in sd-scripts")
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        node = self.recipe
        *sections, last = dotted.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
        shown = value if shown is None else shown
        self.origin[dotted] = f"{source}: {key} = {json.dumps(shown, default=str)}" + (f" ({note})" if note else "")
        if record:
            self.mapped.append((key, dotted))


def _empty(value) -> bool:
    return value is None or value == "" or value == []


def apply_rule(tr: Translation, key: str, value, rule, source: str, label: str | None = None):
    """One key through its rule into the recipe or a report list."""
    label = label or key
    if rule is None:
        return tr.skip(label, "not supported", "unknown to sdtune's importer")
    if _empty(value):
        return tr.skip(label, "ignored", "empty: left unset")
    if isinstance(rule, Ignore):
        return tr.skip(label, "ignored", rule.why)
    if isinstance(rule, Unsupported):
        return tr.skip(label, "not supported", rule.why)
    try:
        converted = rule.convert(value) if rule.convert else value
    except Skip as skip:
        return tr.skip(label, skip.kind, skip.why)
    except (TypeError, ValueError) as exc:
        raise KohyaImportError(f"{source}: {label}: {value!r} is not valid here ({exc})") from None
    if not rule.to:
        return tr.skip(label, "ignored", "no effect in sdtune")
    targets = [t for t in rule.to if schema_field(t, tr.method_type) is not None] or [rule.to[0]]
    tr.put(label, targets[0], converted, source, rule.note, shown=value)


def key_value_list(value, source: str, key: str) -> list[tuple[str, str]]:
    """sd-scripts' `network_args` / `optimizer_args`: `["conv_dim=4", ...]` or one space-separated string."""
    items = value if isinstance(value, list) else shlex.split(str(value))
    pairs = []
    for item in items:
        name, sep, text = str(item).partition("=")
        if not sep:
            raise KohyaImportError(f"{source}: {key}: {item!r} is not key=value")
        pairs.append((name.strip(), text.strip().strip("\"'")))
    return pairs


def _literal(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# -- the method: network_module / LoRA_type, network_args, the script -----------------------------------------------


def _script_is_network(src: Source) -> bool:
    """True for train_network.py (a LoRA), False for train_db.py (a full DreamBooth fine-tune)."""
    if src.script is not None:
        if src.script not in ("train_network.py", "train_db.py"):
            raise KohyaImportError(
                f"{src.file}: {src.script}: sdtune imports SD v1-5 configs of train_network.py and train_db.py"
            )
        return src.script == "train_network.py"
    return any(not _empty(src.args.get(key)) for key in ("network_module", "LoRA_type"))


def _network_kind(args: dict, tr: Translation, source: str) -> tuple[str, dict[str, str]]:
    """("lora" | "locon" | "loha" | ..., the network_args as a dict); reports network_module / LoRA_type / algo."""
    net_args = dict(key_value_list(args.get("network_args") or [], source, "network_args"))
    if "LoRA_type" in args:
        kind = GUI_TYPES.get(str(args["LoRA_type"]), str(args["LoRA_type"]))
        tr.mapped.append(("LoRA_type", "method.type"))
    else:
        module = str(args.get("network_module", "networks.lora"))
        kind = KOHYA_MODULES.get(module, module)
        if module == "lycoris.kohya":  # LyCORIS's algo=lora is its LoCon (linear and conv layers)
            if "algo" in net_args:
                tr.mapped.append(("network_args.algo", "method.type"))
            kind = {"lora": "locon"}.get(net_args.get("algo", "lora"), net_args.pop("algo", "lora"))
            net_args.pop("algo", None)
        if kind == "lora" and "conv_dim" in net_args:  # networks.lora with conv_dim is kohya's LoCon (C3Lier)
            kind = "locon"
        if "network_module" in args:
            tr.mapped.append(("network_module", "method.type"))
    return kind, net_args


def _method_type(kind: str, tr: Translation) -> str:
    """The method a network kind trains in sdtune; one sdtune lacks trains a plain LoRA, and says so."""
    if kind in ("lora", "locon"):
        return "lora"
    if kind in method_types():
        return kind
    labels = [key for key, dotted in tr.mapped if dotted == "method.type"]
    tr.mapped = [(key, dotted) for key, dotted in tr.mapped if dotted != "method.type"]
    for label in labels:
        tr.skip(label, "not supported", f"sdtune has no method.type {kind} yet: this recipe trains a LoRA instead")
    return "lora"


def _network_args(net_args: dict, kind: str, args: dict, tr: Translation, source: str):
    """LoCon's conv rank, then every other network arg through its rule."""
    conv_dim = net_args.pop("conv_dim", args.get("conv_dim"))
    conv_alpha = net_args.pop("conv_alpha", args.get("conv_alpha"))
    where = "network_args." if "LoRA_type" not in args else ""
    label = "network_module" if "network_module" in args else "LoRA_type"
    if kind not in ("lora", "locon"):  # a method of its own: its args under their names, where the schema has them
        for name, value in (("conv_dim", conv_dim), ("conv_alpha", conv_alpha)):
            if value is not None:
                apply_rule(tr, name, _literal(str(value)), Map((f"method.{name}",)), source, label=where + name)
    elif kind == "locon":
        tr.put(
            label,
            "method.preset",
            "locon",
            source,
            "LoRA on the attention, feed-forward and conv layers",
            shown=args.get(label),
        )
        rank = to_float(args.get("network_dim", KOHYA_DEFAULTS["network_dim"]))
        for name, value in (("conv_dim", conv_dim), ("conv_alpha", conv_alpha)):
            if value is None:
                continue
            same = to_float(value) == to_float(args.get(name.replace("conv", "network"), rank))
            tr.skip(
                where + name,
                "ignored" if same else "not supported",
                "equal to the LoRA's own, which sdtune's locon preset uses"
                if same
                else "sdtune's locon preset gives the convs the LoRA's own rank and alpha",
            )
    else:
        tr.put(
            label,
            "method.preset",
            "attn+ff",
            source,
            "networks.lora adapts every linear layer of the transformer blocks",
            shown=args.get(label),
        )
        for name, value in (("conv_dim", conv_dim), ("conv_alpha", conv_alpha)):
            if value is not None and name in args:
                tr.skip(name, "ignored", f"LoRA_type {args.get('LoRA_type')} has no conv layers")
    for name, value in net_args.items():
        rule = NETWORK_ARGS.get(name) or (Map((f"method.{name}",)) if kind not in ("lora", "locon") else None)
        apply_rule(tr, name, _literal(value), rule, source, label=f"network_args.{name}")


# -- the dataset config: [general], [[datasets]], [[datasets.subsets]] ----------------------------------------------

# Keys of a [[datasets]] entry that apply to the whole dataset (sd-scripts' DATASET_ASCENDABLE_SCHEMA); every other
# key of [general] or [[datasets]] is inherited by each subset.
DATASET_KEYS = {
    "resolution",
    "batch_size",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "network_multiplier",
    "validation_seed",
    "validation_split",
    "resize_interpolation",
    "prior_loss_weight",
    "debug_dataset",
    "max_token_length",
}


@dataclass
class Subset:
    """One [[datasets.subsets]] entry with what it inherits: {key: (value, label)}, label naming where it was set."""

    keys: dict[str, tuple[Any, str]]

    def get(self, key: str, default=None):
        return self.keys.get(key, (default, None))[0]

    def own(self) -> list[tuple[Any, str]]:
        """(value, label) of the keys set in the subset itself; inherited ones are reported with the first subset."""
        return [(value, label) for value, label in self.keys.values() if ".subsets[" in label]

    @property
    def is_reg(self) -> bool:
        return bool(self.get("is_reg", False))


def read_dataset_config(path: str | Path) -> tuple[dict, list[Subset], list[str], list[str]]:
    """(dataset-wide keys, subsets with their inherited keys, labels of what sdtune cannot read (further datasets),
    labels of [general]/[[datasets]] keys that every subset sets for itself)."""
    path = Path(path)
    data = _read_toml(path)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        raise KohyaImportError(f"{path}: datasets: expected at least one [[datasets]] table")
    general = {k: (v, f"general.{k}") for k, v in data.get("general", {}).items()}
    first = {k: (v, f"datasets[0].{k}") for k, v in datasets[0].items() if k != "subsets"}
    unknown = [f"{key}" for key in data if key not in ("general", "datasets")]
    unknown += [f"datasets[{i}]" for i in range(1, len(datasets))]
    inherited = {**general, **first}
    wide = {k: v for k, v in inherited.items() if k in DATASET_KEYS}
    subsets = []
    for i, entry in enumerate(datasets[0].get("subsets", [])):
        own = {k: (v, f"datasets[0].subsets[{i}].{k}") for k, v in entry.items()}
        subsets.append(Subset({**{k: v for k, v in inherited.items() if k not in DATASET_KEYS}, **own}))
        if "image_dir" not in entry:
            raise KohyaImportError(f"{path}: datasets[0].subsets[{i}].image_dir: required (the subset's folder)")
    if not subsets:
        raise KohyaImportError(f"{path}: datasets[0].subsets: expected at least one [[datasets.subsets]] table")
    used = {label for subset in subsets for _, label in subset.keys.values()}
    shadowed = [label for key, (_, label) in inherited.items() if key not in DATASET_KEYS and label not in used]
    return wide, subsets, unknown, shadowed


def _subsets_in_schema() -> bool:
    return schema_field("data.subsets.image_dir", "lora") is not None


def _apply_subsets(tr: Translation, subsets: list[Subset], source: str):
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


def _single_folder(tr: Translation, subsets: list[Subset], source: str) -> tuple[Subset | None, Subset | None]:
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


def _dreambooth(tr: Translation, train_dir, tokens: tuple, reg: tuple, source: str, full: bool, may_read=None):
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


# -- one config (and its dataset config) into one recipe ------------------------------------------------------------

# Keys read by the steps above or below, never through the table alone.
_SPECIAL = {
    "network_module",
    "network_args",
    "LoRA_type",
    "conv_dim",
    "conv_alpha",
    "optimizer_args",
    "lr_warmup",
    "lr_warmup_steps",
    "additional_parameters",
    "reg_data_dir",
    "sample_prompts",
    "config_file",
    "dataset_config",
}


def _expand_gui(src: Source, tr: Translation) -> dict:
    """A GUI preset's extra flags (`additional_parameters`) join its keys; its noise switch picks one noise."""
    args = dict(src.args)
    if src.kind != "gui":
        return args
    extra = args.get("additional_parameters")
    if not _empty(extra):
        for key, value in parse_flags(f"x.py {extra}", src.file)[1].items():
            args[key] = value
    noise = args.get("noise_offset_type", "Original")
    for key in (
        ("noise_offset", "noise_offset_random_strength")
        if noise == "Multires"
        else ("multires_noise_iterations", "multires_noise_discount")
    ):
        if key in args and not _empty(args[key]):
            tr.skip(key, "ignored", f"the preset's noise_offset_type is {noise}")
            args[key] = None
    for key in GUI_ZERO_IS_UNSET:
        if key in args and str(args[key]).strip() in ("0", "0.0"):
            tr.skip(key, "ignored", "0: unset in the kohya_ss GUI")
            args[key] = None
    return args


def _optimizer_args(value, tr: Translation, source: str):
    """AdamW's betas, weight decay and eps become train.adam_*; everything else goes to the optimizer as is."""
    adam = str(tr.recipe.get("train", {}).get("optimizer", "adamw")).startswith("adamw")
    names = {"weight_decay": "train.adam_weight_decay", "eps": "train.adam_epsilon"}
    for name, text in key_value_list(value, source, "optimizer_args"):
        label, parsed = f"optimizer_args.{name}", _literal(text)
        if adam and name == "betas":
            betas = [float(b) for b in str(text).strip("()[]").split(",")]
            tr.put(label, "train.adam_beta1", betas[0], source, shown=text)
            tr.put(label, "train.adam_beta2", betas[1], source, shown=text)
        elif adam and name in names:
            tr.put(label, names[name], parsed, source)
        elif schema_field("train.optimizer_args", tr.method_type) is not None:
            args = tr.recipe.setdefault("train", {}).setdefault("optimizer_args", {})
            args[name] = parsed
            tr.origin["train.optimizer_args"] = f"{source}: optimizer_args (passed to the optimizer as keywords)"
            tr.mapped.append((label, "train.optimizer_args"))
        else:
            tr.skip(label, "not supported", "sdtune has no train.optimizer_args yet")


def _warmup(args: dict, tr: Translation, source: str):
    """lr_warmup_steps below 1 is a share of the steps (sd-scripts); the GUI's lr_warmup is a percent of them."""
    steps = tr.recipe.get("train", {}).get("max_train_steps", KOHYA_DEFAULTS["max_train_steps"])
    given = args.get("lr_warmup_steps")
    if not _empty(given):
        value = float(given)
        note = f"{value} of {steps} steps" if 0 < value < 1 else ""
        tr.put(
            "lr_warmup_steps",
            "train.lr_warmup_steps",
            round(value * steps) if note else int(value),
            source,
            note,
            shown=given,
        )
    elif "lr_warmup_steps" in args and "lr_warmup_steps" not in tr.reported():
        tr.skip("lr_warmup_steps", "ignored", "empty: left unset")
    percent = args.get("lr_warmup")
    if _empty(percent):
        if "lr_warmup" in args and "lr_warmup" not in tr.reported():
            tr.skip("lr_warmup", "ignored", "empty: left unset")
        return
    if not _empty(given):
        return tr.skip("lr_warmup", "ignored", "lr_warmup_steps is set and wins, as in the GUI")
    tr.put(
        "lr_warmup",
        "train.lr_warmup_steps",
        round(float(percent) * steps / 100),
        source,
        f"{percent}% of {steps} steps",
        shown=percent,
    )


def _gui_prompts(value, tr: Translation, source: str):
    """A GUI preset holds the sample prompts themselves, one a line, with sd-scripts' `--n` options after them."""
    lines = [line.strip() for line in str(value).splitlines() if line.strip() and not line.startswith("#")]
    prompts = [line.split(" --")[0].strip() for line in lines]
    tr.put("sample_prompts", "validation.prompts", prompts, source, shown=prompts)
    if any(" --" in line for line in lines):
        tr.skip(
            "sample_prompts.options", "not supported", "per-prompt --n/--w/--h/--s/--l/--d settings of a GUI preset"
        )


def _apply_dataset(tr: Translation, wide: dict, main: Subset | None, reg: Subset | None, source: str):
    """The single-folder dataset (no `data.subsets` yet): the instance subset's keys as data.*, the reg subset as the
    DreamBooth class folder (read in `_dreambooth`)."""
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


def _defaults(tr: Translation, args: dict, network: bool, source: str):
    """sd-scripts' defaults where sdtune's differ, for the keys the config leaves out (commented, not reported)."""
    given = {key for key, _ in tr.mapped} | {label.rsplit(".", 1)[-1] for label, _ in tr.mapped}
    for key, value in KOHYA_DEFAULTS.items():
        if key in given or key in args or (key.startswith("network_") and not network):
            continue
        rule = rule_for(key, gui=False)
        target = rule.to[0]
        if target in tr.origin:  # set by another key (unet_lr sets the learning rate)
            continue
        if key == "caption_extension" and "subsets" in tr.recipe.get("data", {}):  # each subset has its own
            continue
        tr.put(key, target, rule.convert(value), f"sd-scripts' default ({source} leaves {key} out)", record=False)
    if "method.train_text_encoder" not in tr.origin and tr.method_type in ("lora", "dreambooth"):
        tr.put(
            "network_train_unet_only" if network else "stop_text_encoder_training",
            "method.train_text_encoder",
            True,
            source,
            record=False,
        )
        tr.origin["method.train_text_encoder"] = (
            "sd-scripts' default: it trains the text encoder too unless told not to"
        )


def _validate(tr: Translation, source: str) -> Recipe:
    """The translated recipe through the recipe loader; a refusal names the kohya key it came from."""
    try:
        return recipe_from_dict(tr.recipe, "translated recipe")
    except RecipeError as exc:
        text = str(exc).removeprefix("translated recipe: ")
        path = text.split(":", 1)[0]
        origin = tr.origin.get(path)
        key = origin.split(": ", 1)[1].split(" = ")[0] if origin else "the translated recipe"
        raise KohyaImportError(f"{source}: {key}: sdtune refuses it: {text}") from None


def _containers(args: dict, tr: Translation, gui: bool, source: str):
    """Keys that hold other keys (each entry is reported by its own name) and a GUI preset's prompt text."""
    for name in ("additional_parameters", "network_args", "optimizer_args", "config_file"):
        if name in args and _empty(args[name]):
            tr.skip(name, "ignored", "empty: left unset")
        elif name in args:
            tr.mapped.append((name, "its entries, each listed by its own name"))
    if not _empty(args.get("optimizer_args")):
        _optimizer_args(args["optimizer_args"], tr, source)
    if "sample_prompts" in args:
        if gui and not _empty(args["sample_prompts"]):
            _gui_prompts(args["sample_prompts"], tr, source)
        else:
            apply_rule(tr, "sample_prompts", args["sample_prompts"], rule_for("sample_prompts", False), source)


def _dataset_file(src: Source, args: dict, given, tr: Translation, may_read) -> Path | None:
    """The dataset config: --dataset-config, else the one the config names (`dataset_config`, beside it)."""
    named = args.get("dataset_config")
    if _empty(named) or not isinstance(named, str):
        return Path(given) if given else None
    if given:
        tr.skip("dataset_config", "ignored", f"--dataset-config {given} is read instead")
        return Path(given)
    path = Path(named).expanduser()
    path = path if path.is_absolute() else src.file.parent / path
    if may_read is not None:
        may_read(str(path))
    tr.mapped.append(("dataset_config", "read as the dataset config"))
    return path


def translate(src: Source, dataset_file: str | Path | None = None, may_read=None) -> Translation:
    """One kohya config (and its dataset config) as a validated recipe dict, with its report. DreamBooth reads the
    `N_name` folder names and counts the class images on disk; `may_read(path)` may refuse a folder first."""
    tr = Translation()
    source = str(src.file)
    args = _expand_gui(src, tr)
    network = _script_is_network(src)
    dataset_file = _dataset_file(src, args, dataset_file, tr, may_read)
    wide, subsets, extra, shadowed = read_dataset_config(dataset_file) if dataset_file else ({}, [], [], [])
    dsource = str(dataset_file)
    use_subsets = bool(subsets) and _subsets_in_schema()
    main, reg = _single_folder(tr, subsets, dsource) if subsets and not use_subsets else (None, None)
    reg_dir = (reg.get("image_dir") if reg else None) or args.get("reg_data_dir") or None
    kind, net_args = _network_kind(args, tr, source) if network else ("full", {})
    tr.method_type = _method_type(kind, tr) if network else "dreambooth"
    if reg_dir and tr.method_type == "lora" and not use_subsets:
        tr.method_type = "dreambooth"
    tr.recipe["method"] = {"type": tr.method_type}
    if network:
        _network_args(net_args, kind, args, tr, source)
    if tr.method_type == "dreambooth":
        train_dir = main.get("image_dir") if main else args.get("train_data_dir")
        tokens = main.keys.get("class_tokens", (None, None)) if main else (None, None)
        reg_tokens = (reg_dir, reg.get("class_tokens") if reg else None)
        _dreambooth(tr, train_dir, tokens, reg_tokens, dsource if main else source, not network, may_read)
    if reg:
        tr.put(reg.keys["image_dir"][1], "method.class_data_dir", reg_dir, dsource, record=False)
    for key in sorted(args, key=lambda k: k == "unet_lr"):  # unet_lr wins over learning_rate for the U-Net
        if key in _SPECIAL or args[key] is None and key in tr.reported():
            continue
        if key == "prior_loss_weight" and tr.method_type != "dreambooth" and not use_subsets:
            tr.skip(key, "ignored", "it weighs the loss of regularization images, and there are none")
            continue
        apply_rule(tr, key, args[key], rule_for(key, src.kind == "gui"), source)
    if "reg_data_dir" in args:
        apply_rule(tr, "reg_data_dir", args["reg_data_dir"], rule_for("reg_data_dir", False), source)
    _containers(args, tr, src.kind == "gui", source)
    _warmup(args, tr, source)
    if use_subsets:
        for key, (value, label) in wide.items():
            apply_rule(tr, key, value, rule_for(key, gui=False), dsource, label=label)
        _apply_subsets(tr, subsets, dsource)
    elif subsets:
        _apply_dataset(tr, wide, main, reg, dsource)
    for label in extra:
        tr.skip(label, "not supported", "sdtune trains on one dataset: put its folders in the first one")
    for label in shadowed:
        tr.skip(label, "ignored", "every subset sets its own")
    _defaults(tr, args, network, source)
    data, train = tr.recipe.get("data", {}), tr.recipe.get("train", {})
    if data.get("keep_tokens") and not data.get("shuffle_caption"):  # sdtune refuses it; kohya lets it do nothing
        tr.drop("data.keep_tokens", "it only acts with shuffle_caption, which is off")
    if data.get("masked_loss") and not (data.get("alpha_mask") or data.get("mask_dir")):  # sd-scripts stops on it
        tr.drop("data.masked_loss", "no mask source: set alpha_mask, or conditioning_data_dir to a folder of masks")
    chosen = any(
        not _empty(args.get(k)) for k in ("optimizer_type", "optimizer", "use_8bit_adam", "use_lion_optimizer")
    )
    if chosen and "train.optimizer_type" not in tr.origin and train.get("learning_rate", 0) >= 0.1:
        # Prodigy and D-Adaptation take lr ~1; AdamW, sdtune's default in their place, would diverge at it
        tr.drop("train.learning_rate", "set for an optimizer sdtune lacks; too high for AdamW", "not supported")
    _validate(tr, source)
    return tr


# -- the commented recipe and the report ----------------------------------------------------------------------------


def _scalar(value) -> str:
    """One YAML value on one line (quoted where YAML 1.1 would misread it, e.g. `no`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n...\n").rstrip("\n")


def report_lines(tr: Translation) -> list[str]:
    """The report: the not-supported and ignored keys, one a line."""
    lines = [f"mapped: {len(tr.mapped)} keys into the recipe (each commented with its source)"]
    lines += [f"not supported: {line}" for line in tr.unsupported]
    lines += [f"ignored: {line}" for line in tr.ignored]
    return lines


def _block(name: str, value, comment_of, indent: str) -> list[str]:
    lines = [f"{indent}# {comment_of(name)}"] if comment_of(name) else []
    return lines + [f"{indent}{name}: {_scalar(value)}"]


def render(tr: Translation, inputs: list[str], shown_as: list[str] | None = None) -> str:
    """The recipe as YAML: the report at the top, and above each key where its value came from (by file name)."""
    out = [
        f"# Translated by `sdtune recipe from-kohya` from {', '.join(shown_as or inputs)}.",
        "# Check the lists below: these settings of the kohya config are not in this recipe.",
        "#",
    ]
    out += [f"# {line}" for line in report_lines(tr)] + [""]
    for section in ("base", "data", "method", "train", "validation", "output"):
        if section not in tr.recipe:
            continue
        out.append(f"{section}:")
        for key, value in tr.recipe[section].items():
            if section == "data" and key == "subsets":
                out.append("  subsets:")
                for i, entry in enumerate(value):
                    out.append("    -")
                    for name, item in entry.items():
                        out += _block(name, item, lambda n, i=i: tr.origin.get(f"data.subsets[{i}].{n}"), "      ")
                continue
            out += _block(key, value, lambda n, s=section: tr.origin.get(f"{s}.{n}"), "  ")
        out.append("")
    text = "\n".join(out)
    for path in inputs:
        text = text.replace(f"# {path}: ", f"# {Path(path).name}: ")
    return text


def import_kohya(
    config: str | Path,
    output: str | Path,
    dataset_config: str | Path | None = None,
    shown_as: list[str] | None = None,
    may_read=None,
) -> list[str]:
    """Translates `config` (+ `dataset_config`), writes the commented recipe to `output` atomically, and returns
    the report lines. Raises `KohyaImportError` (one line naming the file and key) for input it cannot read.
    `shown_as`: the inputs' names in the recipe's first line (an upload's own name, not its temp path); `may_read`:
    see `translate`."""
    tr = translate(read_config(config), dataset_config, may_read)
    inputs = [str(config)] + ([str(dataset_config)] if dataset_config else [])
    text = render(tr, inputs, shown_as)
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # a bug here, never the user's: say so in one line
        raise KohyaImportError(f"{config}: the rendered recipe is not valid YAML ({exc}); please report it") from None
    recipe_from_dict(parsed, str(output))
    write_text_atomic(Path(output), text)
    return report_lines(tr)
