"""The commented recipe `sdtune recipe from-kohya` writes, and its report. Torch-free."""

from __future__ import annotations

from pathlib import Path

import yaml

from sdtune.trainers.tools.kohya_translation import Translation


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
