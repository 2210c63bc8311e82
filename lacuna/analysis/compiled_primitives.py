"""Low-level building blocks of the compiled kernels (numba and LLVM).

- intrinsics that numba has no spelling for: float16 widening, cache prefetch, the
  exponent and mantissa of a float32 (for a vectorised logarithm), an array over a raw
  address;
- calling BLAS ``sgemm`` from compiled code, and finding the one numpy uses.

numba's disk cache is keyed on the file of each cached function: after editing this
module, clear the cache (or touch the modules using it), or their cached kernels keep
the old code.
"""

from __future__ import annotations

import ctypes
import functools
import math

import numba
import numpy as np
import threadpoolctl
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import get_cython_function_address, intrinsic



@intrinsic
def half_to_single(typingctx, bits):
    """The float16 value whose bits are ``bits`` (uint16), widened to float32: one
    ``fpext`` instruction, which LLVM vectorises (``vcvtph2ps`` on x86 with F16C)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def prefetch(typingctx, array, index):
    """Hint the CPU to fetch ``array[index]`` into cache (``llvm.prefetch``)."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        int32 = ir.IntType(32)
        function_type = ir.FunctionType(ir.VoidType(), [address.type, int32, int32, int32])
        function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0")
        # read, keep in all cache levels, data
        builder.call(function, [address, ir.Constant(int32, 0), ir.Constant(int32, 3), ir.Constant(int32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@intrinsic
def binary_exponent(typingctx, value):
    """k such that ``value / 2**k`` lies in [sqrt(1/2), sqrt(2)), as float32, for a
    positive normal float32 ``value`` (integer operations on its bits, which
    vectorise)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.sitofp(_split_float(builder, args[0])[0], ir.FloatType())

    return types.float32(types.float32), codegen


@intrinsic
def reduced_mantissa(typingctx, value):
    """``value / 2**k``, in [sqrt(1/2), sqrt(2)), with k from :func:`binary_exponent`."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return _split_float(builder, args[0])[1]

    return types.float32(types.float32), codegen


_SQRT_HALF_BITS = int(np.float32(math.sqrt(0.5)).view(np.int32))


def _split_float(builder, value):
    """LLVM IR: (k, value / 2**k) with value / 2**k in [sqrt(1/2), sqrt(2)): the
    exponent is read from the bits of value relative to those of sqrt(1/2)."""
    int32 = ir.IntType(32)
    bits = builder.bitcast(value, int32)
    exponent = builder.ashr(builder.sub(bits, ir.Constant(int32, _SQRT_HALF_BITS)), ir.Constant(int32, 23))
    mantissa = builder.sub(bits, builder.shl(exponent, ir.Constant(int32, 23)))
    return exponent, builder.bitcast(mantissa, ir.FloatType())


@intrinsic
def pointer_like(typingctx, array, address):
    """``address`` as a pointer to ``array``'s element type."""
    if not isinstance(array, types.Array) or not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[1], context.get_value_type(array.dtype).as_pointer())

    return types.CPointer(array.dtype)(array, address), codegen


@numba.njit(inline="always")
def array_like(array, address):
    """The C-contiguous array of ``array``'s shape and type whose data is at
    ``address``."""
    return numba.carray(pointer_like(array, address), array.shape)


def _sgemm_caller(integer_bits: int):
    """An intrinsic calling the BLAS ``sgemm`` at a given address (Fortran interface,
    every argument by reference, integers of ``integer_bits``) for column-major
    ``c (m x n) = a (m x k) @ b (k x n)``; the leading dimensions are in elements."""

    @intrinsic
    def sgemm_at(typingctx, address, m, n, k, a, lda, b, ldb, c, ldc):
        arrays = (a, b, c)
        if not all(isinstance(x, types.Array) and x.dtype == types.float32 for x in arrays):
            return None

        def codegen(context, builder, signature, args):
            integer_type, float32 = ir.IntType(integer_bits), ir.FloatType()
            char = ir.IntType(8)

            def by_reference(kind, value):
                slot = cgutils.alloca_once(builder, kind)
                builder.store(value, slot)
                return slot

            def integer(index):
                value = args[index]
                if value.type.width > integer_bits:
                    value = builder.trunc(value, integer_type)
                elif value.type.width < integer_bits:
                    value = builder.sext(value, integer_type)
                return by_reference(integer_type, value)

            def data(index):
                return context.make_array(signature.args[index])(context, builder, args[index]).data

            no_transpose = by_reference(char, ir.Constant(char, ord("N")))
            one, zero = by_reference(float32, ir.Constant(float32, 1.0)), by_reference(float32, ir.Constant(float32, 0.0))
            arguments = [no_transpose, no_transpose, integer(1), integer(2), integer(3), one, data(4), integer(5)]
            arguments += [data(6), integer(7), zero, data(8), integer(9)]
            function_type = ir.FunctionType(ir.VoidType(), [x.type for x in arguments])
            builder.call(builder.inttoptr(args[0], function_type.as_pointer()), arguments)
            return context.get_dummy_value()

        return types.void(types.intp, types.intp, types.intp, types.intp, a, types.intp, b, types.intp, c, types.intp), codegen

    return sgemm_at


_sgemm_lp64 = _sgemm_caller(32)
_sgemm_ilp64 = _sgemm_caller(64)


@numba.njit(inline="always")
def call_sgemm(function, m, n, k, a, lda, b, ldb, c, ldc):
    """Column-major ``c (m x n) = a (m x k) @ b (k x n)`` by the BLAS ``sgemm``
    ``function`` (from :func:`blas_sgemm`); leading dimensions in elements."""
    if function[1] == 64:
        _sgemm_ilp64(function[0], m, n, k, a, lda, b, ldb, c, ldc)
    else:
        _sgemm_lp64(function[0], m, n, k, a, lda, b, ldb, c, ldc)


@functools.cache
def blas_sgemm() -> tuple[int, int]:
    """The BLAS ``sgemm`` for :func:`call_sgemm`: (address, bits of its integers).

    numpy's own OpenBLAS when it can be found (the library behind ``numpy.matmul``,
    64-bit integers; measured 12% faster on our product than the copy bundled with
    scipy), otherwise scipy's public ``cython_blas`` (32-bit integers). Looked up once
    per process.
    """
    for library in threadpoolctl.threadpool_info():
        if library.get("internal_api") != "openblas" or "numpy" not in library.get("filepath", ""):
            continue
        try:
            function = getattr(ctypes.CDLL(library["filepath"]), "scipy_sgemm_64_")
        except (OSError, AttributeError):
            break
        return ctypes.cast(function, ctypes.c_void_p).value, 64
    return get_cython_function_address("scipy.linalg.cython_blas", "sgemm"), 32


@functools.cache
def _blas_libraries() -> threadpoolctl.ThreadpoolController:
    blas_sgemm()  # loads the library it falls back to, so that it is found too
    return threadpoolctl.ThreadpoolController()


def single_threaded_blas():
    """A context in which the BLAS libraries run one thread (for threads that each call
    BLAS on their own). The libraries are looked up once per process: each lookup
    scans every loaded library (2 ms)."""
    return _blas_libraries().limit(limits=1, user_api="blas")


#: CPU flags OpenBLAS's AVX-512 ("SkylakeX") kernels need.
_AVX512_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def avx2_blas_on_avx512_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether numpy's OpenBLAS runs its AVX2 kernels on a CPU that has AVX-512 (as on
    AMD Zen 5, which current OpenBLAS releases do not recognise); setting
    ``OPENBLAS_CORETYPE=SkylakeX`` then speeds up the matrix product."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open(cpuinfo) if line.startswith("flags")), [])
    except OSError:
        return False
    if not _AVX512_FLAGS <= set(flags):
        return False
    return any(
        library.get("internal_api") == "openblas" and library.get("architecture") in ("Haswell", "Zen")
        for library in threadpoolctl.threadpool_info()
    )
