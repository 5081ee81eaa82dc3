"""`pixforge shapes export` and `pixforge eval`: a folder round trip, the report, the chart, the errors."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from pixforge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    result = runner.invoke(app, ["shapes", "export", str(out), "--split", "test", "--n", "30",
                                 "--sizes", "128x128,96x160", "--paraphrase"])
    assert result.exit_code == 0, result.output
    return out


def test_export_writes_images_metadata_and_geneval_prompts(exported):
    records = [json.loads(line) for line in (exported / "metadata.jsonl").read_text().splitlines()]
    prompts = [json.loads(line) for line in (exported / "prompts_geneval.jsonl").read_text().splitlines()]
    assert len(records) == len(prompts) == 30
    first = records[0]
    assert {"file_name", "text", "objects", "background", "category"} <= set(first)
    assert Image.open(exported / first["file_name"]).size == (first["width"], first["height"])
    assert {"tag", "prompt", "include"} <= set(prompts[0]) and prompts[0]["prompt"] == first["text"]


def test_eval_scores_ground_truth_at_full_accuracy_and_writes_json_and_plot(exported, tmp_path):
    out, plot = tmp_path / "results.json", tmp_path / "results.png"
    result = runner.invoke(app, ["eval", "--images", str(exported), "--out", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "100.0%" in result.output
    report = json.loads(out.read_text())
    assert report["overall"] == {"passed": 30, "total": 30, "accuracy": 1.0, "category_mean": 1.0}
    assert sum(row["total"] for row in report["categories"].values()) == 30
    assert Image.open(plot).size[0] > 100


def test_eval_reports_failures_per_category(exported, tmp_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    records = [json.loads(line) for line in (exported / "metadata.jsonl").read_text().splitlines()][:6]
    with open(folder / "metadata.jsonl", "w") as handle:
        for record in records:  # captions only, and every image shown with the next one's caption
            handle.write(json.dumps({"file_name": record["file_name"], "text": record["text"]}) + "\n")
            Image.open(exported / record["file_name"]).save(folder / record["file_name"])
    rotated = [dict(r, text=records[(i + 1) % 6]["text"]) for i, r in enumerate(
        json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines())]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rotated))
    out = tmp_path / "r.json"
    assert runner.invoke(app, ["eval", "--images", str(folder), "--out", str(out)]).exit_code == 0
    report = json.loads(out.read_text())
    assert report["overall"]["passed"] == 0
    assert all(sample["reason"] for sample in report["samples"])


def test_eval_with_model_generates_scores_and_saves_the_images(exported, tmp_path):
    from pixforge.models.presets import get_preset
    from pixforge.models.text import MiniLMTextEncoder
    from pixforge.models.transformer import PixArtTransformer
    from pixforge.sampling.pipeline import PixArtPipeline
    from pixforge.train.config import TrainConfig
    from pixforge.train.loop import build_vae

    vae = build_vae(TrainConfig(target="vae", vae_channels=(8, 8, 16, 16), resolution=64))
    transformer = PixArtTransformer(get_preset("shapes-tiny"))
    PixArtPipeline(transformer, vae, MiniLMTextEncoder.from_package(default_max_length=16)).save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join((exported / "prompts_geneval.jsonl").read_text().splitlines()[:3]))
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "model"), "--prompts", str(prompts),
                                 "--out", str(out), "--save-images", str(tmp_path / "images"), "--size", "64x64"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["overall"]["total"] == 3
    assert len(list((tmp_path / "images").glob("*.png"))) == 3


def test_eval_needs_exactly_one_source():
    result = runner.invoke(app, ["eval"])
    assert result.exit_code != 0 and "exactly one of --images" in str(result.exception)
