"""How the Triton ops register (fastattnreg/ops/triton_ops.py) on every supported torch.

torch.library.triton_op before torch 2.14 ignores its `schema` argument and infers the schema
from the implementation's signature, so each implementation carries the signature that
schema_signature derives from the declared schema. These tests hold that signature to the
schema: torch's own inference over it must give back the declared arguments and return count,
whichever torch runs them.
"""
import pytest
import torch

pytest.importorskip("triton")

from fastattnreg.ops import triton_attention, triton_match, triton_refiner  # noqa: E402
from fastattnreg.ops.triton_ops import schema_signature  # noqa: E402

OPS = [(mod, which) for mod in (triton_attention, triton_match, triton_refiner)
       for which in ("FWD", "BWD")]


def _parts(name: str, schema: str):
    parsed = torch._C.parse_schema(name + schema)
    return ([(a.name, str(a.type)) for a in parsed.arguments],
            [str(r.type) for r in parsed.returns])


@pytest.mark.parametrize("mod, which", OPS, ids=[f"{m.__name__.split('.')[-1]}-{w}"
                                                 for m, w in OPS])
def test_inferred_schema_of_the_implementation_is_the_declared_one(mod, which):
    name, schema = getattr(mod, f"{which}_NAME"), getattr(mod, f"{which}_SCHEMA")
    impl = getattr(mod, f"_{which.lower()}_impl")
    inferred = torch.library.infer_schema(impl, mutates_args=())
    assert _parts(name, inferred) == _parts(name, schema)
    # The op as registered in this process has the declared arguments, on any torch.
    op = getattr(torch.ops.fastattnreg, name.split("::")[1]).default
    assert _parts(name, str(op._schema).split(name, 1)[1])[0] == _parts(name, schema)[0]


def test_schema_signature_maps_each_type_and_counts_the_returns():
    sig = schema_signature("fastattnreg::x",
                           "(Tensor a, Tensor? b, float c, str d, bool e, float[] f) -> "
                           "(Tensor y, Tensor z)")
    assert list(sig.parameters) == ["a", "b", "c", "d", "e", "f"]
    assert sig.return_annotation == tuple[torch.Tensor, torch.Tensor]


@pytest.mark.parametrize("schema, named", [
    ("(Tensor a, int n) -> Tensor", "argument n has type int"),
    ("(Tensor a, *, float c) -> Tensor", "argument c is keyword-only"),
    ("(Tensor a, float c=1.0) -> Tensor", "argument c is keyword-only or has a default"),
    ("(Tensor a) -> float", "return Tensors only"),
])
def test_schema_signature_refuses_what_it_does_not_map(schema, named):
    with pytest.raises(ValueError, match=named):
        schema_signature("fastattnreg::x", schema)
