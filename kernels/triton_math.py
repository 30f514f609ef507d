"""sin and cos together, on the FMA pipes: the geometry term's special functions.

``tl.sin`` / ``tl.cos`` compile to libdevice's precise sinf/cosf: each carries a Payne-Hanek
slow path (a local-memory array and many live registers) and ORT's geometry needs 32 of them
per (query, key) pair, which spills registers in the attention kernels. The geometry's
arguments are bounded (|100 f log(r)| <= 100 |log 1e-3| ~ 691), so a three-constant Cody-Waite
reduction by pi/2 is exact enough (the first constant has 8 significant bits, so ``j * C1`` is
exact for |j| < 2**16), and cephes' minimax polynomials on [-pi/4, pi/4] give both values within
a few ulp of the correctly rounded result. Plain arithmetic: it runs compiled and under the
Triton interpreter alike.
"""
import triton
import triton.language as tl


@triton.jit
def sincos(x):
    """``(sin(x), cos(x))`` elementwise for fp32 ``x`` with |x| below about 1e5."""
    j = tl.floor(x * 0.6366197723675814 + 0.5)                 # nearest multiple of pi/2
    r = ((x - j * 1.5703125) - j * 4.837512969970703125e-4) - j * 7.54978995489188216e-8
    r2 = r * r
    s = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    c = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    quadrant = j.to(tl.int32) & 3
    sin_x = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    cos_x = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    return sin_x, cos_x
