"""`sdtune recipe from-kohya`: an sd-scripts or kohya_ss training config becomes a commented sdtune recipe.

    sdtune recipe from-kohya my_lora.toml -o recipe.yaml                 # sd-scripts `--config_file` TOML
    sdtune recipe from-kohya train.sh --dataset-config dataset.toml -o recipe.yaml   # its command line
    sdtune recipe from-kohya "SD15 - my preset.json" -o recipe.yaml      # a kohya_ss GUI preset

Nothing is dropped without a word: every key of the inputs is mapped to the recipe key it means (the recipe says
where each value came from), or listed at the top of the recipe and in the report as "not supported: KEY (why)" or
"ignored: KEY (no effect in sdtune, because ...)". The key table is `kohya_keys.py`; a key it maps to a recipe key
the schema does not have yet is "not supported" until that key lands, with no change here. Torch-free.

This module translates one config, step by step (`translate`), and writes the recipe (`import_kohya`); beside it:
    kohya_inputs.py       reading the inputs: TOML, command line, GUI JSON, the dataset config and its subsets
    kohya_translation.py  the recipe being built, the schema check of each key, one key through its rule
    kohya_dataset.py      the subsets as data.subsets or one folder, and DreamBooth's prompts and class folder
    kohya_render.py       the commented recipe and the report
"""

from __future__ import annotations

from pathlib import Path

import yaml

from sdtune.adapters.atomic import write_text_atomic
from sdtune.trainers.core.recipe import Recipe, RecipeError, parse_prompt_line, recipe_from_dict
from sdtune.trainers.tools.kohya_dataset import apply_dataset, apply_dreambooth, apply_subsets, single_folder
from sdtune.trainers.tools.kohya_inputs import (
    KohyaImportError,
    Source,
    Subset,
    parse_flags,
    read_config,
    read_dataset_config,
)
from sdtune.trainers.tools.kohya_keys import NETWORK_ARGS, rule_for
from sdtune.trainers.tools.kohya_render import render, report_lines
from sdtune.trainers.tools.kohya_rules import Map, to_bool, to_float, to_int
from sdtune.trainers.tools.kohya_translation import (
    Translation,
    apply_rule,
    check_value,
    is_empty,
    key_value_list,
    literal,
    method_types,
    schema_field,
    subsets_in_schema,
)

# The importer's names as they were before it was cut into modules: the studio and the tests import them from here.
__all__ = [
    "KohyaImportError",
    "Source",
    "Subset",
    "Translation",
    "apply_rule",
    "check_value",
    "import_kohya",
    "key_value_list",
    "method_types",
    "parse_flags",
    "read_config",
    "read_dataset_config",
    "render",
    "report_lines",
    "schema_field",
    "translate",
]


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
LYCORIS_ALGOS = ("loha", "lokr")  # method.algo of a LoRA recipe
GUI_TYPES = {"Standard": "lora", "Kohya LoCon": "locon", "LoCon": "locon", "LyCORIS/LoCon": "locon",
             "LyCORIS/LoHa": "loha", "Kohya LoHa": "loha", "LyCORIS/LoKr": "lokr", "Kohya LoKr": "lokr"}  # fmt: skip


# -- the method: network_module / LoRA_type, network_args, the script -----------------------------------------------


def _script_is_network(src: Source) -> bool:
    """True for train_network.py (a LoRA), False for train_db.py (a full DreamBooth fine-tune)."""
    if src.script is not None:
        if src.script not in ("train_network.py", "train_db.py"):
            raise KohyaImportError(
                f"{src.file}: {src.script}: sdtune imports SD v1-5 configs of train_network.py and train_db.py"
            )
        return src.script == "train_network.py"
    return any(not is_empty(src.args.get(key)) for key in ("network_module", "LoRA_type"))


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
    if kind in LYCORIS_ALGOS:  # a LoRA of another form: method.algo (the report says network_module -> method.algo)
        tr.mapped = [(key, "method.algo" if dotted == "method.type" else dotted) for key, dotted in tr.mapped]
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
    if kind in LYCORIS_ALGOS:  # LoHa/LoKr over the same layers as a LoRA: conv_dim adds the convs, as LoCon
        tr.put(label, "method.algo", kind, source, f"LyCORIS {kind}", shown=args.get(label), record=False)
        _lokr_settings(net_args, kind, args, tr, source, where)
        kind = "locon" if conv_dim is not None else "lora"
    if kind not in ("lora", "locon"):  # a method of its own: its args under their names, where the schema has them
        for name, value in (("conv_dim", conv_dim), ("conv_alpha", conv_alpha)):
            if value is not None:
                apply_rule(tr, name, literal(str(value)), Map((f"method.{name}",)), source, label=where + name)
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
        apply_rule(tr, name, literal(value), rule, source, label=f"network_args.{name}")


