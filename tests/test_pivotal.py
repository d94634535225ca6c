"""Pivotal tuning (`method.pivotal: true`): a new token's vectors and a LoRA trained together, in both LoRA trainers.

Fast: the recipe's checks; the `bundle_emb` keys A1111 reads (written, split back, ignored as LoRA modules, hashes
recomputed); a 4-step run of each trainer whose files are the LoRA's two, the embedding's two and the bundle, all
export-checked, and whose LoRA stays at zero while `embedding_only_steps` lasts; a token started at its rare word
(`initializer_token: <ps>`, three vectors) trains its first step exactly as the LoRA on that word.
The proofs (slow, `bench/pivotal_curves.py`, curves in bench/RESULTS.md): on purple, a colour the toy base lacks, a
token that starts at a colour it knows (blue) gets pivotal tuning ahead of the LoRA alone at steps 20 and 30
(`--concept colour`); on a purple star, a shape it lacks, pivotal tuning with a LoCon LoRA side learns the star (0.8
or more) and ends within two of 8 images of the LoRA alone, not ahead (`--preset locon`). Textual inversion alone
stays low on the star, since the base cannot draw one.
"""

from __future__ import annotations

import json
import sys

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import ROOT, run_trainer

from sdtune.adapters import toyworld
from sdtune.adapters.embeddings import bundle_embedding, split_bundle
from sdtune.adapters.kohya import a1111_lora_hash
from sdtune.adapters.lora_modules import read_kohya
from sdtune.trainers.core.recipe import RecipeError, load_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
DREAMBOOTH = ROOT / "recipes" / "toy-dreambooth.yaml"
PIVOTAL = ["method.pivotal=true", "method.placeholder_token=<ps>", "method.num_vectors=2"]


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        (QUICKSTART, ["method.embedding_only_steps=10"], "embedding_only_steps needs pivotal: true"),
        (DREAMBOOTH, ["method.pivotal=true", "method.lora=true"], "placeholder_token '<sks>' in instance_prompt"),
        (DREAMBOOTH, ["method.pivotal=true", "method.instance_prompt='a <sks> circle'"], "pivotal needs lora: true"),
    ],
)
def test_recipe_checks(recipe, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(recipe), overrides)


def test_bundled_embedding_is_in_a1111s_layout_and_not_a_lora_module(tmp_path):
    from sdtune.adapters.lora_files import save_kohya

    path = tmp_path / "lora.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    lora = {f"{name}.lora_down.weight": torch.ones(2, 8), f"{name}.lora_up.weight": torch.ones(8, 2)}
    save_kohya(path, lora, {"ss_network_dim": "2"})
    vectors = torch.randn(2, 64)
    bundle_embedding(path, "ps", vectors)
    tensors = safetensors.torch.load_file(str(path))
    assert torch.equal(tensors["bundle_emb.ps.string_to_param.*"], vectors)
    lora_keys, bundled = split_bundle(tensors)
    assert set(lora_keys) == set(lora) and torch.equal(bundled["ps"].vectors, vectors)
    assert list(read_kohya(tensors)) == [name]  # the bundle is no LoRA module (import, merge, the key tables)
    with safetensors.safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    assert header["ss_network_dim"] == "2" and header["sshs_model_hash"] == a1111_lora_hash(path)


