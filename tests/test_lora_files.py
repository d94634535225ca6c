"""One home for adapter files (adapters/lora_files.py, adapters/file_metadata.py): one PEFT file name, one kohya
header builder for every kohya file, the same core keys in every kind of LoRA file (trained, extracted, merged,
resized, imported), merged and resized files inheriting their parents' facts, and the SAI model spec in
single-file checkpoints and ControlNet files."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdtune.adapters.file_metadata import (
    BaseFacts,
    LoraFacts,
    ModelFacts,
    TrainingFacts,
    inherited_facts,
    kohya_metadata,
)
from sdtune.adapters.lora_files import PEFT_FILE, kohya_path, save_modules, save_modules_peft
from sdtune.adapters.lora_modules import LoraModule, base_shapes, module_table
from sdtune.adapters.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
# What every kohya LoRA file says, however it was made (trained files add their training settings).
CORE_KEYS = {
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2", "ss_resolution",
    "ss_sd_model_name", "ss_new_sd_model_hash", "ss_sd_model_hash", "ss_output_name",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.prediction_type", "modelspec.date",
}  # fmt: skip
MODEL_SPEC_KEYS = {
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.prediction_type", "modelspec.date",
}  # fmt: skip
# A parent's facts that differ from the toy base's own (64x64, epsilon): a child that says them inherited them.
PARENT = LoraFacts(
    ModelFacts("parent", (96, 96), "v_prediction", trigger_words=("zkz",)),
    BaseFacts("parent-base", "ab" * 32, "abababab"),
    4,
    2.0,
)


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


# -- one name, one builder ----------------------------------------------------------------------------------------


def _string_constants(tree: ast.AST) -> list[str]:
    """String literals of a module that are not docstrings."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_peft_file_name_is_spelled_in_one_module():
    """It was defined four times and written once more as a literal: a name that exists twice drifts."""
    spelled = sorted(
        str(path.relative_to(ROOT))
        for folder in ("adapters", "trainers", "studio")
        for path in (ROOT / folder).rglob("*.py")
        if any(PEFT_FILE in text for text in _string_constants(ast.parse(path.read_text())))
    )
    assert spelled == ["adapters/lora_files.py"]


def test_the_studios_extract_imports_nothing_from_the_trainers():
    found = [
        node
        for path in [*(ROOT / "studio").glob("api*.py"), *(ROOT / "studio").glob("api/*.py")]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name == "extract_lora"
    ]
    assert len(found) == 1, "studio's api.extract_lora not found"
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(found[0])
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert imported and not [name for name in imported if name and name.startswith("sdtune.trainers")], imported


def test_a_child_inherits_its_first_parents_facts_and_never_mixes_bases():
    toy = ModelFacts("child", (64, 64)), BaseFacts("sdtune-toy-base", "cd" * 32, "cdcdcdcd")
    parent = kohya_metadata(PARENT)
    model, base = inherited_facts([{}, parent, kohya_metadata(LoraFacts(*toy, 4, 4.0))], *toy)
    assert (model.title, model.resolution, model.prediction_type) == ("child", (96, 96), "v_prediction")
    assert base == PARENT.base
    # sd-scripts files name their base without hashes: the name stays alone, with no other base's hashes
    named_only = {"ss_sd_model_name": "v1-5-pruned-emaonly.safetensors", "ss_base_model_version": "sd_v1"}
    model, base = inherited_facts([named_only], *toy)
    assert base == BaseFacts("v1-5-pruned-emaonly.safetensors") and model.resolution == (64, 64)
    assert inherited_facts([{}, {"format": "pt"}], *toy) == toy  # nobody says anything: the base's facts


# -- every kind of kohya file -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_modules(toy_pipe):
    """A small LoRA on the toy base: two UNet attention layers and one text-encoder layer, rank 4, alpha 2."""
    table = module_table(*base_shapes(toy_pipe))
    names = [n for n in table if n.endswith("attn1_to_q")][:2] + [n for n in table if n.endswith("q_proj")][:1]
    generator, modules = torch.Generator().manual_seed(0), {}
    for name in names:
        out, inp = table[name].shape[:2]
        down = torch.randn(4, inp, generator=generator) * 0.3
        modules[name] = LoraModule(down, torch.randn(out, 4, generator=generator) * 0.3, 2.0)
    return modules, table


def _trained(tmp_path, toy_modules, registry) -> dict[str, str]:
    training = TrainingFacts(
        10, 1, 1e-4, None, 1e-4, 0, "no", "torch.optim.adamw.AdamW", "constant", 1, 4, {}, {}, 0.0, 1.0
    )
    facts = LoraFacts(PARENT.model, PARENT.base, 4, 2.0, training=training)
    return header(save_modules(tmp_path, "trained", *toy_modules, facts, torch.float16)["kohya"])


def _extracted(tmp_path, toy_modules, registry) -> dict[str, str]:
    from sdtune.adapters.base import load_pipeline
    from sdtune.adapters.extract import extract_lora
    from sdtune.adapters.lora_files import save_extracted

    base = load_pipeline("toy").unet.state_dict()
    tuned = {k: v + 0.01 * torch.randn_like(v) if k.endswith("to_q.weight") else v for k, v in base.items()}
    files = save_extracted(tmp_path / "extracted", extract_lora(base, tuned, 2), base="toy", tuned="tuned")
    return header(files["kohya"])


def _parent_folder(tmp_path, toy_modules) -> Path:
    """A run-like folder: the parent's two files and the adapter.json that names them."""
    folder = tmp_path / "parent"
    files = save_modules(folder, "parent", *toy_modules, PARENT, torch.float16)
    (folder / "adapter.json").write_text(json.dumps({"files": {fmt: p.name for fmt, p in files.items()}}))
    return folder


