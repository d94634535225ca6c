"""`sdtune recipe from-kohya`: golden sd-scripts / kohya_ss inputs (tests/data/kohya/, written from the keys their
docs and presets use) become recipes that validate and train; every input key is mapped or listed with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import ROOT, run_trainer

from sdtune.studio import cli
from sdtune.trainers.core.recipe import SamplePrompt, load_recipe
from sdtune.trainers.tools import kohya_import
from sdtune.trainers.tools.kohya_import import KohyaImportError, import_kohya, parse_flags, read_config, translate

GOLDEN = ROOT / "tests" / "data" / "kohya"
PURPLE = ROOT / "datasets" / "quickstart-purple"


def _images(folder: Path, count: int, colour: str = "purple", seed: int = 0):
    from sdtune.adapters import toyworld

    toyworld.write_dataset(folder, count, seed=seed, colors=[colour])


@pytest.fixture
def golden(tmp_path):
    """The golden files with their folders (DATA_DIR) in a temp tree: `N_name` kohya folders and a reg folder."""
    data = tmp_path / "data"
    for name in ("lora_preset.json", "dreambooth.toml", "train_network.sh", "datasets.toml"):
        text = (GOLDEN / name).read_text().replace("DATA_DIR", str(data))
        (tmp_path / name).write_text(text.replace('"datasets.toml"', f'"{tmp_path / "datasets.toml"}"'))
    shutil.copytree(PURPLE, data / "img" / "2_sks circle")
    _images(data / "reg" / "1_circle", 4, colour="green", seed=3)
    shutil.copytree(PURPLE, data / "purple")
    _images(data / "squares", 4, seed=5)
    return tmp_path


def _input_keys(path: Path) -> set[str]:
    """Every key a golden file sets, named as the report names it."""
    if path.suffix == ".json":
        args = json.loads(path.read_text())
        keys = set(args) | set(parse_flags(f"x.py {args['additional_parameters']}", path)[1])
    elif path.name == "datasets.toml":
        data = tomllib.loads(path.read_text())
        keys = {f"general.{k}" for k in data["general"]}
        keys |= {f"datasets[0].{k}" for k in data["datasets"][0] if k != "subsets"}
        for i, subset in enumerate(data["datasets"][0]["subsets"]):
            keys |= {f"datasets[0].subsets[{i}].{k}" for k in subset}
        return keys
    elif path.suffix == ".toml":
        keys = {k for section in tomllib.loads(path.read_text()).values() for k in section}
    else:
        keys = set(read_config(path).args)
    args = read_config(path).args
    for name in ("network_args", "optimizer_args"):
        if args.get(name):
            keys |= {f"{name}.{k}" for k, _ in kohya_import.key_value_list(args[name], "", name)}
    return keys


CASES = [("lora_preset.json", None), ("dreambooth.toml", None), ("train_network.sh", "datasets.toml")]


@pytest.mark.parametrize("config,dataset", CASES, ids=[c for c, _ in CASES])
def test_every_key_of_the_golden_files_is_mapped_or_listed(golden, config, dataset):
    tr = translate(read_config(golden / config), golden / dataset if dataset else None)
    expected = _input_keys(golden / config) | (_input_keys(golden / dataset) if dataset else set())
    missing = expected - tr.reported()
    assert not missing, f"keys dropped without a word: {sorted(missing)}"
    for line in tr.unsupported + tr.ignored:  # each with its reason
        assert line.endswith(")") and " (" in line, line
    listed = [line.split(" ", 1)[0] for line in tr.unsupported + tr.ignored]
    assert len(listed) == len(set(listed)), f"listed twice: {sorted(k for k in listed if listed.count(k) > 1)}"


def test_lora_preset_translates_to_what_the_gui_would_train(golden):
    out = golden / "recipe.yaml"
    lines = import_kohya(golden / "lora_preset.json", out)
    recipe = load_recipe(out)
    assert (recipe.method.type, recipe.method.rank, recipe.method.alpha, recipe.method.preset) == (
        "lora",
        16,
        8,
        "attn+ff",
    )
    assert recipe.method.train_text_encoder and recipe.method.text_encoder_lr == 5e-5
    assert recipe.train.learning_rate == 1e-4  # unet_lr
    assert recipe.train.lr_warmup_steps == 150  # lr_warmup: 10 (% of 1500 steps)
    assert (recipe.train.adam_weight_decay, recipe.train.adam_beta2) == (0.05, 0.99)  # optimizer_args
    assert recipe.train.max_grad_norm == 0.5  # from additional_parameters
    assert recipe.train.noise_offset == 0.05 and recipe.train.multires_noise_iterations == 0  # noise_offset_type
    assert recipe.validation.prompts == [  # each GUI line with its own settings (sd-scripts' --n --w --h --s --l)
        SamplePrompt(prompt="a purple circle", negative_prompt="blurry", width=512, height=512, steps=25),
        SamplePrompt(prompt="a purple square", guidance_scale=7),
    ]
    assert recipe.data.resolution == 512 and recipe.data.random_flip and recipe.train.seed == 1234
    if not any(kohya_import.schema_field(key, "lora") for key in ("method.unet_lr", "train.unet_lr")):
        assert "ignored: learning_rate (unet_lr sets train.learning_rate and wins, as in sd-scripts)" in lines
    assert "ignored: wandb_api_key (empty: left unset)" in lines
    text = out.read_text()
    assert "# not supported: epoch (sdtune counts optimizer steps" in text  # the report heads the recipe
    assert "  # lora_preset.json: network_dim = 16\n  rank: 16" in text  # each key's source, by file name


def test_dreambooth_toml_is_a_full_dreambooth_with_its_class_folder(golden):
    tr = translate(read_config(golden / "dreambooth.toml"))
    method, train = tr.recipe["method"], tr.recipe["train"]
    assert method["type"] == "dreambooth" and method["lora"] is False
    assert (method["instance_prompt"], method["identifier"], method["class_prompt"]) == ("sks circle", "sks", "circle")
    assert method["with_prior_preservation"] and method["num_class_images"] == 4  # the reg folder's images
    assert method["class_data_dir"] == str(golden / "data" / "reg")
    assert (method["text_encoder_lr"], method["text_encoder_steps"]) == (5e-7, 400)
    assert train["optimizer_type"] == "adamw8bit" and tr.recipe["data"]["enable_bucket"] is False


def test_flags_and_dataset_config(golden):
    tr = translate(read_config(golden / "train_network.sh"), golden / "datasets.toml")
    method, train, data = tr.recipe["method"], tr.recipe["train"], tr.recipe["data"]
    assert method["preset"] == "locon" and method["rank"] == 8 and method["train_text_encoder"] is False
    assert train["lr_warmup_steps"] == 100 and train["loss_type"] == "huber"  # 0.1 of 1000 steps
    assert train["train_batch_size"] == 2 and "masked_loss" not in data  # no alpha_mask, no mask folder: no mask
    assert any(line.startswith("masked_loss (no mask source") for line in tr.ignored)
    subsets = data["subsets"]  # each with kohya's keys, [general]'s caption settings inherited
    assert [(s["image_dir"], s["num_repeats"], s.get("is_reg", False)) for s in subsets] == [
        (str(golden / "data" / name), repeats, is_reg) for name, repeats, is_reg in
        [("purple", 2, False), ("squares", 1, False), ("reg", 1, True)]
    ]  # fmt: skip
    assert all(s["shuffle_caption"] and s["keep_tokens"] == 1 for s in subsets)
    assert subsets[1]["caption_dropout_rate"] == 0.1 and subsets[2]["class_tokens"] == "circle"
    assert "general.flip_aug (sdtune has no data.subsets.random_flip yet)" in tr.unsupported  # listed once


@pytest.mark.parametrize(
    "name,text",
    [
        ("c.toml", 'network_module = "networks.lora"\nclip_skip = 1\n'),
        ("p.json", '{"LoRA_type": "Standard", "clip_skip": 1, "train_data_dir": "img"}'),
        ("p2.json", '{"LoRA_type": "Standard", "clip_skip": "1", "train_data_dir": "img"}'),
    ],
)
def test_clip_skip_1_is_what_sdtune_does_so_it_is_ignored_not_unsupported(tmp_path, name, text):
    """clip_skip 1 is the text encoder's own output (sd-scripts' hidden_states[-1] + final norm), in every kohya_ss
    preset: listing it as "not supported" would warn of a difference that does not exist."""
    config = tmp_path / name
    config.write_text(text)
    tr = translate(read_config(config))
    assert "clip_skip (1: the text encoder's last layer, which sdtune uses)" in tr.ignored
    assert not any(line.startswith("clip_skip") for line in tr.unsupported)


def test_a_key_the_schema_lacks_is_not_supported_until_it_lands(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('network_module = "networks.lora"\nclip_skip = 2\nnoise_offset = 0.1\nmy_new_flag = 1\n'
                      "unet_lr = 3e-4\n")  # fmt: skip
    tr = translate(read_config(config))
    assert tr.recipe["method"]["unet_lr"] == 3e-4  # the U-Net's own lr, not sd-scripts' default learning_rate
    assert (tr.recipe["method"]["rank"], tr.recipe["method"]["lora_alpha"]) == (4, 1)  # sd-scripts' defaults
    assert "clip_skip (sdtune has no train.clip_skip yet)" in tr.unsupported
    assert "my_new_flag (unknown to sdtune's importer)" in tr.unsupported
    assert tr.recipe["train"]["noise_offset"] == 0.1
    assert kohya_import.schema_field("train.noise_offset", "lora") is not None


@pytest.mark.parametrize(
    "lines, method",
    [
        (
            'network_module = "lycoris.kohya"\nnetwork_dim = 8\nnetwork_args = ["algo=loha", "conv_dim=8"]\n',
            {"type": "lora", "algo": "loha", "preset": "locon", "rank": 8},
        ),
        (
            'network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "factor=4", "decompose_both=True"]\n',
            {"type": "lora", "algo": "lokr", "preset": "attn+ff", "factor": 4, "decompose_both": True},
        ),
    ],
)
def test_lycoris_loha_and_lokr_map_to_method_algo(lines, method, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(lines)
    tr = translate(read_config(config))
    assert {key: tr.recipe["method"].get(key) for key in method} == method
    assert ("network_module", "method.algo") in tr.mapped
    assert not any("algo" in line or "factor" in line for line in tr.unsupported), tr.unsupported


def test_a_kohya_ss_lokr_preset_maps_its_own_fields(tmp_path):
    preset = tmp_path / "p.json"
    fields = {"LoRA_type": "LyCORIS/LoKr", "network_dim": 16, "factor": 8, "decompose_both": False, "conv_dim": 1}
    preset.write_text(json.dumps(fields))
    tr = translate(read_config(preset))
    assert tr.recipe["method"]["algo"] == "lokr" and tr.recipe["method"]["factor"] == 8


BAD = [
    ("broken.toml", "network_dim = \n", "broken.toml: not valid TOML"),
    ("list.json", "[1, 2]", "list.json: a kohya_ss preset is a JSON object"),
    ("dim.toml", 'network_module = "networks.lora"\nnetwork_dim = "abc"\n', "dim.toml: network_dim: "),
    ("ds.toml", "[general]\nshuffle_caption = true\n[[datasets]]\n", "ds.toml: a dataset config"),
    ("xl.sh", "accelerate launch sdxl_train_network.py --network_dim 4\n", "xl.sh: sdxl_train_network.py: sdtune"),
    ("args.toml", 'network_module = "networks.lora"\nnetwork_args = ["conv_dim"]\n', "args.toml: network_args: "),
    ("db.toml", 'train_data_dir = "/nowhere"\n', "db.toml: train_data_dir: DreamBooth needs the subject's tokens"),
    ("conf.yaml", "a: 1\n", "conf.yaml: expected an sd-scripts .toml"),
]


@pytest.mark.parametrize("name,text,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_file_and_key(tmp_path, name, text, message, capsys):
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exc:
        cli.main(["recipe", "from-kohya", str(tmp_path / name), "-o", str(tmp_path / "out.yaml")])
    line = str(exc.value)
    assert "\n" not in line and f"{tmp_path}/{message}" in line, line
    assert not (tmp_path / "out.yaml").exists()


def test_dataset_config_without_image_dir_names_the_subset(tmp_path):
    (tmp_path / "c.toml").write_text('network_module = "networks.lora"\n')
    (tmp_path / "d.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n")
    with pytest.raises(KohyaImportError, match=r"d.toml: datasets\[0\].subsets\[0\].image_dir: required"):
        translate(read_config(tmp_path / "c.toml"), tmp_path / "d.toml")


def test_cli_prints_the_report_and_writes_the_recipe(golden, capsys):
    out = golden / "r.yaml"
    assert cli.main(["recipe", "from-kohya", str(golden / "dreambooth.toml"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ignored: clip_skip (1: the text encoder's last layer, which sdtune uses)" in printed
    assert f"wrote {out}" in printed
    assert yaml.safe_load(out.read_text())["method"]["type"] == "dreambooth"
    assert not list(golden.glob(".tmp-*"))  # written through a temp file, renamed


# -- the translated recipes train on the toy base ------------------------------------------------------------------

TOY = ["base=toy", "data.resolution=64", "data.min_bucket_reso=64", "data.max_bucket_reso=64",
       "data.bucket_reso_steps=8", "train.max_train_steps=2", "train.mixed_precision=no", "train.train_batch_size=2",
       "validation.prompts=[a purple circle]", "validation.seeds=[0]", "validation.num_inference_steps=2",
       "validation.validation_steps=0", "output.export_check=false", "output.register=false",
       "output.report_to=none", "train.checkpointing_steps=100"]  # fmt: skip


@pytest.mark.parametrize(
    "config,dataset,script,extra",
    [
        ("lora_preset.json", None, "trainers/lora.py", []),
        ("train_network.sh", "datasets.toml", "trainers/lora.py", ["train.optimizer_type=adamw"]),
        pytest.param("dreambooth.toml", None, "trainers/dreambooth.py",
                     ["train.optimizer_type=adamw", "method.extract_lora_rank=null", "method.save_single_file=false"],
                     marks=pytest.mark.slow),  # a full fine-tune; its translation is checked in the default suite
    ],
    ids=["lora-preset", "flags+dataset", "dreambooth"],
)  # fmt: skip
def test_translated_recipe_trains_two_steps_on_the_toy_base(golden, config, dataset, script, extra):
    out = golden / "recipe.yaml"
    import_kohya(golden / config, out, golden / dataset if dataset else None)
    recipe = load_recipe(out)
    assert script == f"trainers/{recipe.method.type}.py"
    run = golden / "run"
    proc = run_trainer([str(out), f"output.dir={run}", *TOY, *extra], golden / "cache", script=script)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((run / "adapter.json").read_text())["training"]["steps"] == 2


def test_subsets_become_data_subsets(golden):
    """Each subset under kohya's own key names, through the schema check and the recipe loader."""
    tr = translate(read_config(golden / "train_network.sh"), golden / "datasets.toml")
    subsets = tr.recipe["data"]["subsets"]
    assert [(s["image_dir"], s["num_repeats"]) for s in subsets] == [
        (str(golden / "data" / name), repeats) for name, repeats in (("purple", 2), ("squares", 1), ("reg", 1))
    ]
    assert subsets[2]["is_reg"] is True and subsets[1]["caption_dropout_rate"] == 0.1
    assert all(s["shuffle_caption"] is True and s["keep_tokens"] == 1 for s in subsets)  # from [general]
    assert tr.recipe["method"]["type"] == "lora"  # the reg subset stays a subset
    assert ("datasets[0].subsets[2].is_reg", "data.subsets[2].is_reg") in tr.mapped
    text = kohya_import.render(tr, ["x"])
    assert yaml.safe_load(text)["data"]["subsets"] == subsets


