"""`sdtune recipe`: recipes from other tools' training configs.

Usage:
    sdtune recipe from-kohya my_lora.toml -o recipe.yaml                  # sd-scripts `--config_file` TOML
    sdtune recipe from-kohya train.sh --dataset-config dataset.toml -o recipe.yaml   # its command line
    sdtune recipe from-kohya "SD15 - my preset.json" -o recipe.yaml       # a kohya_ss GUI preset

The translation is `sdtune.trainers.tools.kohya_import` (torch-free, imported when the command runs); this module
parses and prints.
"""

from __future__ import annotations

from pathlib import Path


def add_recipe_parser(sub):
    p = sub.add_parser("recipe", help="Recipes from other tools: from-kohya (sd-scripts TOML/flags, kohya_ss JSON).")
    cmds = p.add_subparsers(dest="recipe_command", required=True, metavar="{from-kohya}")
    c = cmds.add_parser(
        "from-kohya",
        help="An sd-scripts training TOML, its command line (.sh/.txt) or a kohya_ss GUI preset (.json) -> a "
        "commented sdtune recipe; every key is mapped or listed as not supported / ignored.",
    )
    c.add_argument("config", type=Path, help="The kohya config: .toml, .json, or .sh/.txt with the command line.")
    c.add_argument("--dataset-config", type=Path, help="sd-scripts' dataset config ([[datasets]], subsets).")
    c.add_argument("-o", "--output", type=Path, required=True, help="The recipe YAML to write.")
    c.set_defaults(run=run_recipe_from_kohya)


def run_recipe_from_kohya(args) -> int:
    from sdtune.trainers.tools.kohya_import import KohyaImportError, import_kohya

    try:
        lines = import_kohya(args.config, args.output, args.dataset_config)
    except KohyaImportError as exc:
        raise SystemExit(f"sdtune recipe from-kohya: {exc}") from None
    print("\n".join(lines))
    print(f"wrote {args.output}")
    return 0
