"""raydistill-mart: MART (Wang et al., ICLR 2020) for raydistill, installed as a plugin.

The method is ``raydistill_mart/mart_method.py`` (one file, also usable as ``--plugin .../mart_method.py``); installing the
package declares it in the entry-point group ``raydistill.methods`` as ``mart``, with its search space
``mart.yaml`` beside it.
"""
from .mart_method import MART, mart_terms

__all__ = ["MART", "mart_terms"]
