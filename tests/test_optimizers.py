"""Optimizers (kohya's optimizer_type / optimizer_args), the EMA of every method, and block-wise learning rates.

- every optimizer name builds its class with the recipe's arguments; a bad module path or class is one line naming
  the key, before any model loads; Prodigy's preflight warns where the lr or warmup contradicts it;
- schedule-free AdamW: its averaged point is what outputs see, and a validation grid and a checkpoint in the middle
  of a run leave the final weights bit-identical to a run without them;
- EMA (LoRA trainer): a checkpoint holds it, a run resumed from it ends bit-identical, and the saved files are the
  EMA's weights, not the last step's;
- block weights: each parameter group's lr is unet_lr x its block's weight, and a block of weight 0 does not move.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import QUICKSTART, ROOT, run_trainer
from safetensors.torch import load_file

from sdtune.trainers import lora
from sdtune.trainers.core import optimizers
from sdtune.trainers.core.recipe import Recipe, RecipeError, TrainConfig, recipe_from_dict

# -- the recipe keys ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, name",
    [
        ("AdamW", "adamw"),
        ("AdamW8bit", "adamw8bit"),
        ("Prodigy", "prodigy"),
        ("Lion", "lion"),
        ("AdamWScheduleFree", "schedulefree_adamw"),
        ("schedulefree.AdamWScheduleFree", "schedulefree_adamw"),
        ("torch.optim.SGD", "torch.optim.SGD"),
    ],
)
def test_optimizer_type_takes_kohya_spellings(given, name):
    assert TrainConfig(optimizer_type=given).optimizer_type == name
    assert TrainConfig(optimizer=given).optimizer_type == name  # sdtune's earlier key


def test_optimizer_args_read_kohya_lists_and_yaml_text():
    kohya = TrainConfig(optimizer_args=["weight_decay=0.1", "betas=0.9,0.99", "decouple=True", "mode=fast"])
    assert kohya.optimizer_args == {"weight_decay": 0.1, "betas": (0.9, 0.99), "decouple": True, "mode": "fast"}
    assert TrainConfig(optimizer_args="{d_coef: 2}").optimizer_args == {"d_coef": 2}  # the studio's text box


@pytest.mark.parametrize(
    "train, message",
    [
        (
            {"optimizer_type": "sgd"},
            "train.optimizer_type: expected one of adamw, adamw8bit, adafactor, prodigy, schedulefree_adamw, lion or a "
            "module.ClassName (e.g. torch.optim.SGD), got 'sgd'",
        ),
        ({"optimizer_args": ["nokey"]}, "train.optimizer_args: item 'nokey' is not key=value"),
        (
            {"optimizer_type": "schedulefree_adamw", "lr_scheduler": "cosine"},
            "schedulefree_adamw needs no lr schedule: set lr_scheduler: constant (not cosine)",
        ),
    ],
)
def test_bad_optimizer_keys_are_named(train, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"train": train}, "recipe.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "value, weights",
    [
        (0.5, 0.5),
        ("0.5", 0.5),
        ("1,1,,0.5,1,1,1,1,1,1,1,0", [1, 1, 0, 0.5, 1, 1, 1, 1, 1, 1, 1, 0]),  # kohya: an empty item is 0
        ("zeros+0.25", [0.25] * 12),
        ("[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]", [0] + [1] * 11),  # the studio's text box
    ],
)
def test_block_weights_read_one_number_twelve_or_a_curve(value, weights):
    method = Recipe.model_validate({"method": {"down_lr_weight": value}}).method
    assert method.down_lr_weight == weights


def test_block_weight_curves_follow_sd_scripts():
    curve = Recipe.model_validate({"method": {"up_lr_weight": "sine"}}).method.up_lr_weight
    assert curve[0] == 0 and curve[-1] == pytest.approx(1) and curve == sorted(curve)
    linear = Recipe.model_validate({"method": {"up_lr_weight": "reverse_linear+1"}}).method.up_lr_weight
    assert linear[0] == pytest.approx(2) and linear[-1] == pytest.approx(1)


@pytest.mark.parametrize(
    "method, message",
    [
        ({"down_lr_weight": [1, 1]}, "method.down_lr_weight: 2 weights given"),
        ({"up_lr_weight": "wavy"}, "method.up_lr_weight: 'wavy': give one number, 12 numbers"),
        ({"mid_lr_weight": -1}, "method.mid_lr_weight: "),
    ],
)
def test_bad_block_weights_are_named(method, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"method": method}, "recipe.yaml")
    assert message in str(err.value)


# -- building the optimizers ----------------------------------------------------------------------------------------


def _groups(features: int = 4):
    torch.manual_seed(0)
    model = torch.nn.Linear(features, 3 if features == 4 else features)
    return model, [{"params": list(model.parameters()), "lr": 0.01}]


@pytest.mark.parametrize(
    "name, cls_path, checks",
    [
        ("prodigy", "prodigyopt.Prodigy", {"d_coef": 2.0, "betas": (0.9, 0.999)}),
        ("lion", "lion_pytorch.Lion", {"weight_decay": 0.01}),
        ("schedulefree_adamw", "schedulefree.AdamWScheduleFree", {"warmup_steps": 5, "d_coef": None}),
        ("torch.optim.SGD", "torch.optim.SGD", {"momentum": 0.5}),
    ],
)
def test_each_optimizer_builds_with_the_recipe_arguments(name, cls_path, checks):
    args = {"d_coef": 2.0} if name == "prodigy" else {"momentum": 0.5} if name == "torch.optim.SGD" else {}
    train = TrainConfig(optimizer_type=name, optimizer_args=args, lr_warmup_steps=5)
    model, groups = _groups()
    optimizer = optimizers.make_optimizer(groups, train)
    assert f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}" == (
        cls_path if name != "torch.optim.SGD" else "torch.SGD"
    )
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01  # each group keeps its own lr
    for key, value in checks.items():
        if value is not None:
            assert group[key] == value, key
    model(torch.ones(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "torch.optim.NoSuchOptimizer",
            "train.optimizer_type: torch.optim.NoSuchOptimizer: "
            "torch.optim.NoSuchOptimizer does not exist; check the class name",
        ),
        ("nosuchpackage.Adam", "train.optimizer_type: nosuchpackage.Adam: cannot import nosuchpackage"),
        ("torch.nn.Linear", "train.optimizer_type: torch.nn.Linear: torch.nn.Linear is not a torch.optim.Optimizer"),
    ],
)
def test_a_bad_optimizer_path_is_one_line_before_any_model_loads(name, message, tmp_path, capsys):
    code = lora.cli([str(QUICKSTART), f"output.dir={tmp_path / 'run'}", f"train.optimizer_type={name}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_free_form_arguments_the_class_refuses_are_named():
    train = TrainConfig(optimizer_type="torch.optim.SGD", optimizer_args={"nonsense": 1})
    with pytest.raises(RecipeError, match=r"^train.optimizer_args: torch.optim.SGD refused them \("):
        optimizers.make_optimizer(_groups()[1], train)


def test_prodigy_warns_where_the_recipe_contradicts_it():
    from sdtune.trainers.core.data import scan_dataset
    from sdtune.trainers.core.estimate import preflight

    data = {"train_data_dir": str(ROOT / "datasets" / "quickstart-purple"), "resolution": 64}
    recipe = Recipe.model_validate(
        {"base": "toy", "data": data, "train": {"optimizer_type": "prodigy", "lr": 1e-4, "lr_warmup_steps": 10}}
    )
    text = preflight(recipe, scan_dataset(recipe.data), "cpu")
    assert "warning: prodigy finds its own step size and scales it by the lr: keep the lr at 1.0 " in text
    assert "(train.learning_rate is 0.0001)" in text and "train.lr_warmup_steps is 10, set 0" in text
    fine = recipe.model_copy(update={"train": TrainConfig(optimizer_type="prodigy", lr=1.0)})
    assert "warning: prodigy" not in preflight(fine, scan_dataset(recipe.data), "cpu")


def test_schedule_free_outputs_see_the_average_and_training_resumes_exactly():
    """Inside `outputs_point` the weights are schedule-free's x (what its eval() gives); after it, y bit for bit,
    where eval() then train() alone may round it."""
    train = TrainConfig(optimizer_type="schedulefree_adamw", lr=0.05)
    model, groups = _groups(64)  # 4 thousand weights: enough for eval() then train() alone to round some
    optimizer = optimizers.make_optimizer(groups, train)
    for _ in range(5):
        model(torch.randn(8, 64)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    params = list(model.parameters())
    y = [p.detach().clone() for p in params]
    with optimizers.outputs_point(optimizer, params):
        inside = [p.detach().clone() for p in params]
        z = [optimizer.state[p]["z"] for p in params]
    assert all(not torch.equal(a, b) for a, b in zip(inside, y))  # x, between y and z
    beta1 = optimizer.param_groups[0]["betas"][0]
    for x, y_, z_ in zip(inside, y, z):  # y = (1 - beta1) z + beta1 x
        torch.testing.assert_close(y_, (1 - beta1) * z_ + beta1 * x)
    assert all(torch.equal(a, b) for a, b in zip(params, y))


@pytest.mark.parametrize("ema_validation", [True, False])
def test_outputs_see_the_ema_and_grids_too_unless_told_otherwise(ema_validation):
    from sdtune.trainers.core.ema import RunEma
    from sdtune.trainers.core.runtime import Optimization

    model, groups = _groups()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(groups)
    ema = RunEma(params, decay=0.5)
    opt = Optimization([model], optimizer, None, params, [model], None, ema, ema_validation)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(params)
    trained = [p.detach().clone() for p in params]
    with opt.outputs_weights():  # a save: always the EMA
        assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow_params))
    with opt.outputs_weights(validation=True):  # a grid: the EMA unless ema_validation is off
        shown = ema.shadow_params if ema_validation else trained
        assert all(torch.equal(p, s) for p, s in zip(params, shown))
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    assert not any(torch.equal(s, t) for s, t in zip(ema.shadow_params, trained))


# -- block-wise learning rates --------------------------------------------------------------------------------------


def _toy_lora_unet(method_keys: dict):
    from sdtune.adapters.base import load_pipeline
    from sdtune.trainers.core.lora_layers import add_lora

    pipe = load_pipeline("toy")
    method = Recipe.model_validate({"method": {"rank": 2, **method_keys}}).method
    torch.manual_seed(0)
    add_lora(pipe.unet, pipe.text_encoder, method)
    return pipe.unet, method


def test_block_weights_set_each_groups_lr_and_zero_freezes_a_block():
    # the toy UNet: down block 0 with two attentions (input blocks 1, 2), one attention in the middle, up block 1
    # with three attentions (output blocks 3, 4, 5)
    down = [1, 0.5, 0.25, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    unet, method = _toy_lora_unet({"down_lr_weight": down, "mid_lr_weight": 0, "up_lr_weight": 2})
    groups = optimizers.param_groups(unet, 1e-3, method)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(unet.named_parameters())
    expect = {"down_blocks.0.attentions.0.": 5e-4, "down_blocks.0.attentions.1.": 2.5e-4, "up_blocks.1.": 2e-3}
    for prefix, lr in expect.items():
        found = [n for n in named if prefix in n and "lora_" in n]
        assert found and all(lr_of[id(named[n])] == pytest.approx(lr) for n in found), prefix
    mid = [p for n, p in named.items() if "mid_block." in n and "lora_" in n]
    assert mid and all(not p.requires_grad and id(p) not in lr_of for p in mid)

    # a few real steps: the frozen block stays as it was, the others move
    before = {n: p.detach().clone() for n, p in named.items() if "lora_B" in n}
    optimizer = torch.optim.AdamW(groups)
    for _ in range(3):
        noisy, states = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
        unet(noisy, torch.tensor([500]), states).sample.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {n: not torch.equal(before[n], named[n]) for n in before}
    assert not any(m for n, m in moved.items() if "mid_block." in n)
    assert all(m for n, m in moved.items() if "mid_block." not in n)


@pytest.mark.parametrize(
    "name, weight",
    [  # SD v1-5's diffusers names -> the original layout's input/output block, as sd-scripts numbers them
        ("down_blocks.0.attentions.0.proj_in.lora_A.weight", 1),
        ("down_blocks.0.attentions.1.proj_in.lora_A.weight", 2),
        ("down_blocks.0.downsamplers.0.conv.lora_A.weight", 3),
        ("down_blocks.2.downsamplers.0.conv.lora_A.weight", 9),
        ("down_blocks.3.resnets.1.conv1.lora_A.weight", 11),
        ("mid_block.attentions.0.proj_in.lora_A.weight", 100),
        ("up_blocks.0.resnets.2.conv1.lora_A.weight", 102),
        ("up_blocks.0.upsamplers.0.conv.lora_A.weight", 102),
        ("up_blocks.3.attentions.2.proj_out.lora_A.weight", 111),
        ("conv_in.lora_A.weight", -1),  # outside the blocks: weight 1
    ],
)
def test_block_index_follows_the_original_layout(name, weight):
    method = Recipe.model_validate(
        {"method": {"down_lr_weight": list(range(12)), "mid_lr_weight": 100, "up_lr_weight": list(range(100, 112))}}
    ).method
    assert optimizers.block_lr_weight(method, f"base_model.model.{name}") == (1.0 if weight == -1 else weight)


def test_unet_lr_and_text_encoder_lr_give_their_groups(tmp_path):
    from sdtune.trainers.core.runtime import unet_and_text_encoder

    method = Recipe.model_validate(
        {"method": {"unet_lr": 2e-4, "train_text_encoder": True, "text_encoder_lr": 5e-5}}
    ).method
    unet, text_encoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    trained = unet_and_text_encoder(unet, text_encoder, method)
    lrs = [g["lr"] for t in trained for g in optimizers.param_groups(t.module, t.lr or 1e-4, t.blocks)]
    assert lrs == [2e-4, 5e-5]


# -- runs of the LoRA trainer ---------------------------------------------------------------------------------------

SMALL = [
    "base=toy",
    "data.resolution=64",
    "data.min_bucket_reso=64",
    "data.max_bucket_reso=64",
    "data.bucket_reso_steps=8",
    "train.train_batch_size=2",
    "train.lr_warmup_steps=0",
    "output.report_to=none",
    "output.save_precision=fp32",
    "output.export_check=false",
    "output.register=false",
    "validation.toy_score=[]",
    "validation.seeds=[0]",
    "validation.num_inference_steps=2",
]


def _weights(out) -> dict:  # the LoRA trainer's PEFT file
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def _exported(name: str) -> str:
    """A UNet LoRA tensor's name in a checkpoint's trainable_0 -> in the PEFT file."""
    return f"unet.{name.replace('.default.', '.')}"


def _assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key].numpy(), b[key].numpy()), key


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_schedule_free_grid_and_checkpoint_mid_run_leave_the_final_weights_alone(tmp_path, cache):
    common = [
        *SMALL,
        "train.optimizer_type=schedulefree_adamw",
        "train.lr_scheduler=constant",
        "train.max_train_steps=4",
        "train.lr=1e-2",
    ]
    with_grid = tmp_path / "grid"
    proc = run_trainer(
        [
            str(QUICKSTART),
            f"output.dir={with_grid}",
            *common,
            "validation.validation_steps=2",
            "train.checkpointing_steps=2",
            "validation.prompts=[a purple circle]",
        ],
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (with_grid / "samples" / "step-000002.png").is_file()
    plain = tmp_path / "plain"
    proc = run_trainer(
        [str(QUICKSTART), f"output.dir={plain}", *common, "train.checkpointing_steps=100", "validation.prompts=[]"],
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_equal(_weights(with_grid), _weights(plain))
    # the checkpoint keeps the training point y; its exported LoRA is the average x
    checkpoint = with_grid / "checkpoints" / "checkpoint-2"
    trained, exported = load_file(str(checkpoint / "trainable_0.safetensors")), _weights(checkpoint)
    key = next(k for k in trained if "lora_B" in k)
    assert not torch.equal(trained[key], exported[_exported(key)])


# Each trainer with an EMA: (recipe, script, its own overrides, the weights file it writes in a checkpoint folder).
EMA_RUNS = {
    "lora": (QUICKSTART, "trainers/lora.py", [], "pytorch_lora_weights.safetensors"),
    "dreambooth-lora": (
        ROOT / "recipes" / "toy-dreambooth.yaml",
        "trainers/dreambooth.py",
        ["method.lora=true", "method.with_prior_preservation=false", "validation.toy_score=[]"],
        "pytorch_lora_weights.safetensors",
    ),
    "controlnet": (
        ROOT / "recipes" / "controlnet-toy.yaml",
        "trainers/controlnet.py",
        ["method.validation_image=[]"],
        "controlnet/diffusion_pytorch_model.safetensors",
    ),
}


# LoRA's run stays in the default suite; the DreamBooth-LoRA and ControlNet runs (the same EMA path, through their
# own trainers; ~40 and ~80 s on 2 busy cores) are `slow`, to keep CI's time.
@pytest.mark.parametrize(
    "trainer", ["lora", *(pytest.param(name, marks=pytest.mark.slow) for name in EMA_RUNS if name != "lora")]
)
def test_ema_resumes_bit_identical_and_is_what_gets_saved(trainer, tmp_path, cache):
    recipe, script, own, weights = EMA_RUNS[trainer]
    if trainer == "controlnet":
        from sdtune.adapters import toyworld

        toyworld.write_control_dataset(tmp_path / "data", 4, seed=9)
        own = [*own, f"data.train_data_dir={tmp_path / 'data'}"]
    ema = ["method.use_ema=true", "method.ema_decay=0.9", "method.ema_warmup=true", "method.ema_power=0.75"]
    common = [*SMALL, *own, *ema, "train.max_train_steps=4", "train.checkpointing_steps=2", "validation.prompts=[]"]
    reference = tmp_path / "reference"
    proc = run_trainer([str(recipe), f"output.dir={reference}", *common], cache, script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = reference / "checkpoints" / "checkpoint-2"
    resumed = tmp_path / "resumed"
    args = [str(recipe), f"output.dir={resumed}", *common, f"train.resume={checkpoint}"]
    proc = run_trainer(args, cache, script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    _assert_equal(load_file(str(resumed / weights)), load_file(str(reference / weights)))

    # at the checkpoint: the weights file holds the EMA's shadow weights, the checkpoint the training weights
    states = [torch.load(f, weights_only=False) for f in sorted(checkpoint.glob("custom_checkpoint_*"))]
    shadow = next(s for s in states if isinstance(s, dict) and "shadow_params" in s)
    assert shadow["optimization_step"] == 2
    trained = load_file(str(checkpoint / "trainable_0.safetensors"))
    exported = load_file(str(checkpoint / weights))
    as_bytes = lambda tensors: sorted(t.cpu().numpy().tobytes() for t in tensors)  # noqa: E731 - files sort keys
    assert as_bytes(exported.values()) == as_bytes(shadow["shadow_params"])
    assert as_bytes(exported.values()) != as_bytes(trained.values())


def test_prodigy_with_several_lrs_is_one_line_not_prodigys_runtime_error():
    # prodigyopt raises a RuntimeError at the first step when parameter groups have different non-zero lrs (block
    # weights, unet_lr vs text_encoder_lr): a recipe mistake, so it is a RecipeError naming the keys, at build time.
    model = torch.nn.Linear(4, 3)
    groups = [{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.5}]
    with pytest.raises(RecipeError, match=r"^train.optimizer_type: prodigy takes one lr for every parameter group"):
        optimizers.make_optimizer(groups, TrainConfig(optimizer_type="prodigy", lr=1.0))
    groups[1]["lr"] = 0.0  # a group at lr 0 is what prodigy does take
    optimizers.make_optimizer(groups, TrainConfig(optimizer_type="prodigy", lr=1.0))
