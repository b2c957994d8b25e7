"""Conversions between attention forms and checkpoint formats.

* :mod:`headmix.convert.collaborative`: multi-head attention -> collaborative attention by a
  CP/PARAFAC decomposition of the per-head query-key products (Cordonnier et al., 2020).
"""