@pytest.mark.parametrize("script", ["trainers/lora.py", "trainers/dreambooth.py"])
def test_a_pivotal_run_writes_and_checks_both_kinds_of_files(tmp_path, script):
    toyworld.write_dataset(tmp_path / "data", 4, seed=5, colors=["purple"], shapes=["star"])
    recipe = QUICKSTART if script.endswith("lora.py") else DREAMBOOTH
    kind = ["data.caption_template='a <ps>'"] if recipe == QUICKSTART else [
        "method.lora=true", "method.with_prior_preservation=false", "method.instance_prompt='a <ps>'"]  # fmt: skip
    args = [str(recipe), f"data.train_data_dir={tmp_path / 'data'}", f"output.dir={tmp_path / 'run'}", *kind,
            *PIVOTAL, "method.embedding_only_steps=2", "method.embedding_lr=5e-2", "train.max_train_steps=4",
            "train.checkpointing_steps=2", "train.train_batch_size=2", "train.lr_warmup_steps=0",
            "validation.prompts=[a <ps>]", "validation.toy_score=[]", "validation.validation_steps=0",
            "validation.num_inference_steps=5", "output.report_to=none", "output.save_precision=fp32",
            "output.name=star"]  # fmt: skip
    proc = run_trainer(args, tmp_path / "cache", script=script, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    manifest = json.loads((run / "adapter.json").read_text())
    assert set(manifest["files"]) == {"peft", "kohya", "embedding", "a1111"}
    assert manifest["files"]["a1111"] == "ps.safetensors"
    check = manifest["export_check"]
    assert check["ok"] and set(check["max_pixel_diff"]) == {
        "trained-vs-peft+embedding", "trained-vs-kohya+bundle_emb", "peft-vs-kohya"}  # fmt: skip
    kohya = safetensors.torch.load_file(str(run / manifest["files"]["kohya"]))
    separate = safetensors.torch.load_file(str(run / "ps.safetensors"))["emb_params"]
    assert torch.equal(kohya["bundle_emb.ps.string_to_param.*"], separate) and separate.shape == (2, 64)
    # while the embedding trains alone (steps 1-2) the LoRA stays where it starts (B = 0); then it trains too
    early = safetensors.torch.load_file(str(run / "checkpoints" / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    final = safetensors.torch.load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert all(not v.any() for k, v in early.items() if "lora_B" in k)
    assert any(v.any() for k, v in final.items() if "lora_B" in k)
    start = safetensors.torch.load_file(str(run / "checkpoints" / "checkpoint-2" / "learned_embeds.safetensors"))
    assert not torch.equal(start["<ps>"], safetensors.torch.load_file(str(run / "learned_embeds.safetensors"))["<ps>"])


def test_a_token_started_at_its_rare_word_trains_its_first_step_as_the_lora_on_that_word(tmp_path):
    """`initializer_token: <ps>` (three tokens for three vectors) hands the new token what the rare word "<ps>" meant:
    the first step's loss (before anything moved) is the LoRA-alone run's on the caption "a <ps>", to the bit; one
    word copied into every vector ("object", the default) starts elsewhere."""
    toyworld.write_dataset(tmp_path / "data", 4, seed=5, colors=["purple"], shapes=["star"])

    def first_loss(name: str, *overrides: str) -> float:
        args = [str(QUICKSTART), f"data.train_data_dir={tmp_path / 'data'}", f"output.dir={tmp_path / name}",
                "data.caption_template='a <ps>'", "data.caption_dropout_rate=0", "train.max_train_steps=1",
                "train.train_batch_size=2", "validation.prompts=[]", "validation.toy_score=[]",
                "validation.validation_steps=0", "output.report_to=none", "output.export_check=false",
                "output.register=false", *overrides]  # fmt: skip
        proc = run_trainer(args, tmp_path / "cache", timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return next(json.loads(line)["loss"] for line in lines if json.loads(line).get("step") == 1)

    rare_word = first_loss("lora")
    pivotal = ["method.pivotal=true", "method.placeholder_token=<ps>"]
    assert first_loss("from-rare-word", *pivotal, "method.num_vectors=3", "method.initializer_token=<ps>") == rare_word
    assert first_loss("from-object", *pivotal, "method.num_vectors=3") != rare_word


@pytest.mark.slow
def test_pivotal_learns_the_star_as_well_as_a_locon_lora_alone(tmp_path):
    # With the star read by its geometry (stars.star_geometry), the quickstart's attention LoRA reaches 0.38 alone and
    # 0.00 under pivotal tuning: the LoRA side must be one that can draw a shape (recipes/toy-lora-star.yaml's locon).
    # There pivotal does not beat the LoRA alone (bench/RESULTS.md): it matches it, within two images of 8.
    sys.path.insert(0, str(ROOT / "bench"))
    from pivotal_curves import main

    curves = main(["--out", str(tmp_path), "--steps", "300", "--every", "50", "--preset", "locon"])
    lora, pivotal = curves["lora"], curves["pivotal"]
    assert max(pivotal.values()) >= 0.8 and pivotal[300] >= lora[300] - 0.25, curves
    assert curves["textual_inversion"][300] <= 0.25, curves  # no vector makes the base draw a star


@pytest.mark.slow
def test_pivotal_from_a_nearby_colour_learns_purple_in_fewer_steps_than_the_lora_alone(tmp_path):
    # Purple, a colour the toy base lacks, on the shapes it knows ("a <ps> circle"): the new token starts at "blue"
    # and trains with the LoRA from step 1; the LoRA alone reads <ps> as a rare word. bench/RESULTS.md: pivotal ahead at
    # every checkpoint from step 20 in each of 3 training seeds (48 samples each), its 30-step score above the LoRA
    # alone's 50-step one. Training seed 0 read 0.75 / 0.96 at steps 20 / 30, against 0.67 / 0.90.
    sys.path.insert(0, str(ROOT / "bench"))
    from pivotal_curves import main

    curves = main(["--out", str(tmp_path), "--concept", "colour", "--kinds", "lora", "pivotal", "--steps", "30",
                   "--every", "10", "--seeds", "16"])  # fmt: skip
    lora, pivotal = curves["lora"], curves["pivotal"]
    assert pivotal[20] > lora[20] and pivotal[30] > lora[30] and pivotal[30] >= 0.9, curves
