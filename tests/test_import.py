"""Importing adapters: a golden kohya file written with sd-scripts' key conventions (LoCon convs, legacy
`lora_te_text_model_` keys, alpha != rank, fp16) imports, samples through its registry name as its arithmetic says,
and round-trips both formats; ControlNets and DreamBooth models register; bad input is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from sdtune.adapters import a1111_keys, compose, sampling
from sdtune.adapters.export_check import applied
from sdtune.adapters.importer import ImportRefused, import_adapter, inspect
from sdtune.adapters.kohya import a1111_lora_hash
from sdtune.adapters.lora_modules import base_shapes, module_table, read_kohya, read_peft
from sdtune.adapters.manifest import read_manifest
from sdtune.adapters.registry import Registry, RegistryError
from sdtune.adapters.single_file_keys import text_encoder_to_original, unet_to_original

# kohya module name (as sd-scripts' LoRANetwork names it: "lora_unet_" + diffusers path with "." -> "_") -> the
# diffusers module, rank, alpha. Hand-written, not derived: this is the published key scheme the import must read.
GOLDEN = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 4, 2.0),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0": ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0", 4, 2.0),
    "lora_unet_mid_block_attentions_0_proj_in": ("unet", "mid_block.attentions.0.proj_in", 4, 2.0),
    "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1", 2, 1.0),  # LoCon 3x3
    "lora_unet_up_blocks_0_resnets_2_conv2": ("unet", "up_blocks.0.resnets.2.conv2", 2, 1.0),  # LoCon 3x3
    "lora_unet_up_blocks_1_resnets_0_conv_shortcut": ("unet", "up_blocks.1.resnets.0.conv_shortcut", 2, 1.0),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj", 4, 8.0),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": ("text_encoder", "encoder.layers.1.mlp.fc1", 4, 8.0),
}  # fmt: skip
SD_SCRIPTS_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1"}),
    "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
    "ss_base_model_version": "sd_v1",
    "ss_steps": "1200",
    "modelspec.sai_model_spec": "1.0.1",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.trigger_phrase": "zkz, golden",
}


def golden_tensors(toy_pipe, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (component, path, rank, alpha) in GOLDEN.items():
        weight = getattr(toy_pipe, component).get_submodule(path).weight
        out, inp, *kernel = weight.shape
        down = torch.randn(rank, inp, *kernel, generator=generator) * 0.5
        up = torch.randn(out, rank, *([1, 1] if kernel else []), generator=generator) * 0.5
        tensors[f"{name}.lora_down.weight"] = down.half()
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.alpha"] = torch.tensor(alpha).half()  # sd-scripts saves alpha in the save dtype too
    return tensors


@pytest.fixture
def golden_file(toy_pipe, tmp_path):
    path = tmp_path / "golden_locon.safetensors"
    safetensors.torch.save_file(golden_tensors(toy_pipe), str(path), metadata=SD_SCRIPTS_METADATA)
    return path


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "home")


SETTINGS = sampling.SampleSettings("a red circle", seed=0, steps=10, guidance=3.0)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def render(pipe) -> np.ndarray:
    return pixels(sampling.generate(pipe, [SETTINGS])[0].image)


def test_golden_kohya_file_imports_and_samples_as_its_arithmetic_says(golden_file, registry, toy_pipe):
    entry, report = import_adapter(golden_file, base="toy", registry=registry)
    assert report.ok and report.format == "kohya" and report.matched == report.modules == len(GOLDEN)
    assert report.detail == "LoCon (conv layers too), with text encoder"
    assert report.claimed_base["ss_sd_model_name"] == "v1-5-pruned-emaonly.safetensors"
    manifest = read_manifest(entry.folder)
    assert entry.name == "golden_locon" and manifest.method == "lora" and manifest.trigger_words == ["zkz", "golden"]
    assert manifest.files == {"peft": "pytorch_lora_weights.safetensors", "kohya": "golden_locon.safetensors"}
    origin = manifest.origin
    assert (
        origin["kind"] == "imported"
        and origin["metadata"]["ss_network_args"] == SD_SCRIPTS_METADATA["ss_network_args"]
    )
    assert (
        origin["hashes"]["sshs_model_hash"] == a1111_lora_hash(golden_file) and len(origin["hashes"]["sha256"]) == 64
    )
    # the kohya file is kept byte for byte (its hashes stay what other tools computed)
    assert (entry.folder / "golden_locon.safetensors").read_bytes() == golden_file.read_bytes()
    assert manifest.training == {"steps": 1200}

    # sampling by registry name, through both stored formats, gives what W + alpha/r up@down gives
    modules = read_kohya(safetensors.torch.load_file(str(golden_file)))
    table = module_table(*base_shapes(toy_pipe))
    base = render(toy_pipe)
    with applied(toy_pipe, modules, table):
        reference = render(toy_pipe)
    assert np.abs(reference - base).max() > 10, "the golden LoRA must visibly change the image"
    composer = compose.build(compose.PipelineSpec(base="toy", adapters=[compose.AdapterUse(entry.name)]), registry)
    assert np.abs(render(composer.pipe) - reference).max() <= 2
    # the kohya file as kept: every module maps in A1111's and ComfyUI's key tables for this base. (diffusers' own
    # kohya loader is not the reference here: with per-module ranks and alphas like these it renders it differently,
    # which is why the registry serves diffusers the PEFT file it converts itself.)
    unet_keys, te_keys = toy_pipe.unet.state_dict(), toy_pipe.text_encoder.state_dict()
    original = list(unet_to_original(unet_keys, toy_pipe.unet.config)) + list(text_encoder_to_original(te_keys))
    kohya_tensors = safetensors.torch.load_file(str(registry.file(entry.name, "kohya")))
    assert (
        a1111_keys.unmatched_kohya_keys(kohya_tensors, a1111_keys.compvis_modules_from_checkpoint_keys(original)) == []
    )
    comfy = a1111_keys.comfyui_lora_key_map(unet_keys.keys(), te_keys.keys())
    assert a1111_keys.comfyui_unmatched_kohya_keys(kohya_tensors, comfy) == []


def test_round_trip_kohya_to_peft_to_kohya(golden_file, registry, tmp_path):
    first, _ = import_adapter(golden_file, registry=registry)
    [peft] = registry.export(first.name, tmp_path / "peft.safetensors", fmt="peft")
    second, report = import_adapter(peft, name="again", registry=registry)
    assert report.format == "peft" and report.ok
    [kohya] = registry.export("again", tmp_path / "back.safetensors", fmt="kohya")
    original = read_kohya(safetensors.torch.load_file(str(golden_file)))
    back = read_kohya(safetensors.torch.load_file(str(kohya)))
    via_peft = read_peft(safetensors.torch.load_file(str(peft)), safetensors.safe_open(str(peft), "pt").metadata())
    assert sorted(back) == sorted(original) == sorted(via_peft)
    for name, module in original.items():
        for other in (back[name], via_peft[name]):
            assert other.alpha == module.alpha and torch.equal(other.down, module.down), name
            assert torch.equal(other.up, module.up), name


def test_dry_run_reports_without_registering(golden_file, tmp_path, monkeypatch, capsys):
    """`sdtune adapters import --dry-run` prints the check and leaves the registry it would write to empty; the same
    command without it registers there, so the empty list is not just another registry's."""
    from sdtune.studio import cli

    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    registry = Registry(tmp_path / "home")
    assert cli.main(["adapters", "import", str(golden_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kohya (") and "match toy" in out and "registered" not in out
    assert registry.list() == []
    assert cli.main(["adapters", "import", str(golden_file)]) == 0
    assert "registered as golden_locon" in capsys.readouterr().out
    assert [entry.name for entry in registry.list()] == ["golden_locon"]


def _sd15_lora(path):
    """A LoRA for the real SD v1-5 (768-wide cross-attention, 4 down levels): its keys are SD v1 keys, but most
    modules are not in the toy base and the rest do not fit its shapes."""
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4),
        "lora_unet_down_blocks_2_attentions_1_proj_in.lora_down.weight": torch.zeros(4, 1280),
        "lora_unet_down_blocks_2_attentions_1_proj_in.lora_up.weight": torch.zeros(1280, 4),
    }
    safetensors.torch.save_file(tensors, str(path))


def _write(kind: str, tmp_path, golden_file):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        data = golden_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "sdxl":
        safetensors.torch.save_file(
            {
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
                "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
            },
            str(path),
        )  # fmt: skip
    elif kind == "pickle":
        path = tmp_path / "model.ckpt"
        torch.save(safetensors.torch.load_file(str(golden_file)), path)
    elif kind == "pickle-named-safetensors":
        torch.save(safetensors.torch.load_file(str(golden_file)), path)
    elif kind == "loha-incomplete":
        safetensors.torch.save_file(
            {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, str(path)
        )
    elif kind == "ia3":
        ia3 = {"lora_unet_mid_block_attentions_0_proj_in.weight": torch.zeros(2)}
        safetensors.torch.save_file(
            {**ia3, "lora_unet_mid_block_attentions_0_proj_in.on_input": torch.zeros(1)}, str(path)
        )
    elif kind == "unknown":
        safetensors.torch.save_file({"weight": torch.zeros(2)}, str(path))
    elif kind == "sd15-on-toy":
        _sd15_lora(path)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "not a readable safetensors file .*truncated or corrupt"),
        ("sdxl", "architecture mismatch: this is an SDXL adapter"),
        ("pickle", "refused: a pickle file"),
        ("pickle-named-safetensors", "refused: a pickle file"),
        ("loha-incomplete", "loha module 'lora_unet_mid_block_attentions_0_proj_in' has no hada_w1_b"),
        ("ia3", "unsupported LyCORIS algorithm: IA3"),
        ("unknown", "unknown format"),
        (
            "sd15-on-toy",
            "does not fit toy:(.|\n)*unmatched in unet down_blocks.2: 1(.|\n)*shape: lora_unet_down_blocks_0",
        ),
    ],
)
def test_bad_input_is_refused_and_nothing_is_registered(kind, message, tmp_path, golden_file, registry):
    path = _write(kind, tmp_path, golden_file)
    with pytest.raises(ImportRefused, match=message):
        import_adapter(path, registry=registry)
    assert registry.list() == [] and registry.check().ok


