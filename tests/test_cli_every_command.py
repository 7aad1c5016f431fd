"""Bad input to every `pisa` sub-command: exit 2, one line on stderr naming what is wrong,
nothing written and no Ray started. The sub-commands are read from the parser itself, so a
new one without a case here fails `test_every_subcommand_has_a_bad_input_case`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from helpers import REPO, tiny_experiment

from pisa.cli import main
from pisa.cli.parser import build_parser

UNKNOWN = "no study 'nope'"
# sub-command -> (its bad input, what the one line says); `{tmp}` is the test's directory.
# Files named here do not exist unless `_inputs` writes them (a.yaml, b.yaml: valid configs).
CASES: dict[str, list[tuple[list[str], str]]] = {
    "data synth": [(["--out", "shapes", "--train", "0"], "--train 0: must be at least 1")],
    "train": [(["missing.yaml", "--cpu"], "missing.yaml: no such file")],
    "study run": [(["missing.yaml"], "missing.yaml: no such file")],
    "study plan": [(["missing.yaml", "--gpus", "8"], "missing.yaml: no such file")],
    "study resume": [
        (["nope", "--storage-path", "ray_results"], UNKNOWN),
        (["nope", "--storage-path", "ray_results", "--retry-failed"], UNKNOWN),
    ],
    "study extend": [(["nope", "--add", "2", "--storage-path", "ray_results"], UNKNOWN)],
    "study best": [(["nope", "--storage-path", "ray_results"], UNKNOWN)],
    "study list": [(["--storage-path", "ray_results"], "no study storage at ray_results")],
    "study validate": [(["nope", "--storage-path", "ray_results"], UNKNOWN)],
    "study report": [(["nope", "--storage-path", "ray_results"], UNKNOWN)],
    "study repair": [(["nope", "--storage-path", "ray_results"], "nope")],
    "compare": [
        (["a.yaml", "missing.yaml"], "missing.yaml: no such file"),
        (["a.yaml", "b.yaml", "--seeds", "0"], "--seeds 0: must be at least 1"),
    ],
    "paper": [
        (["--seeds", "0", "--configs", str(REPO / "configs")], "--seeds 0: must be at least 1"),
        (["--detectors", "bogus", "--configs", str(REPO / "configs")], "--detectors: unknown bogus"),
    ],
    "predict": [(["missing.pt", "image.png"], "model 'missing.pt': not a models:/ URI")],
    "reproduce": [
        (["missing.yaml"], "missing.yaml: no such file"),
        (
            ["0123456789abcdef0123456789abcdef", "--tracking-uri", "sqlite:///{tmp}/none.db"],
            "no MLflow store at {tmp}/none.db",
        ),
    ],
}


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every runnable sub-command of `parser`, as typed ("study resume")."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                below = subcommands(sub, f"{prefix}{name} ")
                found += below or [f"{prefix}{name}"]
    return found


COMMANDS = subcommands(build_parser())


def test_every_subcommand_has_a_bad_input_case():
    assert COMMANDS, "no sub-commands found in pisa.cli.parser"
    missing = [c for c in COMMANDS if c not in CASES]
    assert not missing, f"add a bad-input case to CASES for: {missing}"


def _inputs(tmp: Path, synthetic_dir: Path) -> None:
    """The valid files the cases name (two training configs, an image)."""
    from PIL import Image

    config = yaml.safe_dump(tiny_experiment(synthetic_dir, tmp))
    (tmp / "a.yaml").write_text(config)
    (tmp / "b.yaml").write_text(config)
    Image.new("RGB", (8, 8)).save(tmp / "image.png")


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize(
    "command, argv, says",
    [
        pytest.param(c, argv, says, id=f"{c.replace(' ', '-')}-{i}")
        for c in COMMANDS
        for i, (argv, says) in enumerate(CASES.get(c, []))
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    command, argv, says, tmp_path, synthetic_dir, capsys, monkeypatch, no_ray
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _inputs(tmp_path, synthetic_dir)
    before = _files(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(command.split() + argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, captured.out[-2000:], err[-2000:])
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert says.replace("{tmp}", str(tmp_path)) in err, err
    assert _files(tmp_path) == before, "something was written"
