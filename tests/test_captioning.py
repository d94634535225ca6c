"""Captioners and taggers (adapters/captioners.py), the write modes (studio/captioning.py), `sdtune caption` and masks
from threshold and fill controls (adapters/mask_edit.py), with no download: the BLIP model is a tiny one built from a
small config with seeded random weights and saved into tmp_path, the WD14 tagger a tiny ONNX graph built here with
the real signature, loaded through the same from_pretrained / InferenceSession paths the command uses.
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.adapters import captioners, mask_edit, toyworld
from sdtune.studio import api, captioning
from sdtune.studio.cli import main as sdtune

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "datasets" / "quickstart-purple"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def uncaptioned_quickstart(folder: Path) -> Path:
    """The quickstart's purple images without their captions."""
    folder.mkdir(parents=True)
    for image in sorted(QUICKSTART.glob("*.png")):
        shutil.copy(image, folder / image.name)
    return folder


def captions(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in sorted(folder.glob("*.txt"))}


# -- the toy captioner and the write modes --------------------------------------------------------------------------


def test_the_toy_captioner_writes_the_quickstarts_captions(tmp_path, capsys):
    folder = uncaptioned_quickstart(tmp_path / "purple")
    assert sdtune(["caption", str(folder)]) == 0  # toy and "missing" are the defaults
    assert captions(folder) == captions(QUICKSTART)
    assert "16 captions changed, 0 unchanged" in capsys.readouterr().out
    assert sdtune(["caption", str(folder)]) == 0  # resumable: nothing left to caption
    assert "0 captions changed, 0 unchanged, 16 already captioned (kept)" in capsys.readouterr().out


@pytest.mark.slow
def test_an_uncaptioned_purple_dataset_captioned_by_toy_trains_to_the_quickstarts_score(tmp_path):
    """The whole offline flow: uncaptioned images, the toy captioner, the quickstart recipe, the toy-world score
    (tests/test_lora.py's bar for the quickstart itself)."""
    import json

    from conftest import QUICKSTART as RECIPE
    from conftest import run_trainer

    folder = uncaptioned_quickstart(tmp_path / "purple")
    assert len(api.caption_folder(folder)["changes"]) == 16
    out = tmp_path / "run"
    args = [str(RECIPE), f"output.dir={out}", f"data.train_data_dir={folder}", "output.register=false"]
    proc = run_trainer(args, tmp_path / "cache", "accelerate")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    scores = json.loads((out / "adapter.json").read_text())["scores"]
    assert scores["adapter"]["n"] == 12 and scores["adapter"]["both"] >= 0.8, scores


@pytest.mark.parametrize(
    ("old", "mode", "trigger", "expected"),
    [
        ("old words", "replace", "", "a red circle"),
        ("old words", "append", "", "old words, a red circle"),
        ("", "append", "", "a red circle"),
        ("old words", "prefix", "sks", "sks, a red circle"),
        ("", "missing", "sks", "sks, a red circle"),
        ("old words", "replace", "circle", "a red circle"),  # the trigger is there already: not twice
    ],
)
def test_write_modes(old, mode, trigger, expected):
    assert captioning.new_caption(old, "a red circle", mode, trigger) == expected


def test_dry_run_prints_what_would_change_and_writes_nothing(tmp_path, capsys):
    folder = uncaptioned_quickstart(tmp_path / "purple")
    (folder / "0000.txt").write_text("hand written")
    assert sdtune(["caption", str(folder), "--mode", "append", "--dry-run", "--batch-size", "5"]) == 0
    out = capsys.readouterr().out
    assert "0000.png: 'hand written' -> 'hand written, a purple circle'" in out
    assert "16 captions would change, 0 unchanged (dry run: nothing written)" in out
    assert captions(folder) == {"0000.txt": "hand written"}


def test_missing_mode_resumes_a_stopped_run_in_batches(tmp_path):
    folder = uncaptioned_quickstart(tmp_path / "purple")
    seen = []
    result = api.caption_folder(folder, batch_size=6, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(6, 16), (12, 16), (16, 16)]
    for name in ("0001.txt", "0002.txt"):  # as if the run had stopped before these
        (folder / name).unlink()
    result = api.caption_folder(folder, batch_size=6)
    assert [c["file"] for c in result["changes"]] == ["0001.png", "0002.png"] and result["kept"] == 14


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "prefix"}, "--mode prefix: name the trigger word"),
        ({"mode": "overwrite"}, "--mode overwrite: one of replace, append, prefix, missing"),
        ({"batch_size": 0}, "--batch-size 0: at least 1"),
        ({"model": "no/such-model"}, "--model no/such-model: not in the Hugging Face cache"),
        ({"model": "nowhere"}, "--model nowhere: no such folder, and not a Hub id"),
        ({"general_threshold": 1.5}, "general-threshold 1.5: a probability, 0 to 1"),
    ],
)
def test_bad_options_are_one_line(tmp_path, kwargs, message):
    folder = uncaptioned_quickstart(tmp_path / "purple")
    with pytest.raises(api.StudioError, match=message.replace("(", r"\(")):
        api.caption_folder(folder, **kwargs)
    assert captions(folder) == {}


