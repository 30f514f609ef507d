"""geocap.kernels: geometry-biased attention and streaming attention entropy.

Each op has a Triton kernel (CUDA, or the Triton CPU interpreter) and a PyTorch path with the
same semantics; ``backend="auto"`` picks Triton for CUDA tensors and PyTorch elsewhere.

This folder is the package ``geocap.kernels`` (setuptools ``package-dir``). Run from the
repository root (a REPL, ``python -c``, a notebook, a script there), the root is on ``sys.path``
and ``import kernels`` would find this folder instead of Hugging Face's ``kernels`` distribution,
which transformers 5 imports. Imported under that top-level name, this file therefore loads the
installed ``kernels`` distribution in its place (``sys.modules["kernels"]`` is that module, as if
the root were not on the path), or raises ``ModuleNotFoundError`` when none is installed; it never
becomes a top-level ``kernels`` itself. geocap's kernels are always ``geocap.kernels``.
"""
if __name__ == "kernels":
    def _hand_over() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None:
            del sys.modules["kernels"]
            raise ModuleNotFoundError(f"No module named 'kernels' installed ({os.path.join(root, 'kernels')} is "
                                      f"geocap's own: import geocap.kernels)", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module            # the import statement returns sys.modules["kernels"]
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _hand_over()
else:
    from .attention import AttentionResult, attention, geo_attention
    from .entropy import attention_entropy
    from .geometry import box_relation_embedding, geometry_log_bias
    from .validation import value_checks

    __all__ = ["AttentionResult", "attention", "attention_entropy", "box_relation_embedding", "geo_attention",
               "geometry_log_bias", "value_checks"]
