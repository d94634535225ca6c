"""Textual inversion on the toy base: the trainer, its two files, and embeddings at inference (sample, registry, A/B).

The proof (slow: `pytest -m slow`): 16 green triangles, captioned "a <zq>", teach the new token <zq>. The toy base
can already draw "a green triangle", so a word for it exists in its input space; the toy-world scorer finds a green
triangle in >= 80% of the samples of "a <zq>" after training and in <= 20% with the untrained token (it starts as
"object", a word the toy base never learned to draw). Both files reload into a clean base within 2/255 (export
check), the run registers as an embedding, and `sdtune sample --embedding` renders it beside a LoRA.
Fast: the placeholder's checks, that only the new rows train, the file layouts, bad embeddings, A/B specs, captions.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import ROOT, kill_after_checkpoint, run_trainer, start_trainer, trainer_env
from PIL import Image

from sdtune.adapters import toyworld
from sdtune.adapters.ab import ABError, parse_spec
from sdtune.adapters.embeddings import A1111_KEY, EmbeddingError, from_tensors, read_embedding, save_embedding
from sdtune.adapters.importer import import_adapter
from sdtune.adapters.registry import Registry
from sdtune.trainers.core.embeddings import TokenVectors, add_placeholder, hook_into, spell_out
from sdtune.trainers.core.recipe import RecipeError, load_recipe

RECIPE = ROOT / "recipes" / "textual_inversion.yaml"
SCRIPT = "trainers/textual_inversion.py"


@pytest.fixture
def fresh_pipe():
    """A toy pipeline of its own: tokens added here must not leak into the session's `toy_pipe`."""
    from sdtune.adapters.base import load_pipeline

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the placeholder and what trains -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placeholder", "initializer", "message"),
    [
        ("cat", "object", "method.placeholder_token: 'cat' is already a token"),
        ("<zq>", "a photo", "method.initializer_token: 'a photo' is 2 tokens for this tokenizer and num_vectors is 1"),
        ("<zq>", "   ", "method.initializer_token: '   ' is no token for this tokenizer; give a word"),
    ],
)
def test_placeholder_checks(fresh_pipe, placeholder, initializer, message):
    with pytest.raises(RecipeError, match=message):
        add_placeholder(fresh_pipe.tokenizer, fresh_pipe.text_encoder, placeholder, initializer, 1)


@pytest.mark.parametrize(
    ("initializer", "num_vectors", "starts"),
    [("object", 2, ["object", "object"]), ("<ps>", 3, ["<", "ps", ">"]), ("a photo", 3, ["a", "photo", "a"])],
)
def test_vector_i_starts_at_the_initializers_token_i_mod_n(fresh_pipe, initializer, num_vectors, starts):
    tokenizer, text_encoder = fresh_pipe.tokenizer, fresh_pipe.text_encoder
    start_ids = [tokenizer.encode(word, add_special_tokens=False)[0] for word in starts]
    ids = add_placeholder(tokenizer, text_encoder, "<ps>", initializer, num_vectors)
    rows = text_encoder.get_input_embeddings().weight
    assert torch.equal(rows[ids], rows[start_ids])