def test_an_unreadable_image_is_skipped_with_its_reason(tmp_path):
    folder = uncaptioned_quickstart(tmp_path / "purple")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "blank.png").write_bytes(png(Image.new("RGB", (64, 64), (236, 236, 232))))
    result = api.caption_folder(folder)
    skipped = {row["file"]: row["reason"] for row in result["skipped"]}
    assert skipped["broken.png"].startswith("unreadable image (")
    assert skipped["blank.png"] == "the toy captioner found nothing to say"
    assert len(result["changes"]) == 16 and "broken.txt" not in captions(folder)


def test_a_workspace_dataset_is_captioned_through_the_store_and_its_frozen_version_does_not_change(home, capsys):
    from sdtune.studio import datasets_store

    images = sorted(QUICKSTART.glob("*.png"))[:4]
    api.upload_to_dataset("purple", [(p.name, p.read_bytes()) for p in images] + [("0000.txt", b"sks")])
    version = api.freeze_dataset("purple")  # a job trains on this while the work copy is captioned
    assert sdtune(["caption", "purple", "--mode", "replace", "--trigger", "sks"]) == 0
    assert {i["file"]: i["caption"] for i in api.dataset_images("purple")} == {
        p.name: f"sks, {(QUICKSTART / p.name).with_suffix('.txt').read_text().strip()}" for p in images
    }
    frozen = Path(version["path"])
    assert datasets_store.fingerprint(frozen) == version["fingerprint"]  # not a byte of the version changed
    assert captions(frozen / "images") == {"0000.txt": "sks"}
    with pytest.raises(SystemExit, match="nothing: no such folder, and no workspace dataset of that name"):
        sdtune(["caption", "nothing"])


# -- a folder that is not a model -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "not a captioner: no config.json (a transformers captioner) and no model.onnx"),
        ({"config.json": '{"model_type": "blip"}'}, "no weights: expected model.safetensors"),
        (
            {"config.json": '{"model_type": "blip"}', "model.safetensors": ""},
            "no preprocessor_config.json (the processor, saved with the model)",
        ),
        ({"config.json": '{"model_type": "bert"}'}, "model_type 'bert' is not a captioner sdtune runs"),
        ({"config.json": "{"}, "config.json: not JSON"),
        (
            {"config.json": '{"model_type": "florence2", "auto_map": {"AutoConfig": "configuration_florence2.F"}}'},
            "a checkpoint that needs trust_remote_code (auto_map)",
        ),
        ({"selected_tags.csv": "tag_id,name,category,count\n"}, "no model.onnx beside selected_tags.csv"),
    ],
)
def test_a_folder_that_is_not_a_model_names_the_missing_file(tmp_path, files, message, capsys):
    from sdtune.studio import cli

    model = tmp_path / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    with pytest.raises(SystemExit) as exited:
        cli.main(["caption", str(QUICKSTART), "--model", str(model), "--dry-run"])
    shown = str(exited.value.code)
    assert shown.startswith("sdtune caption: ") and message in shown and "\n" not in shown, shown
    assert "Traceback" not in capsys.readouterr().err


# -- BLIP: a tiny model of the real architecture --------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "an", "the", "purple", "red", "blue", "circle"]
WORDS += ["square", "star", "triangle", "on", "of", "photo", "picture", "white", "background", "shape", "with"]


