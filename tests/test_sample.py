"""`sdtune sample`: same seed and settings give the same pixels; PNGs carry A1111 `parameters`; every sampler runs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtune.adapters import contact_sheet
from sdtune.adapters.sampling import AdapterSpec, SampleSettings, generate
from sdtune.adapters.schedulers import SCHEDULERS
from sdtune.studio import cli, doctor
from sdtune.trainers.core.estimate import estimate_run


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    assert (
        cli.main(
            [
                "sample",
                "--prompt",
                "a red circle",
                "--prompt",
                "a green square",
                "--seed",
                "0",
                "--seed",
                "7",
                "--steps",
                "6",
                "--out",
                str(out),
                *extra,
            ]
        )
        == 0
    )
    return out


def test_same_seed_same_pixels_and_png_parameters(tmp_path):
    a, b = _run(tmp_path, "a", "--grid"), _run(tmp_path, "b")
    files = sorted(p.name for p in a.glob("0*.png"))
    assert files == ["0000-seed0.png", "0001-seed7.png", "0002-seed0.png", "0003-seed7.png"]
    for name in files:
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))
    assert not np.array_equal(np.asarray(Image.open(a / files[0])), np.asarray(Image.open(a / files[1])))
    params = Image.open(a / "0001-seed7.png").text["parameters"]
    lines = params.splitlines()
    assert lines[0] == "a red circle"
    assert "Steps: 6" in lines[-1] and "Seed: 7" in lines[-1] and "CFG scale: 3.0" in lines[-1]
    assert "Size: 64x64" in lines[-1] and "Model: sdtune-toy-base" in lines[-1]
    grid = Image.open(a / "grid.png")
    assert grid.width > 2 * 64 and grid.height > 2 * 64


def test_negative_prompt_and_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue triangle\n\n  a yellow circle  \n")
    out = tmp_path / "o"
    assert (
        cli.main(
            ["sample", "--prompts-file", str(prompts), "--negative-prompt", "red", "--steps", "4", "--out", str(out)]
        )
        == 0
    )
    texts = [Image.open(p).text["parameters"] for p in sorted(out.glob("*.png"))]
    assert [t.splitlines()[0] for t in texts] == ["a blue triangle", "a yellow circle"]
    assert all(t.splitlines()[1] == "Negative prompt: red" for t in texts)


def test_a_prompts_file_in_sd_scripts_syntax_renders_each_line_with_its_own_settings(tmp_path):
    """The README's prompts.txt is sd-scripts' syntax: `#` lines are comments, and a line's options (--w/--h size,
    --d its one seed, --n, --s, --l) set that prompt's image, the command line's the rest (as in a recipe)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# prompts.txt\na blue triangle\n  # indented comment\na yellow circle --w 32 --h 40 --d 5 --n red --s 3 --l 2\n"
    )
    out = tmp_path / "o"
    args = ["sample", "--prompts-file", str(prompts), "--seed", "0", "--seed", "1", "--steps", "4", "--grid"]
    assert cli.main([*args, "--out", str(out)]) == 0
    files = sorted(out.glob("0*.png"))
    assert [(f.name, Image.open(f).size) for f in files] == [
        ("0000-seed0.png", (64, 64)), ("0001-seed1.png", (64, 64)), ("0002-seed5.png", (32, 40))]  # fmt: skip
    first, own = (Image.open(files[i]).text["parameters"].splitlines() for i in (0, 2))
    assert first[0] == "a blue triangle" and "Steps: 4, " in first[-1] and "CFG scale: 3.0" in first[-1]
    assert own[:2] == ["a yellow circle", "Negative prompt: red"]
    assert "Steps: 3, " in own[-1] and "CFG scale: 2.0, Seed: 5, Size: 32x40" in own[-1]
    assert Image.open(out / "grid.png").width > 2 * 64  # the rows' seeds differ: numbered columns, sizes side by side


