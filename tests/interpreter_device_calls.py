"""Makes Triton's interpreter skip its language patching on calls of @triton.jit helpers made
inside a kernel launch, where the launch has already patched the same namespaces (a test-time
speed-up; the interpreted kernels compute the same numbers).

Under TRITON_INTERPRET=1 a kernel launch (GridExecutor.__call__) patches the triton.language
namespaces that the kernel's module holds (`tl`: every builtin, tl.math, tensor methods,
tl.range, ...) for the launch and restores them afterwards. Each call of a jitted helper from
inside the kernel (InterpretedFunction.__call__: the tile loads, masks and online-LSE steps of
fastattnreg/triton/tiles.py, per program and per key block) runs the same patching for the
namespaces of the helper's module: inspect.getmembers over five namespaces, about 1.2 ms a call.
Where the launch (or an earlier helper call of the same launch) has patched those namespaces,
that pass finds no builtin left to wrap and changes nothing the helper sees; it took 43 s of a
140 s profile of the attention interpreter cases.

`install()` wraps both calls. Inside a launch, a helper whose namespaces (`tl`, or `tl.core` for
Triton's own helpers such as tl.zeros) are all patched runs its rewritten function directly; the
first call that needs another namespace, every helper call outside a launch and every launch go
through Triton's own code unchanged. It is a no-op where the interpreter's code is not the
Triton 3.8 layout it was read from (a helper call that patches the language itself), so another
Triton only runs slower.
"""
import inspect
import threading

_state = threading.local()  # .patched: per running launch, the ids of the patched namespaces
_langs_of = {}  # helper's Python function -> ids of the language namespaces its module holds


def _langs(fn, tl) -> frozenset:
    """ids of the namespaces Triton's _patch_lang patches for `fn`: the modules among its
    globals that are triton.language or triton.language.core."""
    if fn not in _langs_of:
        _langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                  if inspect.ismodule(v) and v in (tl, tl.core))
    return _langs_of[fn]


def install() -> bool:
    """Installs the shortcut; returns whether it did (False where Triton's interpreter does not
    have the expected structure)."""
    import triton.language as tl
    from triton.runtime import interpreter

    helper_call = interpreter.InterpretedFunction.__call__
    launch = interpreter.GridExecutor.__call__
    if getattr(helper_call, "_fastattnreg_shortcut", False):
        return True
    try:
        expected = "_patch_lang(self.fn)" in inspect.getsource(helper_call)
    except (OSError, TypeError):
        expected = False
    if not expected or not hasattr(interpreter.InterpretedFunction, "rewrite"):
        return False

    def launch_call(self, *args, **kwargs):
        stack = _state.__dict__.setdefault("patched", [])
        stack.append(set(_langs(self.fn, tl)))
        try:
            return launch(self, *args, **kwargs)
        finally:
            stack.pop()

    def device_call(self, *args, **kwargs):
        stack = _state.__dict__.get("patched")
        needed = _langs(self.fn, tl)
        if not stack or not needed <= stack[-1]:
            if stack:
                stack[-1] |= needed  # patched now, for the rest of the launch
            return helper_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # as Triton's own helper call reports it
            raise interpreter.InterpreterError(repr(e)) from e

    device_call._fastattnreg_shortcut = True
    interpreter.GridExecutor.__call__ = launch_call
    interpreter.InterpretedFunction.__call__ = device_call
    return True
