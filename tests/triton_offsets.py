"""Which pointer offsets of a Triton kernel can overflow 32 bits, read from its Triton IR.

A kernel is lowered to Triton IR (the frontend and the inliner only: no GPU, no ptxas) for a
given specialisation, with every size and stride argument typed i32, the type Triton gives an int
argument below 2**31. Every `tt.addptr` offset is then traced back through its arithmetic. The
rule: every 32-bit value that takes part in an offset is an index, made of constants,
`tl.arange`, program ids, loop counters and the kernel's arguments by sums, differences,
divisions, remainders and products with constants. Such a value stays near the grid, the
sequence length or an argument, all below 2**31. A product of two runtime values (i * N,
rows * stride, b * H) must be taken in 64 bits,
before it can pass 2**31 (maps at N >= 46,341: i * N + j); a 64-bit offset whose 32-bit parts
are all indices passes. The rule reads no values, so it holds for every problem size at once.
"""
from __future__ import annotations

import re

import triton
from triton._C.libtriton import ir, passes
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

# Ops that keep an index an index when every operand is one (muli: see _is_index).
_INDEX_OPS = ("arith.addi", "arith.subi", "arith.divsi", "arith.divui", "arith.remsi",
              "arith.remui", "arith.andi", "arith.ori", "arith.xori", "arith.maxsi",
              "arith.minsi", "tt.expand_dims", "tt.broadcast", "tt.splat")
_INDEX_LEAVES = ("arith.constant", "tt.make_range", "tt.get_program_id", "tt.get_num_programs")
_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_NAME = re.compile(r"%[\w.#]+")
_INT_ARGS = ("H", "N", "R", "g_rows", "n_rows")


def jit_function(kernel) -> triton.runtime.jit.JITFunction:
    """The JITFunction under a kernel's autotune / heuristics wrappers."""
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


# Pointer arguments that hold the inputs' dtype; the others hold fp32 row statistics and maps,
# bytes (bool masks, Keep) or the dropout stream's int64 (seed, offset).
_INPUT_DTYPE = {"Q", "K", "V", "TQ", "TK", "Out", "DOut", "DQ", "DK", "DV", "Maps", "G", "DMask"}


def signature(fn, constexprs: dict, dtype: str = "fp32") -> dict:
    """Triton types for every argument of `fn` with inputs of `dtype` ("fp16", "bf16", "fp32"):
    i32 sizes and strides, fp32 scales, an i64 dropout threshold, typed pointers for the rest
    (offsets do not depend on the element types)."""
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            if name not in constexprs:
                raise KeyError(f"{fn.__name__}: constexpr {name} needs a value")
            sig[name] = "constexpr"
        elif name.startswith("stride_") or name in _INT_ARGS:
            sig[name] = "i32"
        elif name.endswith("scale"):
            sig[name] = "fp32"
        elif name == "threshold":
            sig[name] = "i64"
        elif name == "Rng":
            sig[name] = "*i64"
        elif name == "Keep" or (name == "Mask" and constexprs.get("MASK") == 1):
            sig[name] = "*u8"
        elif name in _INPUT_DTYPE or name == "Mask":
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "*fp32"
    return sig


def triton_ir(kernel, constexprs: dict) -> str:
    """The kernel's Triton IR (frontend output, helpers inlined) for one specialisation;
    values of constexprs the kernel does not have are left out."""
    fn = jit_function(kernel)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    src = ASTSource(fn, signature(fn, constexprs), constexprs)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options),
                         backend.get_module_map(), context)
    # Helpers (@triton.jit functions called by the kernel) are inlined, so that an offset built
    # from a helper's arguments is traced back to the kernel's own values.
    pm = ir.pass_manager(module.context)
    passes.common.add_inliner(pm)
    pm.run(module, "inline")
    return str(module)


def _parse(text: str) -> dict[str, tuple[str, list[str], str]]:
    """SSA name -> (op, operand names, result type) for every single-line definition."""
    defs = {}
    for line in text.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        body, _, types = rest.partition(" : ")
        body = re.sub(r"\{[^}]*\}", "", body)  # attributes
        result_type = re.split(r" to |->", types.split(" loc(")[0])[-1].strip()
        defs[name] = (op, _NAME.findall(body), result_type)
    return defs


def overflowing_offsets(text: str) -> list[str]:
    """The addptr lines of `text` whose offset has a 32-bit part that is not an index (see the
    module docstring). Names without a definition line are the kernel's arguments and loop
    counters. Sibling regions (the branches of an scf.if) may print the same SSA name for
    different values, so each addptr is judged on the definitions printed before it, the
    latest one of each name."""
    lines = text.splitlines()
    bad = []
    for i, line in enumerate(lines):
        m = _DEF.match(line)
        if m and m.group(2) == "tt.addptr":
            bad += _overflowing_offsets_in("\n".join(lines[:i + 1]), only_last=True)
    return bad


def _overflowing_offsets_in(text: str, only_last: bool = False) -> list[str]:
    """The overflowing addptr lines of `text` (only its last line with only_last), judged on the
    latest definition of each name in `text`."""
    defs = _parse(text)

    def is_constant(name: str) -> bool:
        op = defs.get(name, ("",))[0]
        return op == "arith.constant" or (op == "tt.splat" and is_constant(defs[name][1][0]))

    index_memo: dict[str, bool] = {}

    def is_index(name: str) -> bool:
        if name in index_memo:
            return index_memo[name]
        index_memo[name] = True  # a cycle runs through loop-carried values: judged at the leaves
        if name not in defs:
            ok = True  # a kernel argument or a loop counter: one value below 2**31
        else:
            op, operands, _ = defs[name]
            if op in _INDEX_LEAVES:
                ok = True
            elif op in _INDEX_OPS:
                ok = all(is_index(o) for o in operands)
            elif op == "arith.muli":
                ok = any(is_constant(o) for o in operands) and all(is_index(o) for o in operands)
            elif op == "arith.select":
                ok = all(is_index(o) for o in operands[1:])
            else:
                ok = False
        index_memo[name] = ok
        return ok

    def is_32bit(name: str) -> bool:
        return re.search(r"\bi(32|16|8)\b|xi(32|16|8)>", defs.get(
            name, ("", [], ""))[2]) is not None

    seen: dict[str, bool] = {}

    def safe(name: str) -> bool:
        # An offset value is safe when each of its 32-bit parts is an index; 64-bit arithmetic
        # is followed down to the sign extensions of 32-bit values.
        if name in seen:
            return seen[name]
        seen[name] = True
        if name not in defs:
            ok = True  # an argument or a loop counter as it is
        elif is_32bit(name):
            ok = is_index(name)
        else:
            op, operands, _ = defs[name]
            ok = all(safe(o) for o in operands) if op != "tt.load" else True
        seen[name] = ok
        return ok

    bad = []
    for line in text.splitlines()[-1:] if only_last else text.splitlines():
        m = _DEF.match(line)
        if not m or m.group(2) != "tt.addptr":
            continue
        offset = _NAME.findall(m.group(3).split(" : ")[0])[1]
        if not safe(offset):
            bad.append(line.strip().split(" loc(")[0])
    return bad
