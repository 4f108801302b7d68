"""The command line: the demo end to end at a tiny size, the plan dry run, and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapterkit
from adapterkit.apps import cli
from adapterkit.apps.data import split_source


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Small A (code) and B (prose) files cut from a few standard-library modules."""
    import inspect
    import json as json_module
    import textwrap

    code, prose = [], []
    for module in (json_module.decoder, json_module.encoder, textwrap, inspect):
        c, p = split_source(inspect.getsource(module))
        code.append(c[:15_000])
        prose.append(p[:8_000])
    root = tmp_path_factory.mktemp("corpora")
    (root / "a.txt").write_text("\n".join(code))
    (root / "b.txt").write_text("\n\n".join(prose))
    return root / "a.txt", root / "b.txt"


def _demo(corpora: tuple[Path, Path], tmp_path: Path, *extra: str) -> list[str]:
    a, b = corpora
    return ["demo", "--size", "tiny", "--data-a", str(a), "--data-b", str(b), "--out",
            str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]


def test_demo_end_to_end(corpora: tuple[Path, Path], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_demo(corpora, tmp_path, "--no-progress")) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    regimes = {r["regime"]: r for r in results["regimes"]}
    assert list(regimes) == [r.name for r in cli.REGIMES]

    # every regime prints the seed's two lines, and the table names every regime
    assert out.count("Trainable params: ") == out.count("Total params: ") == len(cli.REGIMES)
    table = out[out.index("validation bits per character"):]
    assert all(name in table for name in regimes)

    # parameter counts follow from what each regime trains
    model = cli.SIZES["tiny"].model(0)
    n_base, n_cls = (sum(p.numel() for p in m.parameters()) for m in (model, model.cls))
    adapterkit.inject(model, list(cli.Recipe().targets), cli.Recipe().adapter)
    n_adapters = sum(p.numel() for a in adapterkit.adapters(model).values()
                     for p in a.parameters())
    expected = {
        "no adaptation": (0, n_base), "full fine-tuning": (n_base, n_base),
        "head only": (n_cls, n_base), "adapters only": (n_adapters, n_base + n_adapters),
        "adapters + head": (n_adapters + n_cls, n_base + n_adapters),
    }
    for name, (trainable, total) in expected.items():
        assert (regimes[name]["trainable"], regimes[name]["total"]) == (trainable, total), name
        assert f"Trainable params: {trainable} " in out

    # no adaptation leaves the base as it was; training on B lowers B's loss
    zero = regimes["no adaptation"]
    assert zero["curve"] == [[0, zero["bpc_b"], zero["bpc_a"]]]
    for name in ("full fine-tuning", "adapters + head", "head only"):
        assert regimes[name]["bpc_b"] < zero["bpc_b"], name
        assert regimes[name]["curve"][0][1:] == [zero["bpc_b"], zero["bpc_a"]]

    # the best adapter regime was saved, reloaded into a fresh base and gave the same loss
    reload = results["reload"]
    assert reload["matches"] and reload["bpc_b_reloaded"] == reload["bpc_b_trained"]
    assert reload["regime"] in ("adapters only", "adapters + head")
    saved = load_file(str(tmp_path / "out" / "adapters" / "adapter_model.safetensors"))
    assert any(k.startswith("adapters.decoder_blocks.0.ffn_block.") for k in saved)
    assert any(k.startswith("modules.cls.") for k in saved) == (reload["regime"] ==
                                                                "adapters + head")
    assert "(matches)" in out

    # the pretrained base went to the cache and the output says so
    assert results["base"]["reused"] is False
    assert Path(results["base"]["path"]).parent == tmp_path / "cache"
    assert "cached at" in out


