"""Where jobs and imports from the studio may read and write: the rule, in one place.

Everything the studio is asked to touch on disk must resolve (after `~`, `..` and symlinks) inside one of:

    $SDTUNE_HOME                          the studio's workspace: datasets, jobs, the registry, uploads
    SDTUNE_ALLOWED_DIRS                   folders the operator adds, separated by os.pathsep (':' on Linux)
    $SDTUNE_HOME/studio/allowed_dirs      the same, one folder per line ('#' starts a comment)
    <repository>/datasets                 read only: the quickstart data the recipe templates train on

The recipe keys it applies to are found in the recipe schema, not listed here: every key typed with the
`LocalPath` mark (adapters/base.py), `writes=True` for those a run writes into (output.dir, data.cache_dir). A key
that also takes a Hub id (base.pretrained_model_name_or_path, data.dataset_name...) may hold one: a value shaped
like `name` or `namespace/name` that is no local path is left to the Hub.

The CLI (`sdtune jobs submit`, the trainers, `sdtune adapters import`) does not apply it: whoever types a command
is the machine's user already. The studio is reachable by other accounts (with the token), and its worker may run
as a more powerful user, so what a page asks for is held to these folders. The refusal is the same whether the
path exists or not, so nothing outside the folders can be probed through it. The check runs when the job is queued:
an account that can write inside an allowed folder could still swap a folder for a symlink later, so list only
folders that other accounts cannot write to.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from sdtune.adapters.base import LocalPath
from sdtune.adapters.workspace import sdtune_home
from sdtune.studio.api import StudioError

ALLOWED_ENV = "SDTUNE_ALLOWED_DIRS"
ALLOWED_FILE = Path("studio") / "allowed_dirs"  # under $SDTUNE_HOME
REPO_DATASETS = Path(__file__).resolve().parents[1] / "datasets"
# Keys the queue sets itself: jobs.submit points output.dir at the job's run folder under $SDTUNE_HOME.
SET_BY_THE_QUEUE = ("output.dir",)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?$")


class ConfineError(StudioError):
    """A path outside the folders the studio may use; the message is one line naming the key (a StudioError: the
    pages show it as any other)."""


def allowed_dirs(home: str | Path | None = None) -> list[Path]:
    """The folders a studio job may read and write: $SDTUNE_HOME, then the operator's (setting, then file)."""
    home = sdtune_home(home)
    listed = [d for d in os.environ.get(ALLOWED_ENV, "").split(os.pathsep) if d.strip()]
    try:
        lines = (home / ALLOWED_FILE).read_text().splitlines()
    except OSError:  # no file: no folders from it
        lines = []
    listed += [line.split("#", 1)[0].strip() for line in lines]
    return [_resolved(d) for d in [str(home), *listed] if d.strip()]


def readable_dirs(home: str | Path | None = None) -> list[Path]:
    return [*allowed_dirs(home), REPO_DATASETS.resolve()]


def _resolved(value: str | Path, cwd: Path | None = None) -> Path:
    path = Path(value).expanduser()  # the trainers expand ~ too
    return ((cwd or Path.cwd()) / path).resolve()  # an absolute path replaces cwd; resolve() follows symlinks


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_path(value: str | Path, key: str, *, writes: bool = False, hub_id: bool = False, cwd=None, home=None):
    """Raises ConfineError unless `value` resolves inside the allowed folders (for reading, the repository's
    datasets/ too). `hub_id`: the key also takes a Hub id, and a value shaped like one that is no local path is
    one."""
    path = _resolved(value, cwd)
    if _inside(path, allowed_dirs(home) if writes else readable_dirs(home)):
        return
    if hub_id and not writes and HUB_ID.match(str(value)) and not path.exists():
        return
    where = "$SDTUNE_HOME" + ("" if writes else ", the repository's datasets/")
    raise ConfineError(
        f"{key}: {value} is outside the folders the studio may {'write' if writes else 'read'} ({where} or a folder "
        f"listed in {ALLOWED_ENV} or $SDTUNE_HOME/{ALLOWED_FILE}); use the CLI for other places"
    )


# -- the recipe keys that name local paths, from the schema ---------------------------------------------------------


def path_keys(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, bool]:
    """Every key of the recipe schema marked `LocalPath`, dotted (`data.cache_dir`; a method key under every method
    type), mapped to whether a run writes into it."""
    if model is None:
        from sdtune.trainers.core.recipe import Recipe

        model = Recipe
    found: dict[str, bool] = {}
    for name, field in model.model_fields.items():
        key = prefix + name
        metadata = [*field.metadata, *_nested(field.annotation, list)]
        marks = [m for m in metadata if isinstance(m, LocalPath)]
        if marks:
            found[key] = any(m.writes for m in marks)
        for section in _nested(field.annotation, type):
            for sub, writes in path_keys(section, key + ".").items():
                found[sub] = found.get(sub, False) or writes
    return found


def _nested(annotation, kind) -> list:
    """The Annotated metadata (kind=list) or the pydantic models (kind=type) inside a type: `X | None`, `list[X]`,
    `Annotated[X, ...]` and unions of models (the recipe's `method`)."""
    if typing.get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation] if kind is type else []
    found = list(getattr(annotation, "__metadata__", ())) if kind is list else []
    for arg in typing.get_args(annotation):
        found += _nested(arg, kind)
    return found


def check_recipe(recipe: dict, *, cwd=None, home=None) -> None:
    """Raises ConfineError naming the first path key of the resolved recipe (`validate_recipe`'s dict) outside
    the allowed folders. Relative paths resolve against `cwd` (default: the current folder, where the worker will
    run the trainer); an unset key (None, "" or []) takes its default, which the studio does not choose."""
    for key, writes in path_keys().items():
        if key in SET_BY_THE_QUEUE:
            continue
        for item in _values(recipe, key.split(".")):
            if item:
                check_path(item, key, writes=writes, hub_id=not writes, cwd=cwd, home=home)


def _values(data, parts: list[str]) -> list:
    """Every value at a dotted key, through lists on the way (`data.subsets.image_dir`: each subset's) and at the
    end (`method.validation_image`: each image)."""
    if isinstance(data, list):
        return [value for item in data for value in _values(item, parts)]
    if not parts:
        return [data]
    return _values(data.get(parts[0]), parts[1:]) if isinstance(data, dict) else []