def test_a_known_token_stops_the_trainer_in_one_line(tmp_path):
    args = [
        str(RECIPE),
        f"output.dir={tmp_path / 'run'}",
        "method.placeholder_token=cat",
        "data.caption_template=a cat",
    ]
    proc = run_trainer(args, tmp_path / "cache", script=SCRIPT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "method.placeholder_token: 'cat' is already a token" in errors[0]
    assert "Traceback" not in proc.stderr


def test_only_the_new_vectors_train_and_other_prompts_are_untouched(fresh_pipe):
    tokenizer, text_encoder = fresh_pipe.tokenizer, fresh_pipe.text_encoder
    text_encoder.requires_grad_(False)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    before = text_encoder(ids)[0]
    token_ids = add_placeholder(tokenizer, text_encoder, "<zq>", "object", 2)
    vectors = TokenVectors(text_encoder, token_ids)
    hook_into(text_encoder, vectors)
    rows = text_encoder.get_input_embeddings().weight
    assert torch.equal(vectors.vectors.data, rows[token_ids].float())  # both start as "object"
    assert torch.equal(rows[token_ids[0]], rows[tokenizer.convert_tokens_to_ids("object</w>")])
    caption = spell_out(tokenizer, "a <zq>", "<zq>")
    assert caption == "a <zq> <zq>_1"
    with torch.no_grad():
        vectors.vectors.add_(torch.randn_like(vectors.vectors))
    states = text_encoder(tokenizer([caption], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    states.sum().backward()
    assert vectors.vectors.grad is not None and vectors.vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in text_encoder.parameters())  # nothing of the encoder trains, no 49408-row grad
    assert torch.equal(text_encoder(ids)[0], before)  # a prompt without the token encodes as before
    with vectors.untrained(), torch.no_grad():
        untrained = text_encoder(tokenizer([caption], padding="max_length", return_tensors="pt").input_ids)[0]
    assert not torch.allclose(untrained, states)


# -- files ----------------------------------------------------------------------------------------------------------


def test_both_files_hold_the_layouts_the_tools_read(tmp_path):
    vectors = torch.randn(2, 64)
    files = save_embedding(tmp_path, "<zq>", vectors, torch.float16, "zq")
    assert files["embedding"].name == "learned_embeds.safetensors" and files["a1111"].name == "zq.safetensors"
    diffusers_sd = safetensors.torch.load_file(files["embedding"])
    a1111_sd = safetensors.torch.load_file(files["a1111"])
    assert list(diffusers_sd) == ["<zq>"] and list(a1111_sd) == [A1111_KEY]
    for tensors in (diffusers_sd, a1111_sd):
        (tensor,) = tensors.values()
        assert tensor.shape == (2, 64) and tensor.dtype == torch.float16
        assert torch.equal(tensor, vectors.half())
    assert read_embedding(files["embedding"]).token == "<zq>" and read_embedding(files["a1111"]).token is None


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"clip_g": torch.zeros(2, 1280), "clip_l": torch.zeros(2, 768)}, "an SDXL embedding"),
        ({"emb_params": torch.zeros(2, 1024)}, "1024 wide (SD 2.x); this base's text encoder is 64 wide"),
        ({"<x>": torch.zeros(1, 768)}, "768 wide (SD v1); this base's text encoder is 64 wide"),
    ],
)
def test_an_embedding_for_another_text_encoder_is_one_line_on_import_and_sample(tmp_path, tensors, message):
    from sdtune.studio import api

    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    registry = Registry(tmp_path / "home")
    with pytest.raises(EmbeddingError, match=re.escape(message)) as refused:
        import_adapter(path, base="toy", registry=registry)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)
    assert registry.list() == []
    with pytest.raises(api.StudioError, match=re.escape(message)):
        api.sample_images(["a <x>"], tmp_path / "out", embeddings=[str(path)], steps=1)
    assert not (tmp_path / "out").exists()


def test_an_imported_embedding_registers_with_both_files_and_its_token(tmp_path):
    path = tmp_path / "shiny.safetensors"
    safetensors.torch.save_file({A1111_KEY: torch.randn(3, 64)}, str(path))  # A1111: named by its file
    registry = Registry(tmp_path / "home")
    entry, report = import_adapter(path, base="toy", registry=registry)
    assert report.format == "embedding" and report.detail == "textual inversion, 3 vectors (a1111 layout)"
    assert entry.method == "textual_inversion" and entry.kind == "embedding" and entry.trigger_words == ["shiny"]
    manifest = registry.manifest(entry.name)
    assert manifest.files == {"embedding": "learned_embeds.safetensors", "a1111": "shiny.safetensors"}
    reread = from_tensors(safetensors.torch.load_file(registry.file(entry.name, "embedding")), "x")
    assert reread.token == "shiny" and torch.equal(reread.vectors, safetensors.torch.load_file(path)[A1111_KEY])


def test_ab_specs_take_embeddings_without_weights():
    side = parse_spec("toy+toy-purple:0.8+emb=toy-zq+emb=runs/ti")
    assert side.pipeline.embeddings == ["toy-zq", "runs/ti"] and [u.ref for u in side.pipeline.adapters] == [
        "toy-purple"
    ]
    with pytest.raises(ABError, match="an embedding has no weight; write emb=toy-zq"):
        parse_spec("toy+emb=toy-zq:0.5")
    with pytest.raises(ABError, match="write emb=NAME_OR_FILE"):
        parse_spec("toy+emb=")


# -- captions -------------------------------------------------------------------------------------------------------


def _recipe(tmp_path, *overrides):
    return load_recipe(str(RECIPE), [f"data.train_data_dir={tmp_path / 'data'}", *overrides])


