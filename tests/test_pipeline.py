"""``raycv pipeline`` end to end on configs/pipeline_smoke.yaml: every stage, stopped after
the sweep and resumed without re-running it, then exported, predicted and reported.
Before that it is killed once its first stage has finished (fault injection)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from raycv.artifacts import checkpoint_file, load_trained, read_manifest
from raycv.config import ConfigError, validate
from raycv.pipeline import check_pipeline, run_pipeline

REPO = Path(__file__).resolve().parents[1]


def _given(storage) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "pipeline_smoke.yaml").read_text())
    raw["run"] = {"storage": str(storage)}
    return raw


def test_pretrain_overrides_are_checked_before_anything_runs(tmp_path):
    given = _given(tmp_path)
    given["pipeline"]["pretrain"]["model.nmae"] = "resnet18"
    with pytest.raises(ConfigError, match=r"pipeline.pretrain: model.nmae is not a config key"):
        check_pipeline(validate(given), given)
    given = _given(tmp_path)
    given["pipeline"]["pretrain"] = None
    given["finetune"] = {"strategy": "full"}
    with pytest.raises(ConfigError, match="needs something to fine-tune from"):
        check_pipeline(validate(given), given)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def pipeline(ray_local, tmp_path_factory, ray_env, kill_when):
    """The smoke pipeline killed (SIGKILL, its whole process group) once its pretrain stage
    has finished, resumed until its sweep is done, then resumed to the end."""
    storage = tmp_path_factory.mktemp("pipeline")
    given = _given(storage)
    killed = _kill_after_pretrain(given, storage, ray_env, kill_when)
    run = run_pipeline(given, validate(given), resume=True, local=True, until="tune")
    stopped = read_manifest(run.path)
    tune_manifest = (run.path / "tune" / "manifest.json").read_text()
    trials = sorted(p.name for p in (run.path / "tune" / "trials").iterdir())
    resumed = run_pipeline(given, validate(given), resume=True, local=True)
    return {
        "run": resumed,
        "killed": killed,
        "stopped": stopped,
        "tune_manifest": tune_manifest,
        "trials": trials,
    }


def _kill_after_pretrain(given: dict, storage: Path, ray_env, kill_when) -> dict[str, str]:
    """Run ``raycv pipeline --local`` in a process of its own until the pretrain stage's
    manifest says finished, kill it, and return that stage's files as they were."""
    config = storage / "pipeline.yaml"
    config.write_text(yaml.safe_dump(given))
    command = [sys.executable, "-m", "raycv", "pipeline", str(config), "--local"]

    def pretrain_finished() -> Path | None:
        for manifest in storage.glob("pipeline_smoke/pipeline-*/pretrain/manifest.json"):
            if json.loads(manifest.read_text())["status"] == "finished":
                return manifest.parent
        return None

    with ray_env() as env:
        stage = kill_when(command, env, storage / "killed.log", pretrain_finished)
    return {name: (stage / name).read_text() for name in ("manifest.json", "metrics.jsonl")}


@pytest.mark.slow
def test_pipeline_killed_after_a_stage_resumes_without_rerunning_it(pipeline):
    pretrain = pipeline["run"].path / "pretrain"
    for name, text in pipeline["killed"].items():
        assert (pretrain / name).read_text() == text
    assert len(pipeline["killed"]["metrics.jsonl"].splitlines()) == 1  # its one epoch


@pytest.mark.slow
def test_resume_after_the_sweep_does_not_rerun_it(pipeline):
    run = pipeline["run"]
    assert pipeline["stopped"]["status"] == "stopped"
    assert set(pipeline["stopped"]["stages"]) == {"pretrain", "tune"}
    assert (run.path / "tune" / "manifest.json").read_text() == pipeline["tune_manifest"]
    assert sorted(p.name for p in (run.path / "tune" / "trials").iterdir()) == pipeline["trials"]
    manifest = read_manifest(run.path)
    assert manifest["status"] == "finished"
    assert [s for s, v in manifest["stages"].items() if v["status"] == "finished"] == [
        "pretrain",
        "tune",
        "finetune",
        "scratch",
        "compress",
        "export",
        "report",
    ]
    assert manifest["final_model"] == "compress"


@pytest.mark.slow
def test_resume_records_a_stage_whose_own_manifest_says_finished(pipeline, tmp_path):
    """Killed after the pretrain stage finished but before the pipeline's manifest said so:
    --resume skips the stage and lists it as finished."""
    run = tmp_path / "pipeline_smoke" / pipeline["run"].path.name
    run.mkdir(parents=True)
    for name in ("config.yaml", "given.yaml", "manifest.json"):
        shutil.copy(pipeline["run"].path / name, run / name)
    shutil.copytree(pipeline["run"].path / "pretrain", run / "pretrain")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["pretrain"]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
    before = (run / "pretrain" / "manifest.json").read_text()
    given = _given(tmp_path)
    run_pipeline(given, validate(given), resume=str(run), local=True, until="pretrain")
    assert read_manifest(run)["stages"]["pretrain"]["status"] == "finished"
    assert (run / "pretrain" / "manifest.json").read_text() == before  # not run again


