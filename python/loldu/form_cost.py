"""The cost model behind form="auto" (docs/method.md §7), written once for both languages.

The pure-PyTorch reference has no C++ to call and the C++ library has no Python to call, yet both
must resolve "auto" alike, so the model lives here and cpp/form_cost.h is generated from it by
cpp/tools/gen_headers.py (a test fails while the header is stale). Each function below is a few
assignments and one returned expression in the part of Python that reads the same in C++: numbers,
+ - * /, comparisons, and / or / not, `a if c else b`, min, floor and calls of one another; every
quantity is a float and flags are 0 or 1. No imports beyond math: the generator reads this file
without importing loldu.

Every term is in flop-equivalents of the device's large-GEMM rate. A pass over an array of `elems`
elements that moves each of them `a` times and does 2 r flops on each costs

    elems * (2 r s + a e),

s ("skinny") being how much slower than a large GEMM a rank-r GEMM does its flops and e ("stream")
the cost of moving one element (the device's flops per byte times the element size). Extra cost
over the frozen base step (forward + input gradient) for n rows:

  delta  forward:  t = x U^T          n k (2 r s + e)       y += t (PL c)^T   n d (2 r s + 2 e)
         backward: h = g PL           n d (2 r s + e)       gx += h (c U)     n k (2 r s + 2 e)
  dense  forward:  W = W0 + PL c U    d k (2 r_u s + 3 e)   (read W0, write W fresh)
                   + d k hold: the (d, k) buffer held from the forward to the backward
                     (kept only when x needs a gradient)
         backward: grad_c through the cheaper of
                   t and h            n (k + d) (2 r s + e)
                   G = g^T x          2 n d k  +  G U^T: d k (2 r_u s + 3 e)

r_u is the average number of U's rows the blocked products touch per column (about r / 2 at full
rank on CPU, r elsewhere). The base GEMMs cost the same in both forms (the dense form multiplies by
W instead of W0) and cancel. Summing, with the base step at 4 n d k:

  delta ≈ 1 + r (d + k) / (d k) + 3 e (d + k) / (4 d k),
  dense ≈ 1 + r_u / (2 n) + min(r (d + k) / (2 d k), 1/2 + r_u / (2 n)) + memory terms,

i.e. 1.5 + r / n at full rank without U's structure. Every per-row term grows with n and the dense
form's fixed terms do not, so the dense form wins from some n on, which dense_min_rows returns;
without a backward (hold and the backward terms dropped) the same holds for the forward alone.
"""
from math import floor, inf

U_BLOCK = 64  # column block of the CPU kernels' products with an upper trapezoidal U
NEVER = inf  # dense_min_rows when the dense form never wins
ROWS_LIMIT = 1e15  # a crossover this far out counts as never


def flops_per_byte(cuda, elem):
    """A large GEMM's flops per byte streamed, for elements of `elem` bytes.

    CUDA: H100/H200-class spec-sheet numbers, not measured here: ~60 TFLOP/s fp32 (TF32 off) and fp64,
    ~900 fp16/bf16 on tensor cores, against ~4.5 TB/s. CPU: measured on a 2-core AMD EPYC (Zen 5,
    AVX-512) with MKL, one thread, fp32: a large GEMM's rate against passes over (n, d) / (n, k) and
    (d, k) arrays (benchmarks/bench_adapter.py); fp64 GEMMs run at half the rate on twice the bytes,
    bf16/fp16 at twice the rate on half."""
    return (200.0 if elem == 2 else 14.0) if cuda else (2.5 if elem == 8 else (10.0 if elem == 2 else 5.0))


def skinny(cuda):
    """Rank-r GEMM flops relative to a large GEMM's (below a large GEMM's rate on GPUs)."""
    return 1.5 if cuda else 1.0


def stream(cuda, elem):
    """Flop-equivalents per element streamed once."""
    return flops_per_byte(cuda, elem) * elem


def upper_rank(r, k, upper):
    """U's nonzero rows per column, averaged over the kernels' column blocks (r when unstructured):
    block [j0, j0 + w) of the leading min(r, k) columns touches rows < j0 + w, later columns all r."""
    m = min(r, k)
    q = floor(m / U_BLOCK)
    return (U_BLOCK * U_BLOCK * q * (q + 1) / 2 + m * (m - q * U_BLOCK) + r * (k - m)) / k if upper else r


def delta_row(d, k, r, s, e, backward, need_x):
    """The delta form's extra cost per row."""
    return (k * (2 * r * s + e) + d * (2 * r * s + 2 * e) + (d * (2 * r * s + e) if backward else 0.0)
            + (k * (2 * r * s + 2 * e) if need_x else 0.0))


def build_cost(d, k, ru, s, e):
    """One pass of the blocked products with U over a (d, k) array: building W, or G U^T."""
    return d * k * (2 * ru * s + 3 * e)


def t_h_row(d, k, r, s, e):
    """grad_c through t and h, per row."""
    return (k + d) * (2 * r * s + e)


def g_row(d, k):
    """grad_c through G = g^T x, per row."""
    return 2 * d * k


def crossover(delta, row, fixed):
    """Smallest n with fixed + n * row < n * delta, NEVER if none."""
    n = floor(fixed / (delta - row)) + 1 if row < delta else NEVER
    return n if n < ROWS_LIMIT else NEVER


def dense_min_rows(d, k, r, cuda, upper, elem, need_x, need_c):
    """The smallest number of rows from which the dense form is the cheaper one, NEVER when never.

    cuda: CUDA's constants (else the CPU's); upper: the kernels skip U's zero triangle (CPU);
    elem: bytes per element of the compute dtype; need_x / need_c: which gradients the backward
    computes (neither: a forward only)."""
    s = skinny(cuda)
    e = stream(cuda, elem)
    hold = 2.5 * e
    ru = upper_rank(r, k, upper)
    delta = delta_row(d, k, r, s, e, need_x or need_c, need_x)
    fixed = build_cost(d, k, ru, s, e) + (d * k * hold if need_x else 0.0)
    by_t_h = crossover(delta, t_h_row(d, k, r, s, e), fixed)
    by_g = crossover(delta, g_row(d, k), fixed + build_cost(d, k, ru, s, e))
    return min(by_t_h, by_g) if need_c else crossover(delta, 0.0, fixed)


def grad_c_through_g(n, d, k, r, cuda, upper, elem):
    """Whether the dense backward evaluates grad_c through G = g^T x rather than through t and h."""
    s = skinny(cuda)
    e = stream(cuda, elem)
    ru = upper_rank(r, k, upper)
    return build_cost(d, k, ru, s, e) + n * g_row(d, k) < n * t_h_row(d, k, r, s, e)