def _lokr_settings(net_args: dict, kind: str, args: dict, tr: Translation, source: str, where: str):
    """LoKr's factor and decompose_both (network args, or the GUI's own fields) -> method.factor/decompose_both."""
    settings = (
        ("factor", Map(("method.factor",), to_int), "-1"),
        ("decompose_both", Map(("method.decompose_both",), to_bool), "false"),
    )
    for name, rule, default in settings:
        value = net_args.pop(name, args.get(name))
        if value is None or is_empty(value):
            continue
        if kind != "lokr":  # the GUI writes LoKr's fields into every preset: only a changed one is worth a line
            if str(value).lower() != default:
                tr.skip(where + name, "ignored", f"a LoKr setting; this is {kind}")
            continue
        apply_rule(tr, name, literal(str(value)), rule, source, label=where + name)


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
    "factor",
    "decompose_both",
    "config_file",
    "dataset_config",
}


def _expand_gui(src: Source, tr: Translation) -> dict:
    """A GUI preset's extra flags (`additional_parameters`) join its keys; its noise switch picks one noise."""
    args = dict(src.args)
    if src.kind != "gui":
        return args
    extra = args.get("additional_parameters")
    if not is_empty(extra):
        for key, value in parse_flags(f"x.py {extra}", src.file)[1].items():
            args[key] = value
    noise = args.get("noise_offset_type", "Original")
    for key in (
        ("noise_offset", "noise_offset_random_strength")
        if noise == "Multires"
        else ("multires_noise_iterations", "multires_noise_discount")
    ):
        if key in args and not is_empty(args[key]):
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
        label, parsed = f"optimizer_args.{name}", literal(text)
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
    if not is_empty(given):
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
    if is_empty(percent):
        if "lr_warmup" in args and "lr_warmup" not in tr.reported():
            tr.skip("lr_warmup", "ignored", "empty: left unset")
        return
    if not is_empty(given):
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
    """A GUI preset holds the sample prompts themselves, one a line in sd-scripts' prompt-file syntax: each becomes a
    validation prompt, with its own settings where its line has `--n/--w/--h/--d/--l/--s` options."""
    prompts = []
    for number, line in enumerate(str(value).splitlines(), start=1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        try:
            keys = parse_prompt_line(line)
        except ValueError as exc:
            return tr.skip("sample_prompts", "not supported", f"line {number}: {exc}")
        prompts.append(keys if len(keys) > 1 else keys["prompt"])
    shown = [line.strip() for line in str(value).splitlines() if line.strip()]
    tr.put("sample_prompts", "validation.prompts", prompts, source, shown=shown)


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
        if name in args and is_empty(args[name]):
            tr.skip(name, "ignored", "empty: left unset")
        elif name in args:
            tr.mapped.append((name, "its entries, each listed by its own name"))
    if not is_empty(args.get("optimizer_args")):
        _optimizer_args(args["optimizer_args"], tr, source)
    if "sample_prompts" in args:
        if gui and not is_empty(args["sample_prompts"]):
            _gui_prompts(args["sample_prompts"], tr, source)
        else:
            apply_rule(tr, "sample_prompts", args["sample_prompts"], rule_for("sample_prompts", False), source)


def _dataset_file(src: Source, args: dict, given, tr: Translation, may_read) -> Path | None:
    """The dataset config: --dataset-config, else the one the config names (`dataset_config`, beside it)."""
    named = args.get("dataset_config")
    if is_empty(named) or not isinstance(named, str):
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
    use_subsets = bool(subsets) and subsets_in_schema()
    main, reg = single_folder(tr, subsets, dsource) if subsets and not use_subsets else (None, None)
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
        apply_dreambooth(tr, train_dir, tokens, reg_tokens, dsource if main else source, not network, may_read)
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
        apply_subsets(tr, subsets, dsource)
    elif subsets:
        apply_dataset(tr, wide, main, reg, dsource)
    for label in extra:
        tr.skip(label, "not supported", "sdtune trains on one dataset: put its folders in the first one")
    for label in shadowed:
        tr.skip(label, "ignored", "every subset sets its own")
    _defaults(tr, args, network, source)
    _drop_unusable_settings(tr, args)
    _validate(tr, source)
    return tr


def _drop_unusable_settings(tr: Translation, args: dict):
    """Takes back what sdtune would refuse or diverge on where sd-scripts lets it do nothing (keep_tokens without
    shuffle_caption), stops (masked_loss without masks), or uses an optimizer sdtune lacks (its learning rate)."""
    data, train = tr.recipe.get("data", {}), tr.recipe.get("train", {})
    if data.get("keep_tokens") and not data.get("shuffle_caption"):  # sdtune refuses it; kohya lets it do nothing
        tr.drop("data.keep_tokens", "it only acts with shuffle_caption, which is off")
    if data.get("masked_loss") and not (data.get("alpha_mask") or data.get("mask_dir")):  # sd-scripts stops on it
        tr.drop("data.masked_loss", "no mask source: set alpha_mask, or conditioning_data_dir to a folder of masks")
    chosen = any(
        not is_empty(args.get(k)) for k in ("optimizer_type", "optimizer", "use_8bit_adam", "use_lion_optimizer")
    )
    if chosen and "train.optimizer_type" not in tr.origin and train.get("learning_rate", 0) >= 0.1:
        # Prodigy and D-Adaptation take lr ~1; AdamW, sdtune's default in their place, would diverge at it
        tr.drop("train.learning_rate", "set for an optimizer sdtune lacks; too high for AdamW", "not supported")


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
