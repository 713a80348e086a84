"""The pipeline report: built from a pipeline folder of real pieces (metrics histories,
manifests, checkpoints of a real and a channel-pruned ResNet-18, plots), with the final
model evaluated on a real local Ray. It states the right numbers in the right rows, says
"not run" for missing stages, passes GFM's table rules and opens offline as one HTML file."""

from __future__ import annotations

import copy
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raycv import checkpoint, model_stats, plots
from raycv.config import Config, PruneConfig, dump_config, from_dict
from raycv.data import shapes
from raycv.evaluate import Predictions, confusion, worst_mistakes
from raycv.models import create_model
from raycv.pruning import prune_model
from raycv.report import markdown_text as md
from raycv.report.evaluation import evaluate_final
from raycv.report.format import fmt_count, fmt_size
from raycv.report.html_page import to_html
from raycv.report.write import write_report
from raycv.runs import RunFolder, best_of, write_json, write_manifest

# TorchScript is deprecated in torch 2.14; the export below still writes one.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")

CLASSES = shapes.class_names(4)  # the smoke config's classes
FINETUNE_ACC = [0.60, 0.80, 0.88, 0.90]  # fine-tuned: fast, high
SCRATCH_ACC = [0.30, 0.45, 0.55, 0.62]  # from scratch: the same 4 epochs, slower
COMPRESS_ACC = [0.84, 0.87]
WEIGHTS = "ResNet18_Weights.IMAGENET1K_V1"  # what the fine-tune config names as its source


def history(accs: list[float], stats: model_stats.ModelStats) -> list[dict]:
    return [
        {
            "epoch": epoch,
            "train_loss": 1.5 / epoch,
            "train_acc": acc + 0.05,
            "val_loss": 1.4 / epoch,
            "val_acc": acc,
            **model_stats.as_metrics(stats),
            "images_per_s": 300.0,
            "epoch_s": 1.0,
        }
        for epoch, acc in enumerate(accs, start=1)
    ]


def training_stage(
    root: Path,
    name: str,
    cfg: Config,
    rows: list[dict],
    elapsed: float,
    model: torch.nn.Module | None = None,
) -> RunFolder:
    """A finished train/finetune/compress folder as ``raycv.train.finish`` leaves it."""
    run = RunFolder(root / name)
    run.path.mkdir(parents=True)
    run.config.write_text(dump_config(cfg))
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plots.training_curves(rows, run.plots / "curves.png")
    best = best_of(rows, "val_acc", "max")
    if model is not None:
        run.best.mkdir()
        checkpoint.save(
            run.best,
            {
                "model": model.state_dict(),
                "class_names": CLASSES,
                "config": cfg.model_dump(mode="json"),
                "metrics": best,
                "epoch": best["epoch"],
            },
        )
    paths = {"config": "config.yaml", "metrics": "metrics.jsonl", "curves": "plots/curves.png"}
    paths["best_checkpoint"] = "best" if model is not None else None
    write_manifest(
        run,
        cfg,
        "finished",
        {
            "metrics": {"final": rows[-1], "best": best},
            "elapsed_s": elapsed,
            "paths": paths,
        },
        kind={"finetune": "finetune", "compress": "compress"}.get(name, "train"),
    )
    return run


def compression_table(
    run: RunFolder, before: model_stats.ModelStats, after: model_stats.ModelStats
) -> None:
    """The rows and plot ``raycv.compress`` adds to its folder: the original, then pruned."""

    def row(variant, method, stats, acc, latency):
        return {
            "variant": variant, "method": method, "params": stats.params,
            "nonzero_params": stats.nonzero_params, "macs": stats.macs,
            "file": "best/checkpoint.pt", "file_bytes": stats.params * 4,
            "latency_ms": {"1": latency, "32": 8 * latency}, "metric": "val_acc", "score": acc,
            "threads": 1,
            "runtime": "eager", "epochs": 2,
        }  # fmt: skip

    rows = [
        row("original", "original", before, FINETUNE_ACC[-1], 4.0),
        row("channel 50% (one-shot), fine-tuned 2 epochs", "prune", after, COMPRESS_ACC[-1], 2.0),
    ]
    manifest = json.loads(run.manifest.read_text())
    plot = plots.compression_tradeoff(rows, run.plots / "compression.png")
    manifest["compression"] = rows
    manifest["paths"]["plot"] = str(plot.relative_to(run.path))
    write_json(run.manifest, manifest)


