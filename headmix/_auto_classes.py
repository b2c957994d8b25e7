"""Registering headmix's models with ``transformers``' Auto classes when ``transformers`` is first imported.

``import headmix`` must stay light (layers, reference math, ops: no ``transformers``), yet
``import headmix; AutoModel.from_pretrained(saved_dir)`` must find headmix's classes. So the root import
installs a one-shot post-import hook on ``transformers``: once that package has executed (whoever imports
it), :mod:`headmix.models` (DCFormer) and the collaborative variants of the Hugging Face encoders
(:func:`headmix.convert.collaborative_hf.register_saved_classes`) are registered. If ``transformers`` is
already imported, that happens at once. ``import headmix.models`` registers its classes by itself too.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_PACKAGE = "transformers"


def register_auto_classes() -> None:
    """Register the DCFormer family and the saved collaborative encoders with the Auto classes."""
    if "headmix.models" not in sys.modules:  # a module mid-import registers itself at its end
        importlib.import_module("headmix.models")
    from .convert.collaborative_hf import register_saved_classes

    register_saved_classes()


def _register_quietly() -> None:
    try:
        register_auto_classes()
    except Exception as error:  # never break the user's `import transformers`
        warnings.warn(f"headmix could not register its Auto classes with transformers: {error!r}", stacklevel=3)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds ``transformers`` through the other finders and runs the registration after its module executes.

    A lookup without an import (``importlib.util.find_spec("transformers")``, as availability checks do)
    changes nothing: the finder stays until the module has really executed."""

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, name, path=None, target=None):
        if name != _PACKAGE or self._searching:
            return None
        self._searching = True  # the lookup below goes through sys.meta_path again: let it pass us
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_quietly()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now if ``transformers`` is imported, else when it is."""
    if _PACKAGE in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