def test_images_without_captions_train_on_template_sentences(tmp_path):
    sys.path.insert(0, str(ROOT / "trainers"))
    from textual_inversion import TEMPLATES, captioned_images

    toyworld.write_dataset(tmp_path / "data", 4, seed=0, colors=["green"], shapes=["triangle"])
    (tmp_path / "data" / "0000.txt").unlink()
    (tmp_path / "data" / "0001.txt").write_text("a <zq> on grey\n")
    scan = captioned_images(_recipe(tmp_path, "data.caption_template='{caption}'"))
    captions = {Path(r.path).name: r.caption for r in scan.records}
    assert captions["0000.png"] == TEMPLATES[0].format("<zq>") and captions["0001.png"] == "a <zq> on grey"
    assert captions["0002.png"] == "a green triangle"  # its own caption, as for a LoRA (it does not train <zq>)
    assert captioned_images(_recipe(tmp_path)).records[0].caption == ""  # the template holds the placeholder


def test_a_run_whose_captions_never_name_the_placeholder_is_refused(tmp_path):
    sys.path.insert(0, str(ROOT / "trainers"))
    from textual_inversion import captioned_images

    from sdtune.trainers.core.data import DataError

    toyworld.write_dataset(tmp_path / "data", 2, seed=0, colors=["green"], shapes=["triangle"])
    with pytest.raises(DataError, match="method.placeholder_token: no training caption holds '<zq>'"):
        captioned_images(_recipe(tmp_path, "data.caption_template='{caption}'"))