@pytest.mark.parametrize(
    "text, message",
    [
        ("a cat --w 500\n", "line 1: --w 500: must be a multiple of 8"),
        ("a cat --ss euler_a\n", "line 1: --ss: not read by sdtune (a per-prompt sampler"),
        ("# nothing\n", "no prompt in it"),
    ],
)
def test_a_prompts_file_line_that_cannot_be_read_is_one_line(tmp_path, text, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    with pytest.raises(SystemExit) as err:
        cli.main(["sample", "--prompts-file", str(prompts), "--out", str(tmp_path / "o")])
    assert str(err.value).startswith(f"sdtune sample: --prompts-file: {prompts}: {message}")


def test_every_scheduler_runs_is_deterministic_and_really_switches(toy_pipe):
    """Each sampler gives the same pixels twice, and the samplers give different images from one another: a
    `set_scheduler` that did nothing would render every one with the base's PNDM and fail here."""
    images = {}
    for name in SCHEDULERS:
        settings = [SampleSettings(prompt="a red circle", seed=3, steps=6, scheduler=name)]
        first, second = generate(toy_pipe, settings)[0], generate(toy_pipe, settings)[0]
        assert np.array_equal(np.asarray(first.image), np.asarray(second.image)), name
        assert f"Sampler: {SCHEDULERS[name][2]}" in first.parameters
        assert type(toy_pipe.scheduler).__name__ == "PNDMScheduler"  # restored after sampling
        images[name] = np.asarray(first.image, dtype=np.int16)
    # pndm is the toy base's own sampler (PNDM, skip_prk_steps) and must match `default`; the others must not
    default_sample = generate(toy_pipe, [SampleSettings("a red circle", seed=3, steps=6)])[0]
    default = np.asarray(default_sample.image, np.int16)
    assert np.array_equal(images["pndm"], default)
    assert "Sampler: PNDM," in default_sample.parameters  # the base's own sampler by name, not "Default"
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(images[a] - images[b]).max() > 0, f"{a} and {b} gave identical images"


def test_results_do_not_depend_on_batch_neighbours(toy_pipe):
    alone = generate(toy_pipe, [SampleSettings("a blue square", seed=1, steps=5)])[0]
    mixed = generate(
        toy_pipe, [SampleSettings("a red circle", seed=0, steps=5), SampleSettings("a blue square", seed=1, steps=5)]
    )[1]
    assert np.array_equal(np.asarray(alone.image), np.asarray(mixed.image))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sample", "--steps", "2"], "give at least one --prompt or a --prompts-file"),
        (
            ["sample", "--prompt", "x", "--adapter", "missing.safetensors:0.5"],
            "--adapter: missing.safetensors not found",
        ),
        (["sample", "--prompt", "x", "--prompts-file", "nope.txt"], "--prompts-file nope.txt not found"),
        (["sample", "--prompt", "x", "--base", "nope/x/y"], "base: nope/x/y not found"),
        # a size diffusers refuses: one line, not its traceback from inside the pipeline
        (["sample", "--prompt", "x", "--width", "50", "--steps", "1"], "width 50: must be a multiple of 8"),
        (["ab", "--a", "toy", "--b", "toy", "--prompt", "x", "--size", "64x52", "--steps", "1"], "height 52: must be"),
    ],
)
def test_bad_sample_arguments(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert message in str(err.value)


def test_adapter_spec_parsing(tmp_path):
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"")
    assert AdapterSpec.parse(f"{lora}:0.6").weight == 0.6
    assert AdapterSpec.parse(str(lora)).weight == 1.0


def test_grid_labels_layout():
    images = [[Image.new("RGB", (64, 64), c) for c in ("red", "blue")]]
    grid = contact_sheet.make_grid(images, ["a prompt"], ["seed 0", "seed 1"], title="t")
    assert grid.size == (200 + 2 * 160, 60 + 160)
    assert grid.getpixel((200 + 80, 60 + 80)) == (255, 0, 0)  # cell 0 holds the first image, scaled up
    portrait = contact_sheet.make_grid([[Image.new("RGB", (512, 768), "red")]], ["p"], ["s"])
    red = np.argwhere(np.all(np.asarray(portrait) == (255, 0, 0), axis=-1))
    height, width = red.max(0) - red.min(0) + 1
    assert (height, width) == (156, 104)  # a 512x768 sample keeps its 2:3 shape in its cell


def test_doctor_lists_machine_and_recipes(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the helpers' and CI's runs set it: the user's count is shown
    assert cli.main(["doctor"]) == 0
    assert "threads       1 per torch process: OMP_NUM_THREADS is set" in capsys.readouterr().out
    monkeypatch.delenv("OMP_NUM_THREADS")  # unset: the shares the worker and the studio give out
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "CUDA", "bitsandbytes", "SDPA", "free disk", "sd15-lora-low-vram.yaml", "quickstart.yaml"):
        assert word in out
    assert "CPU cores, shared by the torch processes" in out and "a trainer gets " in out  # issue 20: threads
    lines = {line.split()[0]: line for line in out.splitlines() if ".yaml" in line}
    assert sorted(lines) == sorted(path.name for path in doctor.RECIPES.glob("*.yaml"))
    assert lines["controlnet-toy.yaml"].endswith("fits")


SD15_ON_CPU = "needs a CUDA GPU (SD v1-5 on a CPU would take days)"


@pytest.mark.parametrize(
    "device,budget,toy,sd15",
    [
        ("cpu", 1e15, "fits", SD15_ON_CPU),  # an SD v1-5 recipe on a CPU is refused whatever the RAM
        ("cpu", 1.0, "too big", SD15_ON_CPU),
        ("cuda", 1e15, "fits", "fits"),
        ("cuda", 1.0, "too big", "too big"),
    ],
)
def test_doctor_verdict_per_recipe(monkeypatch, device, budget, toy, sd15):
    """Every shipped recipe is estimated and gets one verdict, from the device and the memory budget alone."""
    # The estimate times a matmul on `device`; the verdict only compares its memory to the budget, so the CUDA rows
    # run here with the estimate taken on the CPU.
    monkeypatch.setattr(doctor, "estimate_run", lambda recipe, device: estimate_run(recipe, device="cpu"))
    lines = {line.split()[0]: line for line in doctor.recipe_fit_lines(device, budget)}
    assert sorted(lines) == sorted(path.name for path in doctor.RECIPES.glob("*.yaml"))
    for name, line in lines.items():
        assert line.endswith(sd15 if name.startswith("sd15-") else toy), line


def test_convert_round_trip_through_cli(tmp_path, toy_base):
    single = tmp_path / "toy.safetensors"
    assert cli.main(["convert", str(toy_base), str(single), "--half"]) == 0
    back = tmp_path / "back"
    assert cli.main(["convert", str(single), str(back)]) == 0
    assert (back / "model_index.json").is_file() and (back / "unet").is_dir()
    with pytest.raises(SystemExit, match="exists"):
        cli.main(["convert", str(toy_base), str(single)])