def test_name_clash_and_trusted_pickle(tmp_path, golden_file, registry):
    import_adapter(golden_file, name="mine", registry=registry)
    with pytest.raises(RegistryError, match="name clash: an adapter named 'mine'"):
        import_adapter(golden_file, name="mine", registry=registry)
    pickle = _write("pickle", tmp_path, golden_file)
    entry, report = import_adapter(pickle, allow_pickle=True, registry=registry)
    assert report.ok and entry.name == "model" and read_manifest(entry.folder).files["kohya"] == "model.safetensors"


def test_a_controlnet_for_another_unet_is_refused_with_its_mismatches(tmp_path, toy_pipe, registry):
    """A ControlNet steers through the base's own blocks: one made from a UNet with another text width (as SD 2's
    1024 or SDXL's 2048 differ from SD v1's 768) is refused, folder or single file, naming the tensors."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    config = {**toy_pipe.unet.config, "cross_attention_dim": toy_pipe.unet.config.cross_attention_dim * 2}
    other = ControlNetModel.from_unet(UNet2DConditionModel.from_config(config))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ImportRefused, match=r"does not fit toy(.|\n)*shape: .*attn2\.to_k\.weight"):
        import_adapter(tmp_path / "other", registry=registry)
    single = tmp_path / "other.safetensors"
    safetensors.torch.save_file(other.state_dict(), str(single))
    report = inspect(single, base="toy")
    assert not report.ok and report.shape_mismatches and report.matched < report.modules
    assert registry.list() == []
    ControlNetModel.from_unet(toy_pipe.unet).save_pretrained(tmp_path / "fits")
    fitting = inspect(tmp_path / "fits", base="toy")
    assert fitting.ok and fitting.matched == fitting.modules > 0


def test_controlnet_and_dreambooth_models_register(tmp_path, toy_base, toy_pipe, registry):
    import shutil

    from diffusers import ControlNetModel

    ControlNetModel.from_unet(toy_pipe.unet).save_pretrained(tmp_path / "cn")
    cn, report = import_adapter(tmp_path / "cn", name="toy-canny", registry=registry)
    assert report.format == "controlnet" and read_manifest(cn.folder).files == {"controlnet": "cn"}
    single = tmp_path / "cn.safetensors"
    safetensors.torch.save_file(ControlNetModel.from_unet(toy_pipe.unet).state_dict(), str(single))
    cn2, report = import_adapter(single, name="toy-canny-file", registry=registry)
    assert report.format == "controlnet" and report.detail == "single file"
    shutil.copytree(tmp_path / "cn", tmp_path / "older")  # a config without _class_name, as sdtune wrote before
    config = json.loads((tmp_path / "older" / "config.json").read_text())
    del config["_class_name"]
    (tmp_path / "older" / "config.json").write_text(json.dumps(config))
    assert inspect(tmp_path / "older", base="toy").format == "controlnet"

    shutil.copytree(toy_base, tmp_path / "wider")  # a full model whose UNet reads a wider text encoder
    config = json.loads((tmp_path / "wider" / "unet" / "config.json").read_text())
    config["cross_attention_dim"] *= 2
    (tmp_path / "wider" / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportRefused, match=r"does not fit toy(.|\n)*unet.cross_attention_dim: \d+ in the model"):
        import_adapter(tmp_path / "wider", name="wider", registry=registry)

    shutil.copytree(toy_base, tmp_path / "dreambooth")
    db, report = import_adapter(tmp_path / "dreambooth", name="toy-db", registry=registry)
    assert report.format == "dreambooth" and read_manifest(db.folder).files == {"diffusers": "model"}
    assert [e.name for e in registry.list(method="dreambooth")] == ["toy-db"]
    assert sorted(e.name for e in registry.list(method="controlnet")) == ["toy-canny", "toy-canny-file"]
    # a registered full model is a base for composition
    assert compose.resolve_base_ref("toy-db", registry) == str(db.folder / "model")
    with pytest.raises(compose.ComposeError, match="is a controlnet model, not a LoRA"):
        compose.resolve_adapter("toy-canny", registry)


def test_resized_and_concatenated_imports_pass_the_export_check_and_record_parents(golden_file, registry):
    from sdtune.adapters.merge import merge_into_registry, resize_into_registry

    import_adapter(golden_file, name="golden", registry=registry)
    resized = resize_into_registry("golden-r2", "golden", 2, registry=registry, prompt="a red circle")
    dynamic = resize_into_registry(
        "golden-dyn", "golden", 4, dynamic="sv_ratio", param=2.0, registry=registry, prompt="a red circle"
    )
    concat = merge_into_registry("golden-x2", ["golden", "golden"], [0.5, 0.5], "concat", registry=registry)
    for entry in (resized, dynamic, concat):
        manifest = read_manifest(entry.folder)
        assert manifest.export_check["ok"] and max(manifest.export_check["max_pixel_diff"].values()) <= 2, entry.name
        assert manifest.export_check["unmatched_a1111"] == manifest.export_check["unmatched_comfyui"] == []
        assert set(manifest.files) == {"peft", "kohya"} and manifest.trigger_words == ["zkz", "golden"]
    origin = read_manifest(resized.folder).origin
    assert origin["parents"] == ["golden"] and origin["merge_method"] == "resize" and origin["params"]["max_rank"] == 2
    assert read_manifest(resized.folder).training["ranks"] == [2]
    assert read_manifest(concat.folder).origin["weights"] == [0.5, 0.5]
    # concat of a LoRA with itself at 0.5 + 0.5 is the LoRA: twice the rank, the same weight change
    original = read_kohya(safetensors.torch.load_file(str(golden_file)))
    doubled = read_kohya(safetensors.torch.load_file(str(registry.file("golden-x2", "kohya"))))
    for name, module in original.items():
        assert doubled[name].rank == 2 * module.rank
        assert torch.allclose(doubled[name].delta(), module.delta(), atol=2e-2), name  # fp16 storage
