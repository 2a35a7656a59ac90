"""Run the kernels on the CPU through Triton's interpreter (for tests on machines without a GPU).

Call `use_interpreter()` before `triton` itself is imported (a test module does so at its top, before
any other import of it): Triton decides at decoration time whether a function is compiled or
interpreted, its own library functions included. It also fixes one incompatibility of
Triton 3.6's interpreter with NumPy >= 2.4: scalar kernel arguments are 1-element arrays, which
NumPy no longer converts with int(), so loops with run-time bounds (`range(0, K, BLOCK)`) failed.
"""

from __future__ import annotations

import os
import sys


def use_interpreter() -> None:
    """Make kernels imported from now on run under the Triton interpreter."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before use_interpreter(): its functions are compiled, not "
                           "interpreted; set TRITON_INTERPRET=1 in the environment, or import triton later")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    if getattr(interpreter, "_ssmq_index_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._ssmq_index_fix = True