def _resized(tmp_path, toy_modules, registry) -> dict[str, str]:
    from sdtune.adapters.merge import resize_into_registry

    parent = _parent_folder(tmp_path, toy_modules)  # a run folder: its PEFT file, its facts in the kohya file
    resize_into_registry("resized", str(parent), 2, registry=registry, prompt="a red circle")
    return header(registry.file("resized", "kohya"))


def _merged(tmp_path, toy_modules, registry) -> dict[str, str]:
    from sdtune.adapters.merge import merge_into_registry

    parent = kohya_path(_parent_folder(tmp_path, toy_modules), "parent")
    merge_into_registry("merged", [str(parent)] * 2, [0.5, 0.5], "concat", registry=registry, prompt="a red circle")
    return header(registry.file("merged", "kohya"))


def _imported(tmp_path, toy_modules, registry) -> dict[str, str]:
    from sdtune.adapters.importer import import_adapter

    path = save_modules_peft(tmp_path / "bare", *toy_modules, torch.float16)  # a PEFT file, no facts beside it
    import_adapter(path, base="toy", name="imported", registry=registry)
    return header(registry.file("imported", "kohya"))


def _merged_bare(tmp_path, toy_modules, registry) -> dict[str, str]:
    from sdtune.adapters.merge import resize_into_registry

    path = save_modules_peft(tmp_path / "bare", *toy_modules, torch.float16)
    resize_into_registry("bare-resized", str(path), 2, registry=registry, prompt="a red circle")
    return header(registry.file("bare-resized", "kohya"))


@pytest.mark.parametrize(
    "make, inherits",
    [
        (_trained, True),
        (_extracted, False),
        (_resized, True),
        (_merged, True),
        (_imported, False),
        (_merged_bare, False),
    ],
    ids=["trained", "extracted", "resized", "merged", "imported-peft", "resized-from-a-bare-peft-file"],
)
def test_every_kohya_file_carries_the_core_keys(make, inherits, toy_modules, tmp_path):
    """Merged and resized files lacked the resolution, prediction type and base hashes that trained files carry;
    now every kind says them, a merged or resized one as its parents did (sd-scripts' resize keeps them)."""
    from sdtune.adapters.base import base_hash

    metadata = make(tmp_path, toy_modules, Registry(tmp_path / "home"))
    assert CORE_KEYS <= set(metadata), sorted(CORE_KEYS - set(metadata))
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    said = (
        metadata["modelspec.resolution"],
        metadata["modelspec.prediction_type"],
        metadata["ss_base_model_version"],
        metadata["ss_new_sd_model_hash"],
    )
    if inherits:
        assert said == ("96x96", "v", "sd_v1_v", PARENT.base.hash) and metadata["ss_resolution"] == "(96, 96)"
    else:  # the facts of the toy base the file was made or checked on
        assert said == ("64x64", "epsilon", "sd_v1", base_hash("toy"))
        assert (
            metadata["ss_sd_model_name"] == "sdtune-toy-base" and metadata["ss_sd_model_hash"] == base_hash("toy")[:8]
        )


# -- the model spec of checkpoints and ControlNets ----------------------------------------------------------------


def test_a_single_file_checkpoint_carries_the_model_spec(toy_base, tmp_path):
    from sdtune.adapters.single_file import save_single_file

    metadata = header(save_single_file(toy_base, tmp_path / "toy-sks.safetensors", half=True))
    assert MODEL_SPEC_KEYS <= set(metadata), sorted(MODEL_SPEC_KEYS - set(metadata))
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    said = (metadata["modelspec.title"], metadata["modelspec.resolution"], metadata["modelspec.prediction_type"])
    assert said == ("toy-sks", "64x64", "epsilon") and metadata["format"] == "pt"


def test_controlnet_files_carry_the_model_spec(toy_pipe, tmp_path):
    from diffusers import ControlNetModel

    from sdtune.adapters.controlnet import DIFFUSERS_WEIGHTS, save_controlnet

    facts = ModelFacts("toy-masks", (64, 64), "epsilon", trigger_words=("masks",))
    files = save_controlnet(ControlNetModel.from_unet(toy_pipe.unet), tmp_path, facts, torch.float16)
    assert files["original"].name == "toy-masks.safetensors"
    for path, implementation in (
        (files["original"], "https://github.com/Stability-AI/generative-models"),
        (files["diffusers"] / DIFFUSERS_WEIGHTS, "diffusers"),
    ):
        metadata = header(path)
        assert MODEL_SPEC_KEYS <= set(metadata), (path.name, sorted(MODEL_SPEC_KEYS - set(metadata)))
        assert metadata["modelspec.architecture"] == "stable-diffusion-v1/controlnet"
        assert (metadata["modelspec.implementation"], metadata["modelspec.resolution"]) == (implementation, "64x64")
        assert metadata["modelspec.trigger_phrase"] == "masks" and metadata["format"] == "pt"


@pytest.mark.parametrize("config, said", [({"prediction_type": "v_prediction"}, "v_prediction"), ({}, "epsilon")])
def test_a_folders_prediction_type_is_what_the_model_spec_can_say(config, said, tmp_path):
    from sdtune.adapters.file_metadata import prediction_type

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert prediction_type(tmp_path) == said
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "sample"}))
    assert prediction_type(tmp_path) == "epsilon"  # modelspec says epsilon or v; a checkpoint still converts
