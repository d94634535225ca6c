"""The recipe's `validation` section: the prompts a run samples, each maybe with its own settings, and the seeds.

A prompt is a plain string (it takes the section's settings) or an object with its own negative prompt, size,
steps, guidance and seed, under the names of diffusers' pipelines and of sd-scripts' JSON prompt files:

    prompts:
      - a purple circle
      - {prompt: a purple circle, negative_prompt: blurry, width: 48, height: 64, steps: 10, seed: 7}

`prompts_file` reads sd-scripts' prompt files (its `--sample_prompts`). Text: one prompt a line, `#` lines are
comments, and options after the prompt, each after " --": `--n` negative prompt, `--w` / `--h` size, `--d` seed,
`--l` guidance (CFG), `--s` steps:

    a purple circle, simple background --n blurry, text --w 512 --h 768 --d 7 --l 7.5 --s 28

A .json file is a list of prompts (such lines, or objects of SamplePrompt's keys); a .toml file a `[prompt]` table
of shared settings with one `[[prompt.subset]]` table a prompt.

Its prompts come after `prompts`. A line sdtune cannot read is one `RecipeError` naming the file, the line and the
option; the file is read when a trainer starts (`ValidationConfig.sample_prompts`), not at every recipe check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Discriminator, Field, Tag, field_validator, model_validator

from sdtune.adapters.base import LocalPath
from sdtune.adapters.schedulers import SchedulerName

from .sections import COMMON, RecipeError, Section

LATENT_FACTOR = 8  # the VAE shrinks an image 8x: a side that is not a multiple of 8 has no latent of its size


def check_side(value: int | None) -> int | None:
    if value is not None and value % LATENT_FACTOR:
        raise ValueError(f"must be a multiple of {LATENT_FACTOR} (the VAE works on 8x8 pixel blocks)")
    return value


class SamplePrompt(Section):
    """One validation prompt with its own settings; a setting left out takes the validation section's."""

    prompt: str = Field(..., description="The prompt.")
    negative_prompt: str | None = Field(None, description="Its negative prompt (sd-scripts' --n).")
    width: int | None = Field(None, ge=8, description="Its width in pixels, a multiple of 8 (--w); default: native.")
    height: int | None = Field(None, ge=8, description="Its height in pixels, a multiple of 8 (--h).")
    steps: int | None = Field(
        None,
        ge=1,
        le=1000,
        validation_alias=AliasChoices("steps", "num_inference_steps", "sample_steps"),
        description="Its sampling steps (--s; aliases num_inference_steps, sample_steps).",
    )
    guidance_scale: float | None = Field(
        None, ge=0, validation_alias=AliasChoices("guidance_scale", "scale"), description="Its CFG scale (--l)."
    )
    seed: int | None = Field(None, ge=0, description="Its one seed (--d), instead of the section's seeds.")

    @field_validator("width", "height")
    @classmethod
    def _whole_latents(cls, value):
        return check_side(value)


# sd-scripts' options: the letter after " --", the field it sets, and how its text becomes the value.
PROMPT_OPTIONS = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance_scale", float),
    "s": ("steps", int),
}
# Options sd-scripts knows that sdtune does not take per prompt, and what to do instead.
OTHER_OPTIONS = {
    "ss": "a per-prompt sampler; set validation.scheduler for all prompts",
    "cn": "a per-prompt ControlNet image; ControlNet runs pair prompts with method.validation_image",
    "f": "a video frame count",
}


def parse_prompt_line(line: str) -> dict:
    """One prompt-file line as SamplePrompt keys; raises ValueError naming the option (the caller adds the line).

    >>> parse_prompt_line("a cat --n blurry --w 512 --d 3")
    {'prompt': 'a cat', 'negative_prompt': 'blurry', 'width': 512, 'seed': 3}
    """
    prompt, *options = line.split(" --")
    if not prompt.strip():
        raise ValueError("no prompt before its options")
    keys = {"prompt": prompt.strip()}
    for option in options:
        letter, _, text = option.strip().partition(" ")
        letter, text = letter.lower(), text.strip()
        if letter in OTHER_OPTIONS:
            raise ValueError(f"--{letter}: not read by sdtune ({OTHER_OPTIONS[letter]})")
        if letter not in PROMPT_OPTIONS:
            raise ValueError(f"--{letter}: unknown option; sdtune reads --n, --w, --h, --d, --l and --s")
        name, kind = PROMPT_OPTIONS[letter]
        if name in keys:
            raise ValueError(f"--{letter}: given twice")
        if not text:
            raise ValueError(f"--{letter}: needs a value")
        try:
            keys[name] = kind(text)
        except ValueError:
            raise ValueError(f"--{letter} {text}: not {'an integer' if kind is int else 'a number'}") from None
    return keys