def tune_stage(root: Path, cfg: Config) -> RunFolder:
    """A sweep folder as ``raycv.sweep.results.write_results`` leaves it: 3 trials."""
    run = RunFolder(root / "tune")
    run.path.mkdir(parents=True)
    run.config.write_text(dump_config(cfg))
    trials = [
        # Ray's trial ids are hex; this one reads as a number (5e732) unless kept as text.
        {"trial_id": "5e732_00000", "status": "finished", "optimizer.lr": 0.003, "epochs": 4,
         "best_epoch": 4, "val_acc": 0.875, "macs": 37e6, "pareto": True},
        {"trial_id": "t_1", "status": "stopped early", "optimizer.lr": 0.0002, "epochs": 1,
         "best_epoch": 1, "val_acc": 0.4, "macs": 37e6, "pareto": False},
        {"trial_id": "t_2", "status": "finished", "optimizer.lr": 0.001, "epochs": 4,
         "best_epoch": 3, "val_acc": 0.8, "macs": 37e6, "pareto": False},
    ]  # fmt: skip
    pd.DataFrame(trials).to_csv(run.path / "trials.csv", index=False)
    curves = {t["trial_id"]: [{"epoch": 1, "val_acc": t["val_acc"]}] for t in trials}
    drawn = {
        "curves": plots.sweep_curves(curves, "val_acc", run.plots / "trial_curves.png"),
        "pareto": plots.pareto(
            [t["macs"] for t in trials],
            [t["val_acc"] for t in trials],
            [t["pareto"] for t in trials],
            "macs",
            "val_acc",
            run.plots / "pareto.png",
        ),
    }
    (run.path / "summary.md").write_text("# Sweep\n")
    write_manifest(
        run,
        cfg,
        "finished",
        {
            "metrics": {"best": trials[0]},
            "best_trial": "5e732_00000",
            "trials": {"finished": 2, "stopped early": 1},
            "trial_epochs": 9,
            "elapsed_s": 95.0,
            "paths": {
                "trials": "trials.csv",
                "summary": "summary.md",
                **{k: str(v.relative_to(run.path)) for k, v in drawn.items()},
            },
        },
        kind="tune",
    )
    return run


def export_stage(root: Path, cfg: Config, model: torch.nn.Module) -> RunFolder:
    """An export folder with the state dict, TorchScript (its logits really compared) and
    a model card, and the manifest keys ``raycv.export`` writes."""
    run = RunFolder(root / "export")
    run.path.mkdir(parents=True)
    torch.save(model.state_dict(), run.path / "model.pt")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), x)
        diff = float((traced(x) - model(x)).abs().max())
    traced.save(str(run.path / "model.torchscript.pt"))
    (run.path / "model_card.md").write_text("# Model card\n")
    paths = {"state_dict": "model.pt", "torchscript": "model.torchscript.pt"}
    sizes = {k: round((run.path / p).stat().st_size / 1e6, 3) for k, p in paths.items()}
    write_manifest(
        run,
        cfg,
        "finished",
        {
            "paths": {**paths, "model_card": "model_card.md"},
            "metrics": {"torchscript_max_abs_diff": diff, "size_mb": sizes},
        },
        kind="export",
    )
    return run


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, smoke_at) -> dict:
    """tune, finetune, scratch, compress and export ran; pretrain did not."""
    root = tmp_path_factory.mktemp("report") / "pipeline"
    root.mkdir()
    storage = root.parent / "runs"
    cfg = from_dict(smoke_at(storage))
    tune_cfg = from_dict(
        smoke_at(storage, tune={"space": {"optimizer.lr": {"loguniform": [1e-4, 1e-2]}}})
    )
    finetune_cfg = from_dict(smoke_at(storage, finetune={"source": WEIGHTS}))
    compress_cfg = from_dict(smoke_at(storage, compress={"prune": {"ratio": 0.5}, "epochs": 2}))
    torch.manual_seed(0)
    model = create_model("resnet18", len(CLASSES), None, 32).eval()
    pruned = prune_model(copy.deepcopy(model), "resnet18", PruneConfig(ratio=0.5), 32).eval()
    stats = model_stats.measure(model, 32, repeats=3)
    pruned_stats = model_stats.measure(pruned, 32, repeats=3)

    tune_stage(root, tune_cfg)
    training_stage(root, "finetune", finetune_cfg, history(FINETUNE_ACC, stats), 60.0, model)
    training_stage(root, "scratch", cfg, history(SCRATCH_ACC, stats), 58.0)
    compress = training_stage(
        root, "compress", compress_cfg, history(COMPRESS_ACC, pruned_stats), 30.0, pruned
    )
    compression_table(compress, stats, pruned_stats)
    export_stage(root, cfg, pruned)
    stages = {
        name: {"path": name, "status": "finished", "elapsed_s": elapsed}
        for name, elapsed in (
            ("tune", 95.0), ("finetune", 60.0), ("scratch", 58.0),
            ("compress", 30.0), ("export", 4.0),
        )
    }  # fmt: skip
    stages["report"] = {"path": ".", "status": "running"}
    (root / "config.yaml").write_text(dump_config(cfg))
    write_manifest(
        RunFolder(root),
        cfg,
        "running",
        {"stages": stages, "final_model": "compress", "elapsed_s": 400.0},
        kind="pipeline",
    )
    return {"root": root, "stats": stats, "pruned_stats": pruned_stats, "pruned": pruned}