def test_prodigy_learning_rate_is_not_kept_for_adamw(tmp_path):
    """Prodigy keeps its lr 1.0 (under AdamW, when an optimizer is missing, it would diverge: then it is listed)."""
    config = tmp_path / "c.toml"
    config.write_text('network_module = "networks.lora"\noptimizer_type = "Prodigy"\nlearning_rate = 1.0\n')
    tr = translate(read_config(config))
    assert (tr.recipe["train"]["optimizer_type"], tr.recipe["train"]["learning_rate"]) == ("prodigy", 1.0)
    assert not any(line.startswith("learning_rate") for line in tr.unsupported)


def test_keep_tokens_without_shuffle_is_ignored_as_in_sd_scripts(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"LoRA_type": "Standard", "keep_tokens": "2", "shuffle_caption": False}))
    tr = translate(read_config(config))
    assert "keep_tokens (it only acts with shuffle_caption, which is off)" in tr.ignored
    assert "keep_tokens" not in tr.recipe["data"]


def test_a_command_line_reads_its_config_file_and_its_flags_win(tmp_path):
    (tmp_path / "base.toml").write_text('[training]\nnetwork_module = "networks.lora"\nnetwork_dim = 8\nseed = 3\n')
    (tmp_path / "run.sh").write_text("accelerate launch train_network.py --config_file base.toml --network_dim 32\n")
    tr = translate(read_config(tmp_path / "run.sh"))
    assert (tr.recipe["method"]["rank"], tr.recipe["train"]["seed"]) == (32, 3)
    assert ("config_file", "its entries, each listed by its own name") in tr.mapped


def test_the_dataset_config_a_command_line_names_is_read(golden):
    tr = translate(read_config(golden / "train_network.sh"))  # --dataset_config, no --dataset-config
    assert ("dataset_config", "read as the dataset config") in tr.mapped
    assert tr.recipe["train"]["train_batch_size"] == 2 and tr.recipe["data"]["subsets"][0]["shuffle_caption"] is True
    given = translate(read_config(golden / "train_network.sh"), golden / "datasets.toml")
    assert f"dataset_config (--dataset-config {golden / 'datasets.toml'} is read instead)" in given.ignored
