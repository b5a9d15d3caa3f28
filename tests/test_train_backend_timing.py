"""compare's fused-vs-reference epoch times: each method's training epochs timed in turn on the
fused backend and on the reference path (the paths really switch), and the summary columns."""
import pytest
import torch

pytest.importorskip("sklearn")
from fastattnreg.train import backend_timing  # noqa: E402
from fastattnreg.train.compare import SUMMARY_COLUMNS, format_table, summarise, summary_csv  # noqa: E402,E501
from fastattnreg.train.config import TrainConfig  # noqa: E402
from fastattnreg.train.dist import DistContext  # noqa: E402
from conftest import requires_cpp  # noqa: E402
from train_helpers import TINY, quiet  # noqa: E402


@pytest.mark.slow
@requires_cpp
@pytest.mark.parametrize("method", ["baseline", "refiner"])
def test_epochs_alternate_between_the_fused_and_the_reference_path(tmp_path, monkeypatch,
                                                                   method):
    fused_op = "refined_attention_fwd" if method == "refiner" else "attention_fwd"
    calls = []
    op = getattr(torch.ops.fastattnreg, fused_op)
    monkeypatch.setattr(torch.ops.fastattnreg, fused_op,
                        lambda *a: (calls.append(1), op(*a))[1], raising=False)
    per_epoch = []
    train_epoch = backend_timing.train_epoch

    def counted(*args, **kwargs):
        before = len(calls)
        row = train_epoch(*args, **kwargs)
        per_epoch.append(len(calls) - before)
        return row

    monkeypatch.setattr(backend_timing, "train_epoch", counted)
    cfg = TrainConfig(**{**TINY, "method": method})
    out = backend_timing.time_backends(cfg, cache_dir=str(tmp_path), ctx=DistContext(),
                                       log=quiet, rounds=2)
    assert out["fused_backend"] == "cpp"
    assert out["fused_s"] > 0 and out["reference_s"] > 0
    assert len(per_epoch) == 6  # (1 warm-up + 2 timed) epochs per path, alternating
    assert all(n > 0 for n in per_epoch[0::2]) and per_epoch[1::2] == [0, 0, 0]


def test_a_cnn_has_no_attention_to_time(tmp_path):
    cfg = TrainConfig(**{**TINY, "method": "cnn"})
    out = backend_timing.time_backends(cfg, cache_dir=str(tmp_path), ctx=DistContext(),
                                       log=quiet, rounds=1)
    assert out == {"fused_backend": "", "fused_s": None, "reference_s": None}
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        backend_timing.time_backends(cfg, cache_dir=str(tmp_path), ctx=DistContext(),
                                     log=quiet, rounds=0)


def _result(acc, data=None):
    return {"final": {"test_acc": acc, "epoch_time_s": 0.5}, "data": data or {}}


def test_summary_carries_both_epoch_times_after_the_accuracy_columns():
    results = {("baseline", s): _result(a) for s, a in ((0, 0.5), (1, 0.6))}
    results.update({("refiner", s): _result(a) for s, a in ((0, 0.7), (1, 0.75))})
    timings = {"baseline": {"fused_backend": "cpp", "fused_s": 0.25, "reference_s": 0.5},
               "refiner": {"fused_backend": "cpp", "fused_s": 0.4, "reference_s": 2.0}}
    rows = summarise(results, ["baseline", "refiner"], [0, 1], "digits", timings)
    assert SUMMARY_COLUMNS[:13][-1] == "epoch_time_s"
    assert SUMMARY_COLUMNS[13:] == ("fused_backend", "epoch_time_fused_s",
                                    "epoch_time_reference_s")
    csv = summary_csv(rows).splitlines()
    assert csv[2].endswith(",cpp,0.400000,2.000000")
    untimed = summary_csv(summarise(results, ["baseline", "refiner"], [0, 1], "digits"))
    assert untimed.splitlines()[1].endswith(",0.500000,,,")
    table = format_table(rows, [0, 1], TrainConfig(), 1.0)
    assert "fused s" in table and "   2.000" in table.splitlines()[3]
    assert table.startswith("Test accuracy")
    held = {k: _result(v["final"]["test_acc"], {"eval_split": "validation"})
            for k, v in results.items()}
    text = format_table(summarise(held, ["baseline", "refiner"], [0, 1], "digits"), [0, 1],
                        TrainConfig(val_fraction=0.2), 1.0)
    assert text.startswith("Validation accuracy on digits (train fraction 1, 0.2 of it held out")