def saved_seeded(model_class, config, processor, folder: Path):
    """The model with seeded random weights, saved with its processor as a Hub folder is; (model, processor)."""
    import torch

    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def tiny_blip(folder: Path):
    """A BLIP captioner two layers deep with a 24-word BERT vocabulary, seeded, saved as a Hub folder is."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**small, "vocab_size": len(WORDS), "encoder_hidden_size": 32, "max_position_embeddings": 64}
    text |= {"bos_token_id": 5, "sep_token_id": 3, "eos_token_id": 3, "pad_token_id": 0}
    config = BlipConfig(
        text_config=text,
        vision_config={**small, "image_size": 32, "patch_size": 16},
        projection_dim=32,
        image_text_hidden_size=32,
    )
    return saved_seeded(BlipForConditionalGeneration, config, processor, folder)


def tiny_blip2(folder: Path):
    """A BLIP-2 captioner (ViT, Q-Former, OPT) a few layers deep, with the toy base's CLIP tokenizer, seeded."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        CLIPTokenizer,
    )

    from sdtune.adapters.base import TOY_BASE

    tokenizer = CLIPTokenizer.from_pretrained(TOY_BASE / "tokenizer")
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=4)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**small, "vocab_size": len(tokenizer), "ffn_dim": 64, "word_embed_proj_dim": 32}
    text |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 0}
    config = Blip2Config(
        vision_config={**small, "image_size": 32, "patch_size": 16},
        qformer_config={**small, "encoder_hidden_size": 32, "vocab_size": 100},
        text_config={"model_type": "opt", **text},
        num_query_tokens=4,
        image_token_index=image_token,
    )
    return saved_seeded(Blip2ForConditionalGeneration, config, processor, folder)


def tiny_florence2(folder: Path):
    """A Florence-2 captioner (DaViT, BART) of one layer per stage, with the toy base's CLIP tokenizer, seeded."""
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        CLIPTokenizer,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    from sdtune.adapters.base import TOY_BASE

    tokenizer = CLIPTokenizer.from_pretrained(TOY_BASE / "tokenizer", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False)
    images.image_seq_length = 5  # the 2x2 grid of the last stage, plus its pooled token
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 0}
    text = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id, **ids,
    )  # fmt: skip
    vision = {"depths": (1, 1, 1, 1), "embed_dim": (16, 16, 32, 32), "num_heads": (2, 2, 2, 2)}
    vision |= {"num_groups": (2, 2, 2, 2), "window_size": 2, "projection_dim": 32, "drop_path_rate": 0.0}
    config = Florence2Config(text_config=text.to_dict(), vision_config=vision, image_token_id=tokenizer.image_token_id)
    return saved_seeded(Florence2ForConditionalGeneration, config, Florence2Processor(images, tokenizer), folder)


