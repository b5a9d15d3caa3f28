"""The command line: bad command lines fail cleanly (status 2, one line, nothing written);
`compare` writes its table, files and plots, and --resume reads finished runs back."""
import json
import os

import pytest

pytest.importorskip("sklearn")
from fastattnreg.train.cli import main  # noqa: E402
from conftest import requires_cpp  # noqa: E402
from train_helpers import TINY_ARGS, cli, fails_cleanly, out_args  # noqa: E402


@pytest.mark.parametrize("argv, needle", [
    (["train", "--method", "magic"], "unknown method 'magic'"),
    (["train", "--method", "structured+mimetic"], "choose one init"),
    (["train", "--method", "gta+link"], "choose one"),
    (["compare", "--methods", "baseline,nope"], "unknown method 'nope'"),
    (["train", "--data", "folder:/no/such/folder"], "does not exist"),
    (["train", "--data", "cifar10:/no/such/folder"], "does not exist"),
    (["train", "--data", "imagenet"], "--data must be"),
    (["train", "--train-fraction", "0"], "--train-fraction must be in (0, 1]"),
    (["train", "--train-fraction", "1.5"], "--train-fraction must be in (0, 1]"),
    (["train", "--train-fraction", "-0.2"], "--train-fraction must be in (0, 1]"),
    (["train", "--epochs", "0"], "--epochs must be > 0"),
    (["train", "--augment", "rotate"], "invalid choice"),
    (["train", "--model-opt", "depth=-1"], "depth"),
    (["compare", "--seeds", "0,x"], "--seeds"),
    (["compare", "--method-opt", "baseline"], "--method-opt must be METHOD:SETTING=VALUE"),
    (["compare", "--methods", "baseline", "--method-opt", "refiner:lr=1e-3"],
     "'refiner' is not compared"),
    (["compare", "--method-opt", "magic:lr=1e-3"], "unknown method 'magic'"),
    (["compare", "--method-opt", "baseline:epochs=3"], "'epochs' cannot be set per method"),
    (["compare", "--method-opt", "baseline:batch-size=x"], "'x' is not an integer"),
    (["compare", "--method-opt", "baseline:lr=-1"], "--method-opt baseline:lr must be > 0"),
    (["compare", "--method-opt", "baseline:warmup-epochs=50"], "warmup-epochs must be in [0, "),
    (["compare", "--method-opt", "baseline:lr=1e-3", "--method-opt", "baseline:lr=2e-3"],
     "sets lr of baseline twice"),
    (["train", "--method", "link", "--link-cnn", "torchvision:resnet18:/no/file.pth"],
     "no weights file"),
    # digits32's ViT has no class token: GTA's default class-token rows do not exist there
    (["train", "--method", "gta", "--data", "digits32", "--classes", "5-9"],
     "rows='cls' needs a class token but the student has num_prefix_tokens=0; use rows='all'"),
])
def test_bad_command_lines(capsys, tmp_path, argv, needle):
    fails_cleanly(capsys, tmp_path, argv + out_args(tmp_path), needle)


def test_unreadable_gta_source_checkpoint(capsys, tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    fails_cleanly(capsys, tmp_path, ["train", "--method", "gta", "--gta-source", str(bad)]
                  + out_args(tmp_path), "--gta-source: cannot read checkpoint")
    fails_cleanly(capsys, tmp_path, ["train", "--method", "gta", "--gta-source",
                                     str(tmp_path / "missing.pt")] + out_args(tmp_path),
                  "no checkpoint file")


def test_unreadable_resume_checkpoint(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x80\x02truncated")
    fails_cleanly(capsys, out, ["train", "--resume", "--out", str(out),
                                "--cache-dir", str(tmp_path / "cache")],
                  "--resume: cannot read checkpoint")
    assert not (tmp_path / "cache").exists()
    fails_cleanly(capsys, tmp_path, ["train", "--resume", "--out", str(tmp_path / "none")],
                  "does not exist")


@pytest.mark.slow
def test_the_real_command_exits_nonzero_with_one_line(tmp_path):
    rc, out, err = cli("train", "--method", "nope", "--out", str(tmp_path / "o"))
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        "fastattnreg: error: unknown method 'nope' in 'nope'; methods: baseline, structured, "
        "mimetic, refiner, gta, finetune, link, link_advanced, cnn (combine with '+', e.g. "
        "structured+gta)"]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@requires_cpp
def test_compare_writes_table_files_and_plots(capsys, tmp_path):
    argv = ["compare", "--methods", "baseline,link", "--seeds", "0,1", "--epochs", "2",
            "--cnn-epochs", "1", *TINY_ARGS, "--method-opt", "link:batch-size=16",
            *out_args(tmp_path)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "baseline" in table and "link" in table and "±" in table
    out = tmp_path / "out"
    for f in ("metrics.json", "results.csv", "summary.csv", "table.txt", "accuracy.png",
              "attention.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    saved = (out / "table.txt").read_text()
    assert saved.startswith("Test accuracy on") and saved.rstrip("\n") in table  # as printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in metrics["summary"]] == ["baseline", "link"]
    assert len(metrics["runs"]) == 4 and len((out / "results.csv").read_text().splitlines()) == 5
    # --method-opt: link's runs alone train with batch 16; the table and metrics.json say so
    for seed in (0, 1):
        for method, batch in (("baseline", 32), ("link", 16)):
            run = json.loads((out / "runs" / f"{method}-s{seed}" / "metrics.json").read_text())
            assert run["config"]["batch_size"] == batch
    assert "batch_size per method: baseline 32, link 16" in table
    assert metrics["config_per_method"]["batch_size"] == {"baseline": 32, "link": 16}
    assert "batch_size" not in metrics["config"] and metrics["config"]["epochs"] == 2
    base, link = metrics["summary"]
    assert base["reference"] == "" and base["delta"] is None
    assert base["test_acc_mean"] == pytest.approx(sum(base["test_accs"]) / 2)
    paired = [a - b for a, b in zip(link["test_accs"], base["test_accs"])]
    assert link["reference"] == "baseline" and link["delta"] == pytest.approx(sum(paired) / 2)
    assert link["delta_ci95_low"] <= link["delta"] <= link["delta_ci95_high"]
    assert link["verdict"] in ("better", "worse", "indistinguishable")
    header = (out / "summary.csv").read_text().splitlines()[0]
    assert header == ("benchmark,method,reference,seeds,test_acc_mean,test_acc_std,ci95_low,"
                      "ci95_high,delta,delta_ci95_low,delta_ci95_high,verdict,epoch_time_s,"
                      "fused_backend,epoch_time_fused_s,epoch_time_reference_s")
    for row in metrics["summary"]:  # each method timed on both paths after its runs
        assert row["fused_backend"] == "cpp"
        assert row["epoch_time_fused_s"] > 0 and row["epoch_time_reference_s"] > 0
    # a finished comparison is read back, not retrained
    assert main(argv + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "finished earlier, read back" in captured.err
    # the same accuracies; the two epoch times are measured again
    assert table.splitlines()[2].rsplit(maxsplit=2)[0] in captured.out
    # and an existing run is not overwritten by accident
    fails_cleanly(capsys, out, argv, "already holds a run")