def read_prompts_file(path: str | Path) -> list[SamplePrompt]:
    """The prompts of an sd-scripts prompt file: text (one prompt a line), or .json / .toml (`structured_prompts`);
    a prompt that cannot be read is one RecipeError naming the file, the line or prompt number, and the option."""
    path = Path(path).expanduser()
    where = f"validation.prompts_file: {path}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RecipeError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{where}: cannot be read as UTF-8 text ({exc.__class__.__name__})") from None
    if path.suffix.lower() in (".json", ".toml"):
        entries = [(f"prompt {i}", e) for i, e in enumerate(structured_prompts(text, path.suffix, where), start=1)]
    else:
        lines = enumerate(text.splitlines(), start=1)
        entries = [(f"line {n}", line) for n, line in lines if line.strip() and not line.strip().startswith("#")]
    prompts = []
    for place, entry in entries:
        try:
            keys = parse_prompt_line(entry) if isinstance(entry, str) else sd_scripts_keys(entry)
            prompts.append(SamplePrompt.model_validate(keys))
        except ValueError as exc:
            raise RecipeError(f"{path}: {place}: {_option_error(exc, isinstance(entry, str))}") from None
    if not prompts:
        raise RecipeError(f"{where}: no prompt in it (one a line; lines starting with # are comments)")
    return prompts


def structured_prompts(text: str, suffix: str, where: str) -> list:
    """sd-scripts' other prompt files: JSON, a list of prompts (a text line, or an object of its settings); TOML, a
    `[prompt]` table of shared settings and its `[[prompt.subset]]` tables, one a prompt (a subset's keys win)."""
    import json

    import tomllib

    kind = suffix.lower().lstrip(".").upper()
    try:
        data = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except ValueError as exc:
        raise RecipeError(f"{where}: not valid {kind} ({exc})") from None
    if kind == "JSON":
        if not isinstance(data, list):
            raise RecipeError(f"{where}: a JSON prompt file is a list of prompts, as sd-scripts reads it")
        return data
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise RecipeError(
            f"{where}: a TOML prompt file has a [prompt] table and [[prompt.subset]] tables, one a prompt"
        )
    shared = {key: value for key, value in table.items() if key != "subset"}
    return [{**shared, **subset} if isinstance(subset, dict) else subset for subset in table["subset"]]


# sd-scripts' keys for what its text options --ss and --cn set
OTHER_KEYS = {"sample_sampler": OTHER_OPTIONS["ss"], "controlnet_image": OTHER_OPTIONS["cn"]}


def sd_scripts_keys(entry) -> dict:
    """A JSON/TOML prompt's settings as SamplePrompt keys (its aliases take sd-scripts' `scale`, `sample_steps`)."""
    if not isinstance(entry, dict):
        raise ValueError("expected a prompt text or a table of its settings (prompt, negative_prompt, width, ...)")
    for key in entry:
        if key in OTHER_KEYS:
            raise ValueError(f"{key}: not read by sdtune ({OTHER_KEYS[key]})")
    return dict(entry)


