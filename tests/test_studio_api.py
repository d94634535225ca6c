"""The studio API's one error translator (studio/api/errors.py): a user's error from below comes out as one
`StudioError` line naming the field or file; a bug keeps its type and traceback. And the package itself: every public
function goes through the translator, and no other handler makes a StudioError."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from sdtune.adapters.errors import SdtuneError
from sdtune.studio import api, confine
from sdtune.studio.api.errors import translated

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "studio" / "api"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# (what fails, the call, how the message starts: the field or file named first)
TYPED_ERRORS = [
    ("registry", lambda tmp: api.show_adapter("nope"), "no adapter named 'nope' in "),
    ("dataset", lambda tmp: api.dataset_info("nope"), "dataset 'nope': no such dataset"),
    ("manifest", lambda tmp: api.read_run(tmp / "no-run"), "{tmp}/no-run: no such file"),
    ("comparison", lambda tmp: api.ab_vote("nope", 0, "left"), "no comparison 'nope' in "),
    ("missing-file", lambda tmp: api.convert_checkpoint(tmp / "none", tmp / "x.safetensors"), "{tmp}/none: no such"),
    ("existing-file", lambda tmp: api.convert_checkpoint(tmp, tmp / "there.safetensors"), "{tmp}/there.safetensors"),
    # single_file.py's CheckpointError and compose.py's ComposeError: each module's own SdtuneError class
    ("plain-value-error", lambda tmp: api.convert_checkpoint(tmp, tmp / "x.ckpt"), "{tmp}/x.ckpt: the output must be"),
    ("weight", lambda tmp: api.bake_model(tmp / "baked", adapters=["x:nan"]), "x:nan: the weight 'nan' is not a"),
]


@pytest.mark.parametrize("call, start", [c[1:] for c in TYPED_ERRORS], ids=[c[0] for c in TYPED_ERRORS])
def test_a_user_error_from_below_comes_out_as_one_studio_error_line(home, tmp_path, call, start):
    (tmp_path / "there.safetensors").write_bytes(b"")
    with pytest.raises(api.StudioError) as caught:
        call(tmp_path)
    message = str(caught.value)
    assert type(caught.value) is api.StudioError, type(caught.value)  # one type for every caller to catch
    assert message.startswith(start.format(tmp=tmp_path)), message
    assert "\n" not in message and caught.value.__suppress_context__  # one line, no chained traceback under it


def test_an_os_error_names_its_file_first(tmp_path):
    with pytest.raises(api.StudioError, match=f"^{tmp_path / 'missing.png'}: No such file or directory$"):
        with translated():
            (tmp_path / "missing.png").read_bytes()


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), KeyError("entry"), ValueError("not a user's")])
def test_a_bug_below_keeps_its_type(home, monkeypatch, bug):
    """A plain TypeError (or ValueError, where no call asked for it) is a bug: it reaches the caller unchanged."""
    from sdtune.adapters.registry import Registry

    def broken(self, name):
        raise bug

    monkeypatch.setattr(Registry, "get", broken)
    with pytest.raises(type(bug)) as caught:
        api.show_adapter("toy-purple")
    assert caught.value is bug and not isinstance(caught.value, SdtuneError)


# The calls that once caught every ValueError below them (`with translated(ValueError):`), and what to break there.
PLAIN_VALUE_ERRORS = [
    ("convert", "sdtune.adapters.single_file.convert", lambda tmp: api.convert_checkpoint(tmp, tmp / "x.safetensors")),
    ("bake", "sdtune.adapters.compose.AdapterUse.parse", lambda tmp: api.bake_model(tmp / "baked", adapters=["x"])),
    (
        "render",
        "sdtune.adapters.compose.AdapterUse.parse",
        lambda tmp: api.sample_images(["a"], tmp / "out", adapters=["x"]),
    ),
]


@pytest.mark.parametrize("target, call", [c[1:] for c in PLAIN_VALUE_ERRORS], ids=[c[0] for c in PLAIN_VALUE_ERRORS])
def test_a_plain_value_error_from_below_is_a_bug_and_keeps_its_type(home, tmp_path, monkeypatch, target, call):
    """Issue 21: a module raises its own SdtuneError class for the user; a plain ValueError is a bug, everywhere."""
    bug = ValueError("not a user's")

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(target, broken)
    with pytest.raises(ValueError) as caught:
        call(tmp_path)
    assert caught.value is bug and not isinstance(caught.value, SdtuneError)
    with pytest.raises(TypeError):  # no call may widen the catch again
        translated(ValueError)


def test_a_studio_error_keeps_its_own_type(home, tmp_path):
    """A ConfineError is already one line for the user: it is not rewrapped, so a caller can still tell it apart."""
    with pytest.raises(confine.ConfineError, match="^path: "):
        api.import_adapter(tmp_path / "elsewhere.safetensors", confined=True)


def test_a_network_failure_says_how_to_try_again_in_the_callers_words():
    from sdtune.adapters.publish import NetworkFailure

    with pytest.raises(api.StudioError, match="click Publish again to resume") as caught:
        with translated(retry="click Publish again"):
            raise NetworkFailure("alice/toy", "connection reset")
    assert "run the same command again" not in str(caught.value)
    with pytest.raises(api.StudioError, match="run the same command again"):  # no words given: the error's own
        with translated():
            raise NetworkFailure("alice/toy", "connection reset")


def test_every_public_function_goes_through_the_translator():
    functions = {name: getattr(api, name) for name in api.__all__ if inspect.isfunction(getattr(api, name))}
    assert len(functions) > 40 and "sample_images" in functions
    assert [name for name, f in functions.items() if not getattr(f, "translates_errors", False)] == []


def test_a_translated_function_keeps_its_signature_and_help():
    assert "prompts" in inspect.signature(api.sample_images).parameters
    assert api.sample_images.__doc__.startswith("Renders every prompt")


# No function of the API makes its own StudioError from a caught exception: `translated` is the one translator.
OWN_HANDLERS_PENDING = {}


def test_no_handler_but_the_translator_makes_a_studio_error():
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for handler in (n for n in ast.walk(function) if isinstance(n, ast.ExceptHandler)):
                raises = [n for n in ast.walk(handler) if isinstance(n, ast.Raise) and n.exc is not None]
                if any("StudioError" in ast.unparse(r.exc) for r in raises):
                    found.setdefault(path.name, set()).add(function.name)
    assert found == OWN_HANDLERS_PENDING


def test_the_package_keeps_its_files_and_functions_small():
    """Issue 21: one concern per file, under 500 lines; no function over 60 lines."""
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) < 500, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 60, f"{path.name}: {node.name}"