# -- the proof: a real run ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory):
    """recipes/textual_inversion.yaml on 16 generated green triangles, through `accelerate launch`."""
    root = tmp_path_factory.mktemp("ti")
    toyworld.write_dataset(root / "data", 16, seed=3, colors=["green"], shapes=["triangle"])
    args = [str(RECIPE), f"data.train_data_dir={root / 'data'}", f"output.dir={root / 'run'}",
            "validation.validation_steps=0", "output.report_to=none"]  # fmt: skip
    proc = run_trainer(args, root / "cache", "accelerate", script=SCRIPT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root / "run"


@pytest.mark.slow
def test_zq_comes_to_draw_green_triangles(ti_run):
    manifest = json.loads((ti_run / "adapter.json").read_text())
    assert manifest["method"] == "textual_inversion" and manifest["trigger_words"] == ["<zq>"]
    assert manifest["scores"]["base"]["both"] <= 0.2, manifest["scores"]  # the untrained token
    assert manifest["scores"]["adapter"]["both"] >= 0.8, manifest["scores"]
    check = manifest["export_check"]
    assert check["ok"] and set(check["max_pixel_diff"]) == {"trained-vs-embedding", "trained-vs-a1111",
                                                            "embedding-vs-a1111"}  # fmt: skip
    assert manifest["files"] == {"embedding": "learned_embeds.safetensors", "a1111": "zq.safetensors"}
    assert read_embedding(ti_run / "zq.safetensors").vectors.shape == (2, 64)
    assert manifest["training"]["num_vectors"] == 2
    entry = next(e for e in Registry().list() if e.trigger_words == ["<zq>"])
    assert entry.kind == "embedding" and (entry.folder / "zq.safetensors").is_file()


@pytest.mark.slow
def test_sample_with_the_embedding_stacks_with_a_lora(ti_run, tmp_path):
    """`sdtune sample --embedding RUN --adapter LORA`: the LoRA (random, strong) changes the image, the embedding
    still loads beside it; alone, the run folder's embedding draws the green triangle."""
    from sdtune.adapters.compose import AdapterUse, PipelineSpec, build

    lora = tmp_path / "lora.safetensors"
    safetensors.torch.save_file(_random_kohya_lora(), str(lora))
    cmd = [sys.executable, "-m", "sdtune.studio.cli", "sample", "--prompt", "a <zq>", "--embedding", str(ti_run),
           "--seed", "0", "--seed", "1", "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=trainer_env(tmp_path / "c"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    images = [toyworld.score_image(Image.open(p)) for p in sorted((tmp_path / "out").glob("*.png"))]
    assert [(d.color, d.shape) for d in images] == [("green", "triangle")] * 2
    alone = build(PipelineSpec("toy", embeddings=[str(ti_run)], device="cpu"))
    both = build(PipelineSpec("toy", [AdapterUse(str(lora))], embeddings=[str(ti_run / "zq.safetensors")]))
    assert set(both.embeddings.values()) == {"zq"} and set(alone.embeddings.values()) == {"<zq>"}
    a = np.asarray(alone.pipe("a <zq>", num_inference_steps=5, guidance_scale=3.0, generator=_gen()).images[0])
    b = np.asarray(both.pipe("a zq", num_inference_steps=5, guidance_scale=3.0, generator=_gen()).images[0])
    assert np.abs(a.astype(int) - b.astype(int)).max() > 10  # the LoRA is in effect beside the embedding
    both.set([])
    c = np.asarray(both.pipe("a zq", num_inference_steps=5, guidance_scale=3.0, generator=_gen()).images[0])
    assert np.abs(a.astype(int) - c.astype(int)).max() <= 2  # without it: the embedding alone, by its A1111 name


def _gen():
    return torch.Generator().manual_seed(0)


def _random_kohya_lora() -> dict:
    """A kohya LoRA on the toy UNet's first attention, strong enough to change every image."""
    from sdtune.adapters.base import load_pipeline

    unet = load_pipeline("toy").unet
    tensors, generator = {}, torch.Generator().manual_seed(0)
    for path in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",):
        out, inp = unet.get_submodule(path).weight.shape
        name = "lora_unet_" + path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    return tensors


# -- publish and the studio -----------------------------------------------------------------------------------------


def _imported(tmp_path, registry=None):
    path = tmp_path / "shiny.safetensors"
    safetensors.torch.save_file({A1111_KEY: torch.randn(1, 64, generator=torch.Generator().manual_seed(0))}, str(path))
    return import_adapter(path, base="toy", registry=registry)[0]


def test_publish_tags_an_embedding_and_renders_its_widget_with_it(tmp_path):
    from sdtune.adapters.publish import build_repo_folder

    registry = Registry(tmp_path / "home")
    entry = _imported(tmp_path, registry)
    built = build_repo_folder(entry.name, "alice/shiny", tmp_path / "repo", registry=registry)
    assert "- textual-inversion" in built.card and "instance_prompt: shiny" in built.card
    assert 'pipe.load_textual_inversion("alice/shiny", weight_name="learned_embeds.safetensors")' in built.card
    assert "`embeddings/`" in built.card and "`embedding:shiny`" in built.card
    assert {"learned_embeds.safetensors", "shiny.safetensors", "images/00.png"} <= set(built.files)


def test_registry_shows_the_kind_and_ab_picks_an_embedding(tmp_path, monkeypatch):
    from test_studio_pages import page, texts

    from sdtune.studio import api

    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    _imported(tmp_path)
    at = page("registry")
    assert list(at.dataframe[0].value["kind"]) == ["embedding"]
    at = page("ab")
    at.multiselect(key="ab-B-emb").set_value(["shiny"])
    at.text_area(key="ab-prompts").set_value("a shiny")
    at.text_input(key="ab-seeds").set_value("0")
    at.number_input(key="ab-steps").set_value(5)
    at.checkbox(key="ab-blind").uncheck()
    at = at.button(key="FormSubmitter:ab-settings-Render A and B").click().run()
    assert not texts(at, "error"), texts(at, "error")
    [comparison] = api.ab_history()
    assert comparison["sides"] == {"a": "toy", "b": "toy+emb=shiny"}


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """Every source of randomness of a TI step (flips, timesteps, noise) comes back after a kill: the vectors of a
    run killed after a checkpoint and resumed equal those of an unbroken run, bit for bit."""
    toyworld.write_dataset(tmp_path / "data", 6, seed=3, colors=["green"], shapes=["triangle"])
    small = [f"data.train_data_dir={tmp_path / 'data'}", "train.max_train_steps=12", "train.train_batch_size=2",
             "train.checkpointing_steps=4", "validation.prompts=[]", "validation.toy_score=[]",
             "output.report_to=none", "output.export_check=false", "output.register=false"]  # fmt: skip
    reference = run_trainer([str(RECIPE), f"output.dir={tmp_path / 'ref'}", *small], tmp_path / "c", script=SCRIPT)
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "run"
    proc = start_trainer([str(RECIPE), f"output.dir={out}", *small], tmp_path / "c", script=SCRIPT)
    kill_after_checkpoint(proc, out, 8)
    resumed = run_trainer(
        [str(RECIPE), f"output.dir={out}", "train.resume=latest", *small], tmp_path / "c", script=SCRIPT
    )
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    got, want = (safetensors.torch.load_file(p / "learned_embeds.safetensors") for p in (out, tmp_path / "ref"))
    assert torch.equal(got["<zq>"], want["<zq>"])
