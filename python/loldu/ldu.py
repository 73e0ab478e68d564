"""The leading-r LDU factorization of a weight matrix (docs/method.md): kept as a module name for
`from loldu.ldu import ...`; the functions live with the other ops in loldu.ops."""
from .ops import LDUResult, ldu, ldu_from_pivots

__all__ = ["LDUResult", "ldu", "ldu_from_pivots"]