def reference_captions(model, processor, images: list[Image.Image], prompt: str | None) -> list[str]:
    """What the model itself says, called as its model card does (Florence-2: with the task prompt)."""
    import torch

    if prompt:
        inputs = processor(text=[prompt] * len(images), images=images, return_tensors="pt")
        model_inputs = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
    else:
        model_inputs = {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"]}
    with torch.inference_mode():
        ids = model.generate(**model_inputs, **captioners.BLIP_GENERATE)
    return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


@pytest.mark.parametrize(
    ("family", "build", "prompt"),
    [("blip", tiny_blip, None), ("blip2", tiny_blip2, None), ("florence2", tiny_florence2, "<CAPTION>")],
)
def test_transformers_captioners_load_through_from_pretrained_and_caption_as_the_model_does(
    tmp_path, family, build, prompt
):
    model, processor = build(tmp_path / family)
    folder = uncaptioned_quickstart(tmp_path / "purple")
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    expected = reference_captions(model, processor, images, prompt)
    assert len(expected) == 16 and all(expected)
    assert sdtune(["caption", str(folder), "--model", str(tmp_path / family), "--batch-size", "4"]) == 0
    assert list(captions(folder).values()) == expected
    assert captioners.load_captioner(str(tmp_path / family)).family == family


# -- WD14: a tiny ONNX graph with the real signature ----------------------------------------------------------------

# (name, category, probability the graph gives): category 9 rating, 4 character, 0 general
TAGS = [
    ("general", 9, 0.99),
    ("hatsune_miku", 4, 0.90),
    ("other_character", 4, 0.60),
    ("long_hair", 0, 0.90),
    ("watermark", 0, 0.80),
    ("^_^", 0, 0.50),
    ("smile", 0, 0.30),
    ("blue_sky", 0, None),  # the image's blue: 1 for a blue image, 0 for a red one (the input is BGR)
]


def tiny_wd14(folder: Path, input_shape=("batch", 448, 448, 3), tags=TAGS) -> Path:
    """model.onnx: probabilities = mean over pixels of the BGR input / 255 @ W + B, so each tag's probability is fixed
    but blue_sky's, which is the image's blue channel; and selected_tags.csv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, len(tags)), np.float32)
    weights[0, -1] = 1 / 255  # BGR: channel 0 is blue
    bias = np.array([p or 0.0 for _, _, p in tags], np.float32)
    nodes = [
        # the mean over the two pixel axes: [1, 2] in NHWC, [2, 3] in the (wrong) NCHW of the bad-signature test
        helper.make_node(
            "ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2] if input_shape[3] == 3 else [2, 3], keepdims=0
        ),
        helper.make_node("MatMul", ["mean", "W"], ["scaled"]),
        helper.make_node("Add", ["scaled", "B"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(tags)])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    folder.mkdir()
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), folder / "model.onnx"
    )
    with open(folder / "selected_tags.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows([i, name, category, 1000 - i] for i, (name, category, _) in enumerate(tags))
    return folder


def test_wd14_thresholds_cleanup_rating_and_blacklist(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = tiny_wd14(tmp_path / "wd14")
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (96, 64), (0, 0, 255)).save(folder / "blue.png")  # not square: padded white first
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "red.png")
    args = ["caption", str(folder), "--model", str(model), "--blacklist", "watermark"]
    assert sdtune(args) == 0
    # blue: 2/3 of the padded square is blue, 1/3 white -> blue 1.0 -> blue_sky kept
    assert captions(folder) == {
        "blue.txt": "hatsune miku, blue sky, long hair, ^_^",
        "red.txt": "hatsune miku, long hair, ^_^",
    }
    assert sdtune([*args[:4], "--mode", "replace", "--general-threshold", "0.85", "--character-threshold", "0.5"]) == 0
    assert captions(folder)["red.txt"] == "hatsune miku, other character, long hair"


def test_a_wd14_model_of_the_wrong_signature_is_one_line(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny_wd14(tmp_path / "nchw", input_shape=("batch", 3, 224, 224))
    with pytest.raises(api.StudioError, match=r"model.onnx: wrong signature \(input_1:0 \['batch', 3, 224, 224\]"):
        api.caption_folder(QUICKSTART, str(model), dry_run=True)
    fewer = tiny_wd14(tmp_path / "fewer", tags=TAGS[:-1])
    shutil.copy(model / "selected_tags.csv", fewer / "selected_tags.csv")  # 8 tags for a model of 7 outputs
    with pytest.raises(api.StudioError, match=r"wrong signature .*gives \[batch, 8\]"):
        api.caption_folder(QUICKSTART, str(fewer), dry_run=True)


def test_without_onnxruntime_a_wd14_model_says_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    model = tiny_wd14(tmp_path / "wd14")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(
        api.StudioError, match=r"^WD14 taggers run on onnxruntime, .*: pip install 'sdtune\[taggers\]'$"
    ):
        api.caption_folder(QUICKSTART, str(model), dry_run=True)


# -- masks ----------------------------------------------------------------------------------------------------------


def ring() -> Image.Image:
    """A purple ring on the light background: its hole is background-coloured but enclosed."""
    scene = toyworld.Scene("purple", "circle", radius=20)
    hole = toyworld.Scene("purple", "circle", radius=10, fill=scene.background)
    return toyworld.render(scene, 64, hole)


def test_flood_fill_keeps_an_enclosed_hole_and_grow_widens_the_subject():
    plain = np.asarray(mask_edit.make_mask(ring(), mask_edit.MaskOptions(flood=False))) > 127
    flooded = np.asarray(mask_edit.make_mask(ring(), mask_edit.MaskOptions(flood=True))) > 127
    assert not plain[32, 32] and flooded[32, 32]  # the hole: cut out by the threshold, kept by the flood fill
    assert not flooded[2, 2] and flooded[32, 14]  # the background goes, the ring stays
    grown = np.asarray(mask_edit.make_mask(ring(), mask_edit.MaskOptions(grow=3))) > 127
    shrunk = np.asarray(mask_edit.make_mask(ring(), mask_edit.MaskOptions(grow=-3))) > 127
    assert shrunk.sum() < flooded.sum() < grown.sum() and (flooded <= grown).all() and (shrunk <= flooded).all()
    inverted = np.asarray(mask_edit.make_mask(ring(), mask_edit.MaskOptions(invert=True))) > 127
    assert (inverted == ~flooded).all()
    with pytest.raises(mask_edit.MaskError, match="threshold 2: a colour distance, 0 to 1"):
        mask_edit.MaskOptions(threshold=2)


def test_masks_saved_in_the_studio_are_the_mask_dir_the_trainer_reads(home):
    images = {"a.png": ring(), "b.png": toyworld.render(toyworld.Scene("orange", "square"))}
    api.upload_to_dataset("set", [(name, png(image)) for name, image in images.items()] + [("a.txt", b"a ring")])
    preview = api.mask_preview("set", "a.png", threshold=0.2)
    assert preview["current"] is None and 0.1 < preview["coverage"] < 0.6
    assert Image.open(io.BytesIO(preview["overlay"])).size == (64, 64)
    assert api.save_masks("set", ["a.png"], threshold=0.2)["written"] == ["a.png"]
    assert api.mask_preview("set", "a.png")["current"] == preview["mask"]
    report = api.dataset_report("set", 64)["text"]
    assert "masks: 1 of 2 images have a usable mask" in report and "b.png: no mask" in report
    version = api.freeze_dataset("set")
    assert api.save_masks("set")["written"] == ["a.png", "b.png"]
    assert "masks: 2 of 2 images have a usable mask" in api.dataset_report("set", 64)["text"]
    assert sorted(p.name for p in (Path(version["path"]) / "masks").iterdir()) == ["a.png"]  # the version kept its
    with pytest.raises(api.StudioError, match="c.png: not an image of dataset 'set'"):
        api.mask_preview("set", "c.png")
    api.remove_dataset_image("set", "b.png")  # its mask goes with it, as its caption does
    assert sorted(p.name for p in (Path(api.dataset_info("set")["work_dir"]) / "masks").iterdir()) == ["a.png"]


# -- the Datasets page ----------------------------------------------------------------------------------------------


def datasets_page():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_string(
        "from sdtune.studio.views import datasets\ndatasets.render()\n", default_timeout=600
    ).run()


def test_datasets_page_captions_with_a_progress_bar_and_a_dry_run(home):
    images = sorted(QUICKSTART.glob("*.png"))[:3]
    api.upload_to_dataset("purple", [(p.name, p.read_bytes()) for p in images])
    at = datasets_page()
    [families] = [t.value for t in at.table if "family" in t.value.columns]
    assert families["family"].tolist() == ["toy", "blip", "blip2", "florence2", "wd14"]
    at.checkbox(key="caption-dry").check()
    at = at.button(key="FormSubmitter:caption-run-Caption").click().run()
    assert not at.exception, at.exception
    [dry] = [c.value for c in at.code if "dry run" in c.value]
    assert "0000.png: '' -> 'a purple circle'" in dry
    [bar] = at.get("progress")
    assert bar.proto.value == 100 and bar.proto.text == "done"  # the bar ran to the end
    assert [i["caption"] for i in api.dataset_images("purple")] == ["", "", ""]
    at.checkbox(key="caption-dry").uncheck()
    at.text_input(key="caption-trigger").set_value("sks")
    at = at.button(key="FormSubmitter:caption-run-Caption").click().run()
    assert "3 captions changed, 0 unchanged" in at.success[0].value
    expected = [f"sks, {(QUICKSTART / p.name).with_suffix('.txt').read_text().strip()}" for p in images]
    assert [i["caption"] for i in api.dataset_images("purple")] == expected
    at.text_input(key="caption-trigger").set_value("")
    at.text_input(key="caption-model").set_value(str(home / "nothing-here"))
    at = at.button(key="FormSubmitter:caption-run-Caption").click().run()
    assert [e.value for e in at.error] == [
        f"--model {home / 'nothing-here'}: no such folder, and not a Hub id (owner/name); or use --model toy"
    ]


def test_datasets_page_masks_panel_previews_and_saves(home):
    api.upload_to_dataset("set", [("a.png", png(ring())), ("b.png", png(ring()))])
    at = datasets_page()
    images = len(at.image)
    at = at.toggle(key="masks-set").set_value(True).run()
    assert len(at.image) == images + 2  # the overlay and the mask; no saved mask yet
    assert "no mask saved for this image yet" in [i.value for i in at.info]
    at.checkbox(key="mask-flood").uncheck()
    at = at.run()
    at = at.button(key="mask-save").click().run()
    assert "1 masks written to" in at.success[0].value
    mask_dir = Path(api.dataset_info("set")["work_dir"]) / "masks"
    saved = np.asarray(Image.open(mask_dir / "a.png"))
    assert saved[32, 32] == 0  # flood fill off: the ring's hole is ignored
    at = at.button(key="mask-save-all").click().run()
    assert "2 masks written to" in at.success[0].value
    assert len(at.image) == images + 3  # the saved mask is shown beside the preview


def test_without_onnxruntime_the_page_starts_and_names_the_extra(home, monkeypatch):
    api.upload_to_dataset("purple", [("0000.png", (QUICKSTART / "0000.png").read_bytes())])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    at = datasets_page()
    assert not at.exception, at.exception
    [families] = [t.value for t in at.table if "family" in t.value.columns]
    assert families.set_index("family").loc["wd14", "here"] == "needs onnxruntime: pip install 'sdtune[taggers]'"
    assert families.set_index("family").loc["toy", "here"] == "ready"