def test_demo_reuses_the_cached_base_and_repeats_exactly(
        corpora: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _demo(corpora, tmp_path, "--no-progress", "--steps", "4")
    assert cli.main(args) == 0
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    capsys.readouterr()
    assert cli.main(args) == 0
    second = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "pretrained base: reused from cache" in capsys.readouterr().out
    assert second["base"] == {**first["base"], "reused": True}
    assert [r["bpc_b"] for r in second["regimes"]] == [r["bpc_b"] for r in first["regimes"]]
    # another seed is another base
    assert cli.main(args + ["--seed", "1"]) == 0
    third = json.loads((tmp_path / "out" / "results.json").read_text())
    assert third["base"]["path"] != first["base"]["path"] and not third["base"]["reused"]
    assert len(list((tmp_path / "cache").glob("base-*.safetensors"))) == 2


def test_demo_adapter_flags(corpora: tuple[Path, Path], tmp_path: Path) -> None:
    args = _demo(corpora, tmp_path, "--no-progress", "--steps", "2", "--targets", "mha_block",
                 "ffn_block", "--bottleneck", "4", "--placement", "sequential")
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    adapter = results["recipe"]["adapter"]
    assert (adapter["bottleneck"], adapter["placement"], adapter["scaling"]) == (
        4, "sequential", 1.0)  # a sequential adapter is unscaled unless --scaling says so
    assert results["recipe"]["targets"] == ["mha_block", "ffn_block"]
    assert results["command"] == "adapterkit " + " ".join(args)
    saved = load_file(str(tmp_path / "out" / "adapters" / "adapter_model.safetensors"))
    assert saved["adapters.decoder_blocks.0.mha_block.down.weight"].shape == (4, 32)


def test_demo_shows_progress_bars_on_stderr(corpora: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")  # the documented skip: the cli extra is not installed
    assert cli.main(_demo(corpora, tmp_path, "--progress", "--steps", "2")) == 0
    err = capsys.readouterr().err
    for desc in ("pretraining on A", "full fine-tuning", "adapters + head"):
        assert f"{desc}:" in err


def test_demo_writes_a_png_plot(corpora: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the documented skip: the cli extra is not installed
    assert cli.main(_demo(corpora, tmp_path, "--no-progress", "--steps", "2")) == 0
    png = (tmp_path / "out" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_demo_without_matplotlib_says_so(corpora: tuple[Path, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert cli.main(_demo(corpora, tmp_path, "--progress", "--steps", "2")) == 0
    assert "not plotted (matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "out" / "curves.png").exists()


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(cli.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.cache_root(None) == tmp_path / "xdg" / "adapterkit"
    monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "env"))
    assert cli.cache_root(None) == tmp_path / "env"
    assert cli.cache_root(str(tmp_path / "flag")) == tmp_path / "flag"


# -- bad input: one line on stderr, exit status 2, nothing written -------------------------


def _bad(tmp_path: Path, name: str, content: bytes | None) -> Path:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("which", "content", "message"),
    [
        ("a", None, r"data file .*missing\.txt does not exist"),
        ("b", None, r"data file .*missing\.txt does not exist"),
        ("a", b"", r"data file .*missing\.txt is empty"),
        ("b", b"\x00\x01\x02binary\x00", r"data file .*missing\.txt looks binary"),
        ("a", b"short text\n" * 3, r"corpus A .* shorter than the context length 32"),
        ("b", b"tiny\n" * 20, r"corpus B .* shorter than the context length 32"),
    ],
)
def test_bad_data_files(corpora: tuple[Path, Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str], which: str, content: bytes | None,
                        message: str) -> None:
    bad = _bad(tmp_path, "missing.txt", content)
    a, b = corpora
    args = _demo((bad, b) if which == "a" else (a, bad), tmp_path, "--no-progress")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adapterkit: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_out_must_be_a_directory(corpora: tuple[Path, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").write_text("a file")
    assert cli.main(_demo(corpora, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file; give a directory" in err
    assert not (tmp_path / "cache").exists()


def test_adapters_directory_with_other_files_is_refused(
        corpora: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out" / "adapters").mkdir(parents=True)
    (tmp_path / "out" / "adapters" / "notes.txt").write_text("mine")
    assert cli.main(_demo(corpora, tmp_path, "--no-progress", "--steps", "2")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds other files (notes.txt)" in err
    assert (tmp_path / "out" / "adapters" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["demo", "plan"])
def test_unknown_target(corpora: tuple[Path, Path], tmp_path: Path, command: str,
                        capsys: pytest.CaptureFixture[str]) -> None:
    args = (_demo(corpora, tmp_path) if command == "demo" else ["plan", "--size", "tiny"])
    assert cli.main([*args, "--targets", "mha_blok"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no module matches 'mha_blok'; closest: decoder_blocks.0.mha_block" in err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
        ("json:no_such_factory", "module 'json' has no 'no_such_factory'"),
        ("json:__doc__", "is not callable"),
        ("json:dumps", "the factory raised TypeError"),
        ("json:JSONDecoder", "returned a JSONDecoder, not a torch.nn.Module"),
        ("justaname", "give 'gpt' or a factory as 'module:callable'"),
    ],
)
def test_bad_model_factory(model: str, message: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "--model", model]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "args",
    [["demo", "--steps", "0"], ["demo", "--size", "huge"], ["plan", "--placement", "x"],
     ["plan", "--bottleneck", "-3"], ["demo", "--seed", "x"], ["frobnicate"], []],
)
def test_bad_flags_are_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adapterkit: error: ")
    assert err.count("adapterkit:") == 1  # the program is named once
    assert "--help" in err


@pytest.mark.parametrize("command", ["demo", "plan"])
def test_bad_adapter_config_is_one_line(command: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    args = [command, "--size", "tiny", "--scaling", "nan"]
    assert cli.main(args + (["--cache-dir", str(tmp_path)] if command == "demo" else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "AdapterConfig.scaling must be finite, got nan" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", [[], ["demo"], ["plan"]])
def test_help_on_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: adapterkit")
    for flag in {"demo": ["--quick", "--out", "--data-a", "--data-b", "--seed", "--cache-dir"],
                 "plan": ["--model", "--targets"]}.get(command[0] if command else "", []):
        assert flag in out


def test_console_entry_point_and_python_m(tmp_path: Path) -> None:
    """The real process: ``python -m adapterkit``; bad input gives no traceback."""
    run = subprocess.run([sys.executable, "-m", "adapterkit", "demo", "--data-a",
                          str(tmp_path / "nope.txt"), "--cache-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert "nope.txt does not exist" in run.stderr
    assert run.stdout == ""


# -- plan ----------------------------------------------------------------------------------


def _has_plan() -> bool:
    return callable(getattr(adapterkit, "plan", None))


def make_mlp() -> torch.nn.Module:
    """A factory for `adapterkit plan --model tests.test_cli:make_mlp`."""
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_plan_reference_gpt(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "--size", "tiny"]) == 0
    out = capsys.readouterr().out
    expected = adapterkit.plan(cli.SIZES["tiny"].model(0), ["mha_block", "ffn_block"])
    assert out == f"{expected}\n"
    assert "decoder_blocks.0.mha_block" in out and "decoder_blocks.0.ffn_block" in out


def test_plan_factory_targets_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "my_models.py").write_text(
        "import torch\n\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(16, 4))\n")
    monkeypatch.chdir(tmp_path)  # the CLI imports factories from the working directory
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["plan", "--model", "my_models:build", "--targets", "0", "2",
                     "--bottleneck", "4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[2:4]] == ["0", "2"]
    # bottleneck 4 on outputs of width 16 and 4: 16 -> 4 -> 16 and 4 -> 4 -> 4
    assert lines[-1] == f"2 adapters, {(2 * 16 * 4 + 4 + 16) + (2 * 4 * 4 + 4 + 4)} parameters"
    assert cli.main(["plan", "--model", "my_models:build", "--targets", "re:[02]"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("2 adapters")
    # the ReLU has no width to read: a one-line error that says what to pass
    assert cli.main(["plan", "--model", "my_models:build", "--targets", "re:\\d"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot infer d_model for module '1'" in err


def test_adapters_only_keeps_the_base_when_switched_off(
        corpora: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Frozen backbone: with its adapters off, 'adapters only' is the base again, on A too."""
    assert cli.main(_demo(corpora, tmp_path, "--no-progress", "--steps", "6")) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    regimes = {r["regime"]: r for r in results["regimes"]}
    off = results["bpc_a_adapters_off"]
    assert off["adapters only"] == regimes["no adaptation"]["bpc_a"]
    assert regimes["adapters only"]["bpc_a"] != regimes["no adaptation"]["bpc_a"]
    assert off["adapters + head"] != regimes["no adaptation"]["bpc_a"]  # its head moved
    assert "A, adapters off" in capsys.readouterr().out