def _option_error(exc: ValueError, text_line: bool) -> str:
    """A parse error as it is, or a schema error under the option's name in a text line (`--w 500: must be a
    multiple of 8`), under the key's in a JSON/TOML prompt (`width: must be ...`)."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    first = errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    letter = next((k for k, (field, _) in PROMPT_OPTIONS.items() if field == name and text_line), None)
    message = first["msg"].removeprefix("Value error, ")
    return f"--{letter} {first.get('input')}: {message}" if letter else f"{name}: {message}"


# `prompts` items are told apart by their type, so that a bad object is reported against its own keys (a plain
# union would report first that it is no string); the tags name the two kinds and are left out of error paths.
PLAIN, WITH_SETTINGS = "a plain prompt", "a prompt with settings"
PROMPT_TAGS = (PLAIN, WITH_SETTINGS)
PromptEntry = Annotated[
    Annotated[str, Tag(PLAIN)] | Annotated[SamplePrompt, Tag(WITH_SETTINGS)],
    Discriminator(lambda value: PLAIN if isinstance(value, str) else WITH_SETTINGS),
]


class ToyTarget(Section):
    """What the toy-world scorer should find for a prompt (toy base only): used to measure that a fine-tune learned."""

    prompt: str = Field(..., description="A prompt to render with the scorer's fixed seeds, e.g. 'a purple circle'.")
    color: str | None = Field(None, description="The colour its images must show (unchecked if unset).")
    shape: str | None = Field(
        None,
        description="The shape its images must show: circle, square, triangle, or star (read by its geometry: one "
        "piece, five deep points, filled).",
    )


class ValidationConfig(Section):
    """Fixed prompts x fixed seeds, base vs adapter, rendered with the same code as `sdtune sample`."""

    prompts: list[PromptEntry] = Field(
        default_factory=list,
        description="Validation prompts: a plain prompt, or one with its own settings, e.g. {prompt: a cat, "
        "negative_prompt: blurry, width: 512, height: 768, steps: 30, guidance_scale: 7, seed: 3} (a setting left "
        "out takes this section's).",
        json_schema_extra=COMMON,
    )
    prompts_file: Annotated[str | None, LocalPath()] = Field(
        None,
        description="An sd-scripts prompt file (kohya's sample_prompts), read after prompts: .txt, one prompt a "
        "line, # comments, options --n negative, --w/--h size, --d seed, --l CFG, --s steps; or its .json/.toml.",
    )
    negative_prompt: str = Field("", description="Negative prompt for validation images.", json_schema_extra=COMMON)
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1],
        description="One image per prompt and seed (a prompt with its own seed renders that one).",
        json_schema_extra=COMMON,
    )
    num_inference_steps: int = Field(25, ge=1, description="Sampling steps.")
    guidance_scale: float | None = Field(
        None,
        ge=0,
        description="Classifier-free guidance; default: the base's recommended (7.5 SD v1-5, 3 toy).",
        json_schema_extra=COMMON,
    )
    scheduler: SchedulerName = Field("default", description="Sampler; default = the base's own scheduler.")
    validation_steps: int = Field(
        0, ge=0, description="Render a grid every N steps (0 = only at the end).", json_schema_extra=COMMON
    )
    toy_score: list[ToyTarget] = Field(
        default_factory=list, description="Toy base only: prompts whose samples the toy-world scorer checks."
    )
    toy_seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3],
        min_length=1,
        description="The seeds each toy_score prompt is rendered with, for the base and the adapter: more seeds, "
        "finer scores (4 seeds read in steps of 0.25).",
    )
    loss_split: float | None = Field(
        None,
        gt=0,
        le=0.5,
        description="Held-out validation loss: this share of the training images (0 < share <= 0.5) is held back "
        "from training, chosen by a seeded, stable rule (listed in the log), and its loss at fixed timesteps and "
        "noise is logged as val_loss every validation_steps and at each checkpoint.",
    )
    loss_dir: Annotated[str | None, LocalPath()] = Field(
        None,
        description="Held-out validation loss over the images of this folder (scanned as the training data is); "
        "the training set is unchanged. Instead of loss_split.",
    )

    @model_validator(mode="after")
    def _one_loss_source(self):
        if self.loss_split is not None and self.loss_dir is not None:
            raise ValueError("loss_split and loss_dir both set: hold back a share of the images or name a folder")
        return self

    def sample_prompts(self) -> list[SamplePrompt]:
        """Every validation prompt with its own settings: `prompts` (a string has none), then `prompts_file`'s."""
        given = [SamplePrompt(prompt=p) if isinstance(p, str) else p for p in self.prompts]
        return given + (read_prompts_file(self.prompts_file) if self.prompts_file else [])
