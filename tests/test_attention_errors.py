"""Bad input to attention() gets a ValueError/RuntimeError naming the argument, value and limit."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastattnreg import attention
from conftest import requires_cpp
from inputs import qkv

SMALL = (1, 2, 17, 16)  # (B, H, N, D) of the inputs every error case starts from


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 17, 16), torch.randn(2, 17, 16), torch.randn(2, 17, 16)),
         r"q must be 4-D \(B, H, N, D\); got 3-D"),
        (lambda: (torch.randn(1, 2, 17, 16), torch.randn(1, 2, 18, 16), torch.randn(1, 2, 17, 16)),
         r"k must have the shape of q \(1, 2, 17, 16\); got \(1, 2, 18, 16\)"),
        (lambda: (torch.randn(1, 2, 17, 16), torch.randn(1, 2, 17, 16), torch.randn(1, 2, 17, 8)),
         r"v must have the shape of q"),
        (lambda: (torch.randn(1, 2, 17, 16), torch.randn(1, 2, 17, 16).double(), torch.randn(1, 2, 17, 16)),
         r"share one dtype; got torch.float32 and torch.float64"),
        (lambda: (torch.randn(0, 2, 17, 16),) * 3, r"batch B must be at least 1; got shape \(0, 2, 17, 16\)"),
        (lambda: (torch.randn(1, 2, 0, 16),) * 3, r"tokens N must be at least 1"),
        (lambda: (torch.randint(0, 3, (1, 2, 17, 16)),) * 3, r"q dtype must be one of .* got torch.int64"),
    ],
)
def test_bad_tensors(backend, make, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, backend=backend)


def test_mixed_devices():
    q, k, v = qkv(SMALL, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=r"must be on one device; got cpu and meta"):
        attention(q, k.to("meta"), v)


@requires_cpp
def test_cpp_limits():
    q, k, v = qkv(SMALL, torch.float16, requires_grad=False)
    with pytest.raises(ValueError, match=r"q dtype must be one of .*for backend 'cpp'; got torch.float16"):
        attention(q, k, v, backend="cpp")
    q, k, v = qkv((1, 1, 5, 300), torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=r"head dim D must be in \[1, 256\] for backend 'cpp'; got 300"):
        attention(q, k, v, backend="cpp")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"export": "mean"}, ValueError, r"export must be one of .*got 'mean'"),
        ({"backend": "cuda"}, ValueError, r"backend must be one of .*got 'cuda'"),
        ({"backend": "triton"}, RuntimeError, r"backend='triton' is not available"),
        ({"scale": float("nan")}, ValueError, r"scale must be None or a finite number; got nan"),
        ({"scale": "0.1"}, ValueError, r"scale must be None or a finite number; got '0.1'"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        attention(*qkv(SMALL, torch.float32, requires_grad=False), **kwargs)


def test_bad_env_override(monkeypatch):
    monkeypatch.setenv("FASTATTNREG_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"FASTATTNREG_BACKEND must be one of .*got 'gpu'"):
        attention(*qkv(SMALL, torch.float32, requires_grad=False))


@requires_cpp
def test_cpu_backend_rejects_other_devices():
    q, k, v = [t.to("meta") for t in qkv(SMALL, torch.float32, requires_grad=False)]
    with pytest.raises(RuntimeError, match=r"backend='cpp' runs on CPU tensors only; got tensors on meta"):
        attention(q, k, v, backend="cpp")


@requires_cpp
@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(2, 17, 16),) * 3 + (None, None, 0.25, "none", 0.0), r"q must be 4-D"),
        ((torch.randn(1, 1, 5, 8),) * 3 + (None, None, 0.25, "rows", 0.0), r"export must be one of .*got 'rows'"),
        ((torch.randn(1, 1, 5, 8),) * 3 + (None, None, float("inf"), "none", 0.0), r"scale must be a finite number"),
        ((torch.randn(1, 1, 5, 8).half(),) * 3 + (None, None, 0.25, "none", 0.0), r"q dtype must be float32, float64 or bfloat16"),
    ],
)
def test_the_raw_op_checks_too(args, match):
    """Calling torch.ops.fastattnreg directly skips the Python checks; the C++ ones still hold."""
    with pytest.raises(ValueError, match=match):
        torch.ops.fastattnreg.attention_fwd(*args)


@requires_cpp
def test_raw_backward_checks_gradient_shapes():
    q, k, v = qkv(SMALL, torch.float32, requires_grad=False)
    out, lse, maps = torch.ops.fastattnreg.attention_fwd(q, k, v, None, None, 0.25, "cls", 0.0)
    with pytest.raises(ValueError, match=r"dmaps must have shape \[1, 2, 17\]; got \[1, 17\]"):
        torch.ops.fastattnreg.attention_bwd(None, q, k, v, out, lse, None, maps[:, 0], None, None,
                                            0.25, "cls", 0.0, False)
    with pytest.raises(ValueError, match=r"lse must be Float"):
        torch.ops.fastattnreg.attention_bwd(out, q, k, v, out, lse.double(), None, None, None, None,
                                            0.25, "none", 0.0, False)


@pytest.mark.slow
def test_package_works_without_the_extension():
    """With _C missing: one clear warning at import, the reference path works, 'cpp' is refused."""
    code = textwrap.dedent(
        """
        import os, sys, warnings
        sys.modules["fastattnreg._C"] = None  # makes `import fastattnreg._C` raise ImportError
        os.environ.pop("FASTATTNREG_REQUIRE_CPP", None)  # this child tests the fallback
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastattnreg
        msgs = [str(w.message) for w in caught if "fastattnreg" in str(w.message)]
        assert len(msgs) == 1 and "did not load" in msgs[0], msgs
        import torch
        q = torch.randn(1, 2, 5, 8)
        out, maps = fastattnreg.attention(q, q, q, export="cls")
        assert out.shape == (1, 2, 5, 8) and maps.shape == (1, 2, 5)
        try:
            fastattnreg.attention(q, q, q, backend="cpp")
        except RuntimeError as e:
            assert "backend='cpp' is not available" in str(e)
        else:
            raise AssertionError("backend='cpp' should be refused")
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


@pytest.mark.slow
def test_import_fails_without_the_extension_when_it_is_required():
    """FASTATTNREG_REQUIRE_CPP=1 (scripts/run_tests.sh) turns the missing _C into an ImportError
    at `import fastattnreg` that names the variable and the build command."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["fastattnreg._C"] = None  # makes `import fastattnreg._C` raise ImportError
        try:
            import fastattnreg
        except ImportError as e:
            print("REFUSED:", e)
        else:
            raise AssertionError("import fastattnreg should fail")
        """
    )
    env = {**os.environ, "FASTATTNREG_REQUIRE_CPP": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith("REFUSED: fastattnreg: the C++ extension fastattnreg._C did not load")
    assert "FASTATTNREG_REQUIRE_CPP=1 requires it" in line
    assert "pip install --no-build-isolation -e ." in line
