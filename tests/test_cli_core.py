"""`pixforge info` and `pixforge convert` (in-process through typer's runner)."""
import pytest
import torch
from typer.testing import CliRunner

from pixforge.cli import app
from pixforge.errors import PixforgeError
from pixforge.models.convert import diffusers_to_original, pixforge_to_diffusers
from pixforge.models.presets import get_preset
from pixforge.models.transformer import PixArtTransformer

runner = CliRunner()


def test_info_prints_parameters_and_flops_of_a_preset():
    result = runner.invoke(app, ["info", "XL/2", "--size", "256x256"])
    assert result.exit_code == 0, result.output
    assert "parameters: 610,856,096" in result.output
    assert "tokens at 256x256: 256" in result.output


def test_info_rejects_a_malformed_size():
    result = runner.invoke(app, ["info", "tiny", "--size", "big"])
    assert isinstance(result.exception, PixforgeError)
    assert "WIDTHxHEIGHT" in str(result.exception)


def test_convert_original_pth_to_a_folder_diffusers_loads(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = PixArtTransformer(get_preset("tiny")).eval()
    state = diffusers_to_original(pixforge_to_diffusers(model.state_dict()))
    torch.save({"state_dict": state}, tmp_path / "orig.pth")
    result = runner.invoke(app, ["convert", str(tmp_path / "orig.pth"), str(tmp_path / "out"), "--config", "tiny"])
    assert result.exit_code == 0, result.output
    reference = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "out")
    assert sum(p.numel() for p in reference.parameters()) == model.num_parameters()
    assert torch.equal(reference.state_dict()["transformer_blocks.0.attn1.to_k.weight"], state["blocks.0.attn.qkv.weight"][48:96])


def test_convert_to_a_bf16_single_file(tmp_path):
    PixArtTransformer(get_preset("tiny")).save_pretrained(tmp_path / "t")
    result = runner.invoke(app, ["convert", str(tmp_path / "t"), str(tmp_path / "m.safetensors"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        assert handle.get_tensor("proj_out.weight").dtype == torch.bfloat16
    loaded = PixArtTransformer.from_pretrained(tmp_path / "m.safetensors", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.config == get_preset("tiny")


def test_precision_names_are_validated_and_auto_resolves_to_a_real_dtype(tmp_path, monkeypatch):
    from pixforge.models import precision

    monkeypatch.setenv("PIXFORGE_CACHE_DIR", str(tmp_path))
    with pytest.raises(PixforgeError, match="unknown precision"):
        precision.resolve_dtype("fp8")
    assert precision.resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    assert (tmp_path / "precision.json").exists()  # measured once, then cached


def test_devices_are_validated_with_a_clear_error(monkeypatch):
    from pixforge.models import precision

    assert precision.resolve_device("cpu") == "cpu" and precision.resolve_device(torch.device("cpu")) == "cpu"
    with pytest.raises(PixforgeError, match="unknown device 'tpu'"):
        precision.resolve_device("tpu")
    with pytest.raises(PixforgeError, match="unknown device 'cuda:x'"):
        precision.resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve_device("auto") == "cpu"
    with pytest.raises(PixforgeError, match="no CUDA GPU is visible here"):
        precision.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert precision.resolve_device("auto") == "cuda" and precision.resolve_device("CUDA:0") == "cuda:0"
    with pytest.raises(PixforgeError, match="has 1 CUDA GPU"):
        precision.resolve_device("cuda:1")


def test_bench_lists_the_benchmarks_and_runs_one_with_its_own_arguments(tmp_path, monkeypatch):
    listed = runner.invoke(app, ["bench"])
    assert listed.exit_code == 0, listed.output
    assert "cache " in listed.output and "generate_cli" in listed.output and "Feature caching" in listed.output
    scripts = tmp_path / "benches"
    scripts.mkdir()
    (scripts / "helper.py").write_text("WORD = 'neighbour'\n")
    (scripts / "echo.py").write_text(
        '"""Echo the command line."""\nimport sys\nfrom helper import WORD\n'
        'if __name__ == "__main__":\n    print(WORD, sys.argv[1:])\n    raise SystemExit(3)\n')
    monkeypatch.setenv("PIXFORGE_BENCHMARKS", str(scripts))
    listing = runner.invoke(app, ["bench", "--list"]).output
    assert "echo" in listing and "Echo the command line." in listing and "helper" not in listing
    ran = runner.invoke(app, ["bench", "echo", "--prompts", "3", "--help", "x"])
    assert ran.exit_code == 3 and "neighbour ['--prompts', '3', '--help', 'x']" in ran.output  # passed through
    unknown = runner.invoke(app, ["bench", "nosuch"])
    assert isinstance(unknown.exception, PixforgeError) and "unknown benchmark 'nosuch'; choose one of" in str(
        unknown.exception) and "echo" in str(unknown.exception)
    monkeypatch.setenv("PIXFORGE_BENCHMARKS", str(tmp_path / "missing"))
    missing = runner.invoke(app, ["bench"])
    assert isinstance(missing.exception, PixforgeError) and "no benchmarks folder" in str(missing.exception)
