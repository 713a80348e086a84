"""``raycv compress``: Taylor importance, the distillation loss in the loop, compiled
latency, and one whole run on a real local Ray (a distilled student, two rounds of channel
pruning with fine-tuning, int8) whose every variant is saved, reloaded and measured."""

from __future__ import annotations

import copy
import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from raycv import model_stats
from raycv.artifacts import checkpoint_file, load_trained, read_manifest
from raycv.cli import main
from raycv.config import ConfigError, PruneConfig, from_dict
from raycv.data.augment import normalize
from raycv.distill import Teacher
from raycv.loop import _forward
from raycv.models import create_model
from raycv.pruning import prune_model
from raycv.quantization import load_quantized
from raycv.tasks import build_task, total
from raycv.tasks.base import soft_target_loss

# --------------------------------------------------------------------------- no Ray


def _labelled_batches(n: int = 2, size: int = 32) -> list:
    """Taylor's input: each batch's summed cross-entropy as a function of the model."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, size, size, generator=g), torch.arange(8) % 4) for _ in range(n)]
    return [
        lambda model, x=x, y=y: torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
        for x, y in batches
    ]


def _kept_channels(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_taylor_importance_ranks_with_gradients_not_norms():
    torch.manual_seed(0)
    model = create_model("resnet18", 4, None, 32)
    kept = {}
    for importance in ("l1", "taylor"):
        pruned = copy.deepcopy(model)
        cfg = PruneConfig(ratio=0.5, importance=importance)
        batches = _labelled_batches() if importance == "taylor" else ()
        prune_model(pruned, "resnet18", cfg, 32, batches)
        kept[importance] = pruned.conv1.weight.detach()
        assert all(p.grad is None for p in pruned.parameters())  # gradients cleared after
    assert kept["l1"].shape == kept["taylor"].shape  # same widths, other channels
    assert not torch.equal(kept["l1"], kept["taylor"])
    with pytest.raises(ValueError, match="needs labelled training batches"):
        prune_model(
            copy.deepcopy(model), "resnet18", PruneConfig(ratio=0.5, importance="taylor"), 32
        )


def test_taylor_in_a_training_run_is_refused_with_the_fix(smoke, tmp_path):
    with pytest.raises(ConfigError, match="raycv compress --prune channel:RATIO"):
        from_dict(smoke(prune={"ratio": 0.3, "importance": "taylor"}))


def test_soft_target_loss_is_the_scaled_kl_divergence():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, -2.0], [3.0, 0.0, 0.0]])
    t = 3.0
    p_t = torch.softmax(teacher / t, dim=1)
    expected = (p_t * (p_t.log() - torch.log_softmax(student / t, dim=1))).sum(1).mean() * t * t
    assert soft_target_loss(student, teacher, t).item() == pytest.approx(expected.item())
    assert soft_target_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_the_loop_trains_on_the_blended_loss(smoke):
    """The loop's own forward: with a teacher the loss and the student's gradients change,
    by exactly the weighted soft-target term; the teacher gets no gradient."""
    cfg = from_dict(smoke())
    torch.manual_seed(0)
    student, teacher_model = create_model("resnet18", 4, None, 32), create_model("resnet18", 4)
    teacher = Teacher(teacher_model, temperature=4.0, weight=0.7)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)  # as a stream has them
    batch = {"image": images, "label": torch.tensor([0, 1, 2, 3, 0, 1])}
    task = build_task(cfg, ["a", "b", "c", "d"])
    outputs, parts = _forward(student, task, batch, cfg, torch.device("cpu"))
    plain = total(parts)
    blended = total(_forward(student, task, batch, cfg, torch.device("cpu"), teacher)[1])
    with torch.no_grad():
        soft = soft_target_loss(outputs, teacher_model(normalize(images, cfg.augment)), 4.0)
    assert blended.item() == pytest.approx(0.3 * plain.item() + 0.7 * soft.item(), rel=1e-5)
    blended.backward()
    assert student.fc.weight.grad is not None
    assert all(p.grad is None for p in teacher_model.parameters())


def test_inductor_latency_runs_compiled_and_restores_the_model():
    model = create_model("resnet18", 4, None, 32).train()
    ms = model_stats.latency_ms(model, 32, batch=2, repeats=2, warmup=1, runtime="inductor")
    assert ms > 0 and model.training
    with pytest.raises(KeyError, match="unknown runtime 'jit'; choose one of: eager, inductor"):
        model_stats.latency_ms(model, 32, runtime="jit")


def test_interleaved_latency_times_each_model_in_turn_with_its_quartiles():
    """A model four times as wide takes longer, each timing has its quartiles around its
    median, and the models come back in their modes with the thread count restored."""
    torch.manual_seed(0)
    narrow = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).train()
    wide = nn.Sequential(nn.Conv2d(3, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3)).eval()
    threads = torch.get_num_threads()
    small, large = model_stats.interleaved_latency_ms([narrow, wide], 48, batch=2, repeats=9)
    for t in (small, large):
        assert 0 < t.q1 <= t.median <= t.q3
    assert large.median > small.median and small.faster_than(large)
    assert not small.faster_than(small)
    assert narrow.training and not wide.training and torch.get_num_threads() == threads


# ------------------------------------------------------------------ a whole compress run


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, smoke_at, briefly_trained, save_checkpoint):
    root = tmp_path_factory.mktemp("compress")
    cfg = from_dict(smoke_at(root / "runs"))
    model = briefly_trained(cfg, lambda p: torch.optim.AdamW(p, lr=2e-3), steps=8)
    return save_checkpoint(root / "teacher", cfg, model, {"epoch": 1}), root


@pytest.fixture(scope="module")
def compressed(artifact, ray_local):
    ckpt, root = artifact
    argv = [
        "compress", str(ckpt), "--student", "mobilenet_v3_small", "--prune", "channel:0.5",
        "--quantize", "int8", "--distill-from", str(ckpt), "--local",
        "compress.steps=2", "compress.epochs=1", "compress.calibration_images=64",
        "compress.qat_epochs=1", "compress.max_drop=100",  # the guard: tests/test_guard.py
        "compress.latency.runtime=eager", "compress.latency.repeats=2",
        "compress.latency.batch_sizes=[1, 4]", f"run.storage={root / 'runs'}",
        "data.shapes.num_images=200",  # fewer than the artifact's 400: CI time
    ]  # fmt: skip
    assert main(argv) == 0
    (run,) = (root / "runs" / "smoke").glob("compress-*")
    return run


@pytest.mark.slow
def test_every_step_left_a_row_in_order(compressed):
    rows = json.loads((compressed / "compression.json").read_text())
    assert [r["method"] for r in rows] == [
        "original", "student", "prune", "prune", "prune", "prune", "quantize", "quantize",
    ]  # fmt: skip
    assert rows[1]["variant"] == "student mobilenet_v3_small, distilled 1 epoch"
    assert rows[3]["variant"] == "channel 50% (1/2), fine-tuned 2 epochs"
    assert rows[7]["variant"] == "int8 quantization-aware, 1 epoch"
    assert [r["epochs"] for r in rows] == [0, 1, 1, 2, 2, 3, 3, 4]
    for r in rows:
        assert set(r["latency_ms"]) == {"1", "4"} and all(v > 0 for v in r["latency_ms"].values())
        for b, (q1, q3) in r["latency_spread_ms"].items():  # timed in turns: a spread each
            assert 0 < q1 <= r["latency_ms"][b] <= q3
        assert (
            r["metric"] == "val_acc"
            and 0 <= r["score"] <= 1
            and r["threads"] == 1
            and r["runtime"] == "eager"
        )
    csv = (compressed / "compression.csv").read_text().splitlines()
    assert len(csv) == 1 + len(rows) and "latency_ms_b4" in csv[0]
    assert (compressed / "plots" / "compression.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_channels_shrink_and_macs_fall_each_round(compressed):
    rows = json.loads((compressed / "compression.json").read_text())
    student, first, second = rows[1], rows[3], rows[5]
    assert rows[0]["params"] > 5 * student["params"]  # mobilenet_v3_small against resnet18
    # Each round keeps sqrt(0.5) of the channels left (half after two); a conv's MACs go
    # with its input times its output channels: about 0.5x after one round, 0.25x after two.
    assert 0.35 * student["macs"] < first["macs"] < 0.7 * student["macs"]
    assert 0.12 * student["macs"] < second["macs"] < 0.45 * student["macs"]
    assert rows[4]["params"] == second["params"] < first["params"]
    pruned = load_trained(compressed / "variants" / "pruned-2")
    widths = _kept_channels(pruned.model)
    assert sum(widths) < 0.8 * sum(_kept_channels(create_model("mobilenet_v3_small", 4)))


@pytest.mark.slow
def test_fine_tuning_was_distilled_from_the_teacher(compressed, artifact):
    ckpt, _ = artifact
    for step in ("student", "prune-1", "prune-2"):
        saved = read_manifest(compressed / "steps" / step)
        assert saved["status"] == "finished"
        config = (compressed / "steps" / step / "config.yaml").read_text()
        assert f"teacher: {ckpt.resolve()}" in config


@pytest.mark.slow
def test_final_model_reloads_with_the_measured_accuracy(compressed, ray_local):
    """The folder means its final fp32 model; reloaded, it scores what its row says."""
    from raycv.compress.measure import Measurer
    from raycv.config import LatencyConfig
    from raycv.data.pipeline import build_streams

    manifest = read_manifest(compressed)
    assert manifest["kind"] == "compress"
    assert checkpoint_file(compressed) == compressed / "steps/prune-2/best/checkpoint.pt"
    final = load_trained(compressed)
    assert final.config.model.name == "mobilenet_v3_small"
    rows = manifest["compression"]
    assert manifest["metrics"]["best"]["val_acc"] == rows[5]["score"]
    streams = build_streams(final.config)
    task = build_task(final.config, final.class_names)
    augment = final.config.augment
    measurer = Measurer(streams.val, task, 32, LatencyConfig(), 32, compressed, augment)
    assert measurer.score(final.model) == pytest.approx(rows[5]["score"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(final.model(x), load_trained(compressed).model(x))


@pytest.mark.slow
def test_int8_archives_hold_int8_ops_and_reload_identically(compressed):
    manifest = read_manifest(compressed)
    assert manifest["paths"]["quantized"] == "variants/int8-qat.pt2"
    for name in ("int8.pt2", "int8-qat.pt2"):
        _check_int8_archive(compressed / "variants" / name, manifest)


def _check_int8_archive(path, manifest):
    first, second = load_quantized(path), load_quantized(path)
    targets = {str(n.target) for n in first.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets)
    assert any("dequantize_per_channel" in t for t in targets)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(first(x), second(x))
    rows = {r["file"]: r for r in manifest["compression"]}
    assert rows[f"variants/{path.name}"]["file_bytes"] == path.stat().st_size
    fp32_bytes = manifest["compression"][5]["file_bytes"]
    # The weights are int8; the rest of the archive is the graph (large for a tiny model).
    with zipfile.ZipFile(path) as archive:
        weights = sum(i.file_size for i in archive.infolist() if "/data/weights/" in i.filename)
    assert weights < 0.4 * fp32_bytes
    assert np.isclose(manifest["quantized"]["val_acc"], manifest["compression"][-1]["score"])


def test_nothing_to_do_and_bad_prune_spec_fail_in_one_line(artifact, capsys):
    ckpt, root = artifact
    assert main(["compress", str(ckpt), f"run.storage={root / 'none'}"]) == 2
    assert "nothing to compress: give --prune METHOD:RATIO" in capsys.readouterr().err
    assert main(["compress", str(ckpt), "--prune", "channel"]) == 2
    assert "--prune takes METHOD:RATIO, e.g. channel:0.5" in capsys.readouterr().err
    assert main(["compress", str(ckpt), "--prune", "chanel:0.5"]) == 2
    assert "compress.prune.method='chanel' is unknown" in capsys.readouterr().err
    assert main(["compress", str(ckpt), "--quantize", "int4"]) == 2
    assert "compress.quantize='int4' is unknown; choose one of: int8" in capsys.readouterr().err
    assert main(["compress", str(ckpt), "--quantize", "int8", "--distill-from", "nope/"]) == 2
    assert "distill.teacher='nope/'" in capsys.readouterr().err
    assert not (root / "none").exists()


def test_student_must_be_a_registered_model(artifact, capsys):
    ckpt, _ = artifact
    assert main(["compress", str(ckpt), "--student", "resnet9"]) == 2
    assert "compress.student='resnet9' is unknown" in capsys.readouterr().err


def test_kd_loss_gradients_match_autograd_of_the_formula():
    torch.manual_seed(0)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5)
    soft_target_loss(s, t, 2.0).backward()
    expected = (torch.softmax(s.detach() / 2, 1) - torch.softmax(t / 2, 1)) * 2 / 4
    assert torch.allclose(s.grad, expected, atol=1e-6)
