"""On a CUDA device the trainer runs the fused Triton kernels: attention and attention_match
through backend "auto", the Refiner ViT through refined_attention's Triton op; only where a fused
kernel is missing does it fall back to the reference path, with one note saying what is missing.

No GPU here: torch.cuda.is_available is mocked, so this checks the selection logic
(fastattnreg.backend.resolve, train.methods.refiner_backend, train.trainer.reference_notes), not
a run on the device.
"""
from types import SimpleNamespace

import pytest
import torch

from fastattnreg import backend as _backend
from fastattnreg.train.methods import refiner_backend
from fastattnreg.train.trainer import reference_notes

CUDA = torch.device("cuda")


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backend, "_triton_interpret", False)
    monkeypatch.delenv("FASTATTNREG_BACKEND", raising=False)


def _built(refiner: bool):
    return SimpleNamespace(kind="vit", spec=SimpleNamespace(refiner=refiner))


@pytest.mark.skipif(not _backend.triton_installed(), reason="needs Triton installed")
def test_auto_picks_triton_for_attention_match_and_the_refiner_on_cuda(fake_cuda):
    assert _backend.resolve("auto", CUDA) == "triton"  # attention and attention_match
    assert hasattr(torch.ops.fastattnreg, "triton_refined_attention_fwd")
    assert hasattr(torch.ops.fastattnreg, "triton_attention_match_fwd")
    assert refiner_backend("auto", "cuda") == ("auto", "")
    config = SimpleNamespace(backend="auto")
    assert reference_notes(_built(True), config, CUDA) == []
    assert reference_notes(_built(False), config, CUDA) == []


def test_without_triton_on_cuda_one_note_says_what_is_missing(fake_cuda, monkeypatch):
    monkeypatch.setattr(_backend, "_triton_installed", False)
    assert _backend.resolve("auto", CUDA) == "reference"
    assert refiner_backend("auto", "cuda") == (
        "reference", "refiner on the reference path (Triton not installed)")
    config = SimpleNamespace(backend="auto")
    assert reference_notes(_built(True), config, CUDA) == [
        "refiner on the reference path (Triton not installed)"]
    assert reference_notes(_built(False), config, CUDA) == [
        "attention on the reference path (fused kernels not available here)"]


def test_the_reference_backend_asked_for_gives_no_note(fake_cuda):
    assert refiner_backend("reference", "cuda") == ("reference", "")
    assert reference_notes(_built(False), SimpleNamespace(backend="reference"), CUDA) == []
