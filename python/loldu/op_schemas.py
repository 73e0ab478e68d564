"""The schemas of the `torch.ops.loldu` ops, written once.

The compiled library declares them from cpp/op_schemas.h, which cpp/tools/gen_headers.py writes from this
dict; the pure-PyTorch reference declares them from the dict itself (reference.define_ops). Plain
strings, no imports: the generator reads this file without importing loldu.
"""

SCHEMAS = {
    "ldu": "ldu(Tensor W, int rank, str pivoting='partial') -> (Tensor PL, Tensor D, Tensor U, Tensor pivots)",
    "ldu_from_pivots": "ldu_from_pivots(Tensor W, Tensor pivots) -> (Tensor PL, Tensor D, Tensor U, Tensor pivots)",
    "adapter_linear": "adapter_linear(Tensor x, Tensor weight, Tensor? bias, Tensor PL, Tensor U, Tensor c, "
                      "str form='auto') -> Tensor",
    "adapter_linear_forward": "adapter_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor PL, Tensor U, "
                              "Tensor c, str form) -> (Tensor y, Tensor saved)",
    "adapter_linear_backward": "adapter_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor PL, Tensor U, "
                               "Tensor c, bool need_grad_x, bool need_grad_c=True, str form='delta', "
                               "Tensor? saved=None) -> (Tensor grad_x, Tensor grad_c)",
    "delta_weight": "delta_weight(Tensor PL, Tensor U, Tensor c) -> Tensor",
    "lu_packed": "lu_packed(Tensor W) -> (Tensor LU, Tensor perm, Tensor D)",
    "lu_linear_forward": "lu_linear_forward(Tensor x, Tensor LU, Tensor perm, Tensor D, Tensor c, Tensor? bias) "
                         "-> (Tensor y, Tensor u)",
    "lu_linear_backward": "lu_linear_backward(Tensor grad_y, Tensor u, Tensor LU, Tensor perm, Tensor D, Tensor c, "
                          "bool need_grad_x, bool need_grad_c) -> (Tensor grad_x, Tensor grad_c)",
}