@pytest.mark.slow
def test_each_stage_names_its_parent(pipeline):
    path = pipeline["run"].path
    pretrain_ckpt = str(path / "pretrain" / "best" / "checkpoint.pt")
    finetune_ckpt = str(path / "finetune" / "best" / "checkpoint.pt")
    assert read_manifest(path / "pretrain")["parent"] is None
    assert read_manifest(path / "finetune")["parent"] == pretrain_ckpt
    assert read_manifest(path / "scratch")["parent"] is None
    assert read_manifest(path / "compress")["parent"] == finetune_ckpt
    # export names the run that trained its model: the compress stage's last fine-tuning
    assert read_manifest(path / "export")["parent"] == str(path / "compress" / "steps" / "prune-1")
    # The final fine-tune ran the sweep's best config under a fresh run folder.
    best = yaml.safe_load((path / "tune" / "best.yaml").read_text())
    finetune_cfg = yaml.safe_load((path / "finetune" / "config.yaml").read_text())
    assert finetune_cfg["optimizer"]["lr"] == best["optimizer"]["lr"]
    assert finetune_cfg["finetune"]["source"] == pretrain_ckpt
    # Same budget: scratch trains the target for as many epochs, from no weights.
    scratch_cfg = yaml.safe_load((path / "scratch" / "config.yaml").read_text())
    assert scratch_cfg["finetune"]["source"] is None
    assert scratch_cfg["train"]["epochs"] == finetune_cfg["train"]["epochs"]


@pytest.mark.slow
def test_compress_stage_pruned_the_fine_tuned_model(pipeline):
    path = pipeline["run"].path
    before = read_manifest(path / "finetune")["metrics"]["best"]
    after = read_manifest(path / "compress")["metrics"]["best"]
    assert after["params"] < 0.5 * before["params"]
    assert after["macs"] < 0.5 * before["macs"]
    rows = read_manifest(path / "compress")["compression"]
    assert [r["method"] for r in rows] == ["original", "prune", "prune", "quantize"]
    assert rows[0]["params"] == before["params"] and rows[2]["score"] == after["val_acc"]
    assert (path / "compress" / rows[3]["file"]).suffix == ".pt2"
    best_trial = read_manifest(path / "tune")["best_trial"]
    assert checkpoint_file(path / "tune") == path / "tune" / "trials" / best_trial / "best" / (
        "checkpoint.pt"
    )
    final = load_trained(path)  # a pipeline folder means its final model
    assert sum(p.numel() for p in final.model.parameters()) == after["params"]
    assert final.class_names == ["hexagon", "ring", "heart"]


@pytest.mark.slow
def test_report_has_every_section(pipeline):
    path = pipeline["run"].path
    md = (path / "report.md").read_text()
    html = (path / "report.html").read_text()
    for section in (
        "## Stages",
        "## Transfer learning vs training from scratch",
        "## Learning curves",
        "## Sweep",
        "## Final model",
        "## Compression",
        "## Export",
    ):
        assert section in md
    assert "Status: **finished**" in md
    assert html.count("data:image/png;base64,") >= 8
    assert "http://" not in html and "https://" not in html
    acc = {
        stage: read_manifest(path / stage)["metrics"]["best"]["val_acc"]
        for stage in ("finetune", "scratch")
    }
    points = f"{100 * (acc['finetune'] - acc['scratch']):+.1f} points"
    assert points in md


@pytest.mark.slow
def test_predict_with_the_exported_model(pipeline, tmp_path):
    from PIL import Image

    from raycv.data.shapes import render
    from raycv.predict import run_predict

    images = tmp_path / "to predict"
    images.mkdir()
    for i in range(6):
        classes = ["hexagon", "ring", "heart"]
        sample = render(i, image_size=32, num_classes=3, difficulty="easy", seed=5, classes=classes)
        Image.fromarray(sample["image"]).save(images / f"{i}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = run_predict(pipeline["run"].path / "export", [str(images)], top_k=2)
    manifest = json.loads((out.path / "manifest.json").read_text())
    assert manifest["counts"] == {"files": 7, "predicted": 6, "bad": 1}


@pytest.mark.slow
def test_a_guard_that_keeps_the_original_makes_the_fine_tuned_model_final(pipeline, tmp_path):
    """A compress stage that only quantizes leaves no compressed raycv checkpoint to keep:
    the guard keeps the model it started from, the pipeline's final model is the fine-tuned
    one, and the export, the manifest and the report all say so."""
    pretrained = pipeline["run"].path / "pretrain" / "best" / "checkpoint.pt"
    given = _given(tmp_path)
    given["pipeline"] = {"pretrain": None, "sweep": False, "scratch": False}
    given["finetune"] = {"source": str(pretrained), "strategy": "full"}
    given["train"]["epochs"] = 1
    given["compress"] = {
        "quantize": "int8",
        "calibration_images": 16,
        "latency": {"runtime": "eager", "repeats": 2, "batch_sizes": [1]},
    }
    run = run_pipeline(given, validate(given), local=True).path
    assert read_manifest(run)["final_model"] == "finetune"
    compress = read_manifest(run / "compress")
    assert compress["guard"]["kept"] == 0 and compress["guard"]["kept_variant"] == "original"
    assert compress["paths"]["best_checkpoint"] == "variants/original"
    tuned = load_trained(run / "finetune")
    kept = load_trained(run / "compress")  # the original, linked into the compress folder
    assert kept.metrics == tuned.metrics
    assert read_manifest(run / "export")["parent"] == str(run / "finetune")
    report = (run / "report.md").read_text()
    assert "The final model is the best checkpoint of `finetune/`" in report
    assert "its guard kept this model" in report and "The guard kept the original model" in report