@pytest.fixture(scope="module")
def evaluation(pipeline, ray_local):
    return evaluate_final(pipeline["root"])


@pytest.fixture(scope="module")
def report(pipeline, evaluation) -> dict:
    written = write_report(pipeline["root"], evaluation)
    md = written["markdown"].read_text()
    return {"written": written, "md": md, "html": written["html"].read_text()}


def md_tables(md: str) -> list[list[list[str]]]:
    """Every GFM table in ``md`` as rows of cells (separator row included)."""
    tables, current = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            current.append([c.strip() for c in cells])
        elif current:
            tables.append(current)
            current = []
    return tables


def table_with(md: str, first_header: str) -> dict[str, list[str]]:
    """The table whose first header cell is ``first_header``, keyed by first cell."""
    for table in md_tables(md):
        if table[0][0] == first_header:
            return {row[0]: row for row in table[2:]}
    raise AssertionError(f"no table starting with {first_header!r} in the report")


def section(md: str, title: str) -> str:
    start = md.index(f"## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start : end if end != -1 else None]


def test_evaluation_of_the_final_model(pipeline, evaluation, ray_local):
    ev = evaluation
    assert ev.stage == "compress" and ev.class_names == CLASSES
    assert ev.num_images == 80  # smoke: 400 images, 20 % validation
    correct = int(np.trace(ev.matrix))
    wrong = ev.num_images - correct
    assert len(ev.mistakes) == min(16, wrong) > 0  # an untrained model errs
    scores = [m.score for m in ev.mistakes]
    assert scores == sorted(scores, reverse=True)
    for m in ev.mistakes:
        assert m.true != m.predicted and 1 / len(CLASSES) <= m.score <= 1
        assert m.image.shape == (32, 32, 3) and m.image.dtype == np.uint8
    # the pruned model was really loaded: its confusion matrix matches a second pass
    from raycv.artifacts import load_trained
    from raycv.data.pipeline import build_streams

    trained = load_trained(pipeline["root"] / "compress")
    assert sum(p.numel() for p in trained.model.parameters()) == pipeline["pruned_stats"].params
    val = build_streams(trained.config).val
    matrix = confusion(trained.model, val, len(CLASSES), 32, trained.config.augment)
    np.testing.assert_array_equal(matrix, ev.matrix)


def test_worst_mistakes_ranks_wrong_predictions_by_confidence():
    probs = np.array(
        [[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.45, 0.55]], dtype=np.float32
    )
    preds = Predictions(np.array([0, 0, 0, 1, 1]), probs, {2: np.zeros((2, 2, 3), np.uint8)})
    mistakes = worst_mistakes(preds, ["a", "b"], k=2)
    assert [(m.index, m.true, m.predicted) for m in mistakes] == [(1, "a", "b"), (2, "a", "b")]
    assert mistakes[0].score == pytest.approx(0.8) and mistakes[0].image is None
    assert mistakes[1].image is not None
    np.testing.assert_array_equal(preds.confusion(2), [[1, 2], [1, 1]])


def test_stage_table_states_each_stage(report, pipeline):
    rows = table_with(report["md"], "Stage")
    assert list(rows) == ["pretrain", "tune", "finetune", "scratch", "compress", "export"]
    assert rows["pretrain"][1:7] == ["not run", "–", "–", "–", "–", "–"]
    finetune = rows["finetune"]
    assert finetune[1:4] == ["finished", "1 min 00 s", "90.0 %"]
    assert finetune[4] == "11.2 M" == fmt_count(pipeline["stats"].params)  # ResNet-18, 4 classes
    assert finetune[5] == fmt_count(pipeline["stats"].macs)
    assert finetune[7] == "[finetune/](finetune/)"
    assert rows["scratch"][3] == "62.0 %"
    compress = rows["compress"]
    assert compress[3] == "87.0 %"
    assert compress[4] == fmt_count(pipeline["pruned_stats"].params) != finetune[4]
    assert rows["tune"][2:4] == ["1 min 35 s", "87.5 %"]
    assert "report" not in rows


def test_transfer_vs_scratch_difference(report):
    text = section(report["md"], "Transfer learning vs training from scratch")
    assert "**+28.0 points**" in text  # best 90.0 % against 62.0 %
    assert "both trained for 4 epochs" in text
    assert "At the last epoch: +28.0 points" in text
    runs = table_with(text, "Run")
    assert runs["`finetune`"][1:] == [f"`{WEIGHTS}`", "4", "90.0 % (epoch 4)", "90.0 %"]
    assert runs["`scratch`"][1:] == ["random initialisation", "4", "62.0 % (epoch 4)", "62.0 %"]
    assert "`pretrain` stage ran (status: not run)" in text
    assert "report/transfer_vs_scratch.png" in text


def test_sweep_section(report):
    text = section(report["md"], "Sweep")
    assert "3 trials (optuna search, asha scheduler): 2 finished, 1 stopped early" in text
    assert "9 trial-epochs" in text
    assert "Best trial `5e732_00000`: val_acc 87.5 % at epoch 4" in text
    assert table_with(text, "Key")["`optimizer.lr`"][1] == "0.003"
    ranked = table_with(text, "Trial")
    assert list(ranked) == ["`5e732_00000`", "`t_2`", "`t_1`"]
    assert "report/tune_curves.png" in text and "report/tune_pareto.png" in text
    assert "tune_prune_ratio" not in text  # the ratio was not searched


def test_final_model_per_class_accuracy_matches_the_confusion_matrix(report, evaluation):
    text = section(report["md"], "Final model")
    assert f"{100 * evaluation.accuracy:.1f} % of 80 images" in text
    rows = table_with(text, "Class")
    assert list(rows) == CLASSES
    images = [int(rows[c][1]) for c in CLASSES]
    correct = [int(rows[c][2]) for c in CLASSES]
    assert images == evaluation.matrix.sum(axis=1).tolist()
    assert sum(correct) == np.trace(evaluation.matrix)
    for c, n, k in zip(CLASSES, images, correct):
        shown = rows[c][3]
        assert shown == ("–" if n == 0 else f"{100 * k / n:.1f} %")
    weighted = sum(evaluation.per_class_acc[c] * n for c, n in zip(CLASSES, images))
    assert weighted / sum(images) == pytest.approx(evaluation.accuracy)
    mistakes = table_with(text, "Rank")
    assert list(mistakes) == [str(r) for r in range(1, len(evaluation.mistakes) + 1)]
    for m, row in zip(evaluation.mistakes, mistakes.values()):
        assert row[1:] == [m.true, m.predicted, f"{m.score:.3f}"]
    assert "report/confusion.png" in text and "report/mistakes.png" in text


def test_compression_table(report, pipeline):
    text = section(report["md"], "Compression")
    assert "it was pruned (`channel`, ratio 0.5, `l1` importance) and fine-tuned 2 epochs" in text
    rows = table_with(text, "variant")
    before, after = pipeline["stats"], pipeline["pruned_stats"]
    original, pruned = rows["original"], rows["channel 50% (one-shot), fine-tuned 2 epochs"]
    assert original[1:3] == [fmt_count(before.params), fmt_count(before.macs)]
    assert pruned[1:3] == [fmt_count(after.params), fmt_count(after.macs)]
    assert pruned[4:8] == ["2.00 ms", "16.00 ms", "2.00×", "2.00×"]  # latency b1, b32, speed-ups
    assert pruned[8:] == ["87.0 %", "-3.0 pts"]
    assert "1 thread(s), eager runtime" in text
    assert "report/compression.png" in text


def test_export_section(report, pipeline):
    text = section(report["md"], "Export")
    files = table_with(text, "File")
    root = pipeline["root"]
    assert set(files) == {
        f"[{name}](export/{name})"
        for name in ("manifest.json", "model.pt", "model.torchscript.pt", "model_card.md")
    }
    size = (root / "export" / "model.pt").stat().st_size
    assert files["[model.pt](export/model.pt)"][1:] == [fmt_size(size), "the reference"]
    diff = json.loads((root / "export" / "manifest.json").read_text())["metrics"]
    shown = files["[model.torchscript.pt](export/model.torchscript.pt)"][2]
    assert float(shown) == pytest.approx(diff["torchscript_max_abs_diff"], rel=0.01, abs=1e-12)
    assert "[export/model_card.md](export/model_card.md)" in text


def test_markdown_tables_are_valid_gfm(report):
    md = report["md"]
    tables = md_tables(md)
    assert len(tables) >= 8
    for table in tables:
        width = len(table[0])
        assert all(len(row) == width for row in table), table
        assert all(re.fullmatch(r"-{3}:?", cell) for cell in table[1]), table[1]
    # tables are blocks of their own: a blank line before each
    for match in re.finditer(r"\n\| ", md):
        line_start = md.rfind("\n", 0, match.start())
        previous = md[line_start + 1 : match.start()]
        assert previous == "" or previous.startswith("|")


def test_names_cannot_break_a_table_in_either_rendering(tmp_path):
    """Pipes, stars, brackets, tags and backticks in user text stay text in the markdown
    table and in the HTML page made from it."""
    names = ["a|b", "*x* [y](z)", "_u_ <i> `t`", "val_acc"]
    text = md.table(["Name", "Code"], [[md.text(n), md.code(n)] for n in names])
    assert [len(row) for row in md_tables(text)[0]] == [2] * (2 + len(names))
    cells = re.findall(r"<td>(.*?)</td>", to_html(text, tmp_path, "names"))
    assert [html.unescape(c) for c in cells[::2]] == names
    assert all(c.startswith("<code>") and c.endswith("</code>") for c in cells[1::2])
    assert [html.unescape(c[len("<code>") : -len("</code>")]) for c in cells[1::2]] == names


def test_sections_in_order_and_images_copied(report, pipeline):
    md = report["md"]
    titles = re.findall(r"^## (.+)$", md, flags=re.M)
    assert titles == [
        "Stages",
        "Transfer learning vs training from scratch",
        "Learning curves",
        "Sweep",
        "Final model",
        "Compression",
        "Export",
    ]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images == [
        f"report/{name}.png"
        for name in (
            "transfer_vs_scratch",
            "curves_finetune",
            "curves_scratch",
            "curves_compress",
            "tune_curves",
            "tune_pareto",
            "confusion",
            "mistakes",
            "compression",
        )
    ]
    for rel in images:
        assert (pipeline["root"] / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(report["written"]) == sorted(
        ["markdown", "html", *(Path(rel).stem for rel in images)]
    )


def test_html_is_one_offline_file(report):
    page = report["html"]
    md_images = len(re.findall(r"!\[", report["md"]))
    assert page.count('src="data:image/png;base64,') == md_images
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    assert "<style>" in page and "<h2>Compression</h2>" in page
    # each figure keeps its caption under the image
    assert page.count("<figcaption>") == md_images
    assert "<figcaption>confusion matrix: rows are true classes</figcaption>" in page
    # text is escaped, numbers arrive as in the markdown
    assert "<td>not run</td>" in page
    assert "<strong>+28.0 points</strong>" in page
    assert page.count("<table>") == len(md_tables(report["md"]))


def test_rewriting_drops_images_of_an_earlier_report(pipeline, report):
    written = write_report(pipeline["root"])  # no evaluation this time
    assert not (pipeline["root"] / "report" / "mistakes.png").exists()
    md = written["markdown"].read_text()
    assert "Not evaluated here" in section(md, "Final model")
    assert written["html"].read_text().count("data:image/png;base64,") == md.count("![")


def test_interrupted_pipeline_renders(tmp_path, smoke):
    """Only the fine-tune stage started, and it finished two epochs: every other section
    says what did not happen."""
    cfg = from_dict(smoke())
    run = RunFolder(tmp_path / "finetune")
    run.path.mkdir()
    rows = [{"epoch": 1, "val_acc": 0.5, "train_loss": 1.2}, {"epoch": 2, "val_acc": 0.7}]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_manifest(run, cfg, "running", kind="finetune")
    write_json(
        tmp_path / "manifest.json",
        {
            "kind": "pipeline",
            "status": "running",
            "experiment": "smoke",
            "model": "resnet18",
            "stages": {"finetune": {"path": "finetune", "status": "running"}},
            "final_model": None,
        },
    )
    written = write_report(tmp_path)
    md = written["markdown"].read_text()
    rows_by_stage = table_with(md, "Stage")
    assert rows_by_stage["finetune"][1] == "running"
    for name in ("pretrain", "tune", "scratch", "compress", "export"):
        assert rows_by_stage[name][1] == "not run"
    assert "No baseline trained from scratch (`scratch` stage: not run)" in md
    assert "No sweep (`tune` stage: not run)" in md
    assert "No compression table (`compress`: not run)" in md
    assert "Nothing exported (`export` stage: not run)" in md
    assert "has not trained its final model yet" in md
    # the curves are drawn from metrics.jsonl when the stage never got to draw them
    assert (tmp_path / "report" / "curves_finetune.png").is_file()
    assert written["html"].read_text().count("data:image/png;base64,") == md.count("![") == 2


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        write_report(tmp_path)
