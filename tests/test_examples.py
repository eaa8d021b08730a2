"""Every example the docs give runs as written: the README's Python API snippet and its
bring-your-own-model example, the ``oaml.*`` names the README's Python API section mentions, the
README's ``oaml ...`` commands, and every ``oaml ...`` line, ``--set`` and score setting example in
the help of every command (parsed by the real parser, configs validated where that is cheap)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from oaml.cli.main import build_parser, iter_parsers
from oaml.errors import ConfigError

from _data_helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
pytestmark = pytest.mark.usefixtures("one_thread")


def section(title: str) -> str:
    """The README text from the heading ``title`` to the next ``## `` heading."""
    assert f"\n{title}\n" in README, f"README.md has no section {title!r}"
    return README.split(f"\n{title}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str, lang: str = "python") -> list:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def run_snippet(code: str, where: str) -> None:
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})


# ----------------------------------------------------------------------------- README, Python
def test_readme_python_api_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OAML_DATA", str(tmp_path / "data"))
    run_snippet(code_blocks(section("## Python API"))[0], "README.md: Python API")


def test_readme_bring_your_own_model_example_runs_as_written(tmp_path, monkeypatch):
    """The example of oaml.evaluate on a torchvision model and ImageFolders; the files it names
    are made here (10 classes, random weights)."""
    blocks = [b for b in code_blocks(README) if "oaml.evaluate(" in b]
    assert blocks, "README.md has no example of oaml.evaluate (bring your own model and data)"
    monkeypatch.chdir(tmp_path)
    classes = tuple(f"c{i}" for i in range(10))
    make_image_folder(tmp_path / "data" / "train", classes, per_class=6)
    make_image_folder(tmp_path / "data" / "test", classes, per_class=1, seed=1)
    make_image_folder(tmp_path / "data" / "ood", ("any",), per_class=5, seed=2)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18_mydata.pt")
    run_snippet(blocks[0], "README.md: oaml.evaluate example")


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_names_in_the_python_api_section_exist():
    names = set(re.findall(r"`(oaml(?:\.\w+)+)`", section("## Python API")))
    missing = []
    for dotted in sorted(names):
        try:
            _resolve(dotted)
        except (ImportError, AttributeError):
            missing.append(dotted)
    assert not missing, f"README.md names what does not exist: {missing}"


@pytest.mark.parametrize("module", ["oaml.evaluation", "oaml.models", "oaml.scores", "oaml.data"])
def test_packages_export_their_public_names(module):
    mod = importlib.import_module(module)
    assert mod.__all__ and all(hasattr(mod, n) for n in mod.__all__), [n for n in mod.__all__ if not hasattr(mod, n)]


def test_import_oaml_is_light_and_evaluate_is_the_entry_point():
    code = "import sys, oaml; assert 'torch' not in sys.modules; import oaml.evaluation as e; assert oaml.evaluate is e.evaluate"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_score_settings_are_spelled_as_the_code_takes_them():
    from oaml.scores import create_score

    assert create_score("knn", K=50).K == 50
    with pytest.raises(ConfigError, match=r"no parameter\(s\) \['k'\]; allowed: \['K'"):
        create_score("knn", k=50)


# ----------------------------------------------------------------------------- commands
def _example_lines(text: str) -> list:
    """``oaml <command> ...`` lines (continuations joined; titles such as ``oaml teacher:`` are not examples)."""
    text = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip().split("  # ")[0].strip() for line in text.splitlines()]
    return [line for line in lines if re.match(r"oaml [a-z-]+( |$)", line)]


def _load_config(args) -> None:
    """The config a command would run with (file, then --set), where it names no missing file."""
    from oaml.bench import BenchConfig
    from oaml.config import load_config
    from oaml.pipeline import PipelineConfig
    from oaml.training.config import TrainConfig

    path = ROOT / args.config if getattr(args, "config", None) else None
    if path is not None and not path.is_file():
        return  # a placeholder name: the parser checked the line
    if args.command == "bench":
        BenchConfig.load(path, args.overrides)
        return
    classes = {"train": TrainConfig, "run": PipelineConfig, "demo": PipelineConfig}
    assert args.command in classes, f"`oaml {args.command}` takes --set: add its config class here"
    load_config(classes[args.command], path, args.overrides)


def check_command(line: str) -> None:
    """Parse ``line`` with the real parser (optional ``[...]`` parts left out), then validate its
    --set overrides against the command's config and its --score-arg settings against the scores."""
    from oaml.cli.evaluate import parse_score_args
    from oaml.scores import create_score

    argv = shlex.split(re.sub(r"\[[^\]]*\]", " ", line))[1:]
    assert "..." not in argv, f"{line!r}: write a real value, not '...'"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{line!r} does not parse: {err.getvalue().strip()}")
    if getattr(args, "overrides", None):
        _load_config(args)
    for name, kwargs in parse_score_args(getattr(args, "score_arg", None) or []).items():
        create_score(name, **kwargs)


HELP = {" ".join(path): parser.format_help() for path, parser in iter_parsers()}
HELP_EXAMPLES = sorted({line for text in HELP.values() for line in _example_lines(text)})


@pytest.mark.parametrize("line", HELP_EXAMPLES)
def test_help_examples_parse_and_validate(line):
    check_command(line)


def test_every_command_with_examples_is_collected():
    assert any(line.startswith("oaml eval --model") for line in HELP_EXAMPLES)


@pytest.mark.parametrize("path", [p for p, parser in iter_parsers() if any(a.dest == "overrides" for a in parser._actions)],
                         ids=" ".join)
def test_set_examples_in_help_are_valid_for_their_command(path):
    parser = dict(iter_parsers())[path]
    (action,) = [a for a in parser._actions if a.dest == "overrides"]
    examples = re.findall(r"--set (\S+=\S+)", action.help or "")
    assert examples, f"{' '.join(path)}: --set help gives no example"
    config = "configs/bench/fmnist.yaml" if path[1] == "bench" else None  # bench requires --config
    _load_config(argparse.Namespace(command=path[1], config=config, overrides=[e.rstrip(",;)") for e in examples]))


# the commands of bash blocks, and inline ones that show --set (inline fragments such as
# `oaml sample --device cuda` name one option, not a whole command)
README_COMMANDS = sorted({line for block in code_blocks(README, "bash") for line in _example_lines(block)}
                         | {line for line in re.findall(r"`(oaml [^`]+)`", README) if " --set " in line})


@pytest.mark.parametrize("line", README_COMMANDS)
def test_readme_commands_parse_and_validate(line):
    check_command(line)
