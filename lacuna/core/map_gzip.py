"""Standard gzip for float32 voxel maps at the cost of a copy.

A statistical map holds two kinds of bytes: float32 values inside the brain, which
deflate barely shrinks (their low mantissa bytes are noise: ISA-L's fastest level
keeps 82-95 % of them) yet spends most of its time on, and long runs of one value
(0 or 1) outside it, which shrink to nothing. This encoder writes each kind in the
deflate block type that suits it (RFC 1951): the values as *stored* blocks (copied),
each run of a repeated voxel as a *fixed-Huffman* block of its 4 bytes and matches
at distance 4. The result is a standard gzip member (RFC 1952) that every reader
(nibabel, FSL, MRtrix3, gzip, zlib) decodes to the same bytes, in a tenth of ISA-L's
time, 10-25 % larger than ISA-L's level 1.
"""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from dataclasses import dataclass

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from lacuna.core.compiled import compile_kernel

try:
    from isal.isal_zlib import crc32  # a few times faster than zlib's
except ImportError:  # pragma: no cover - depends on the installation
    crc32 = zlib.crc32

log = logging.getLogger(__name__)

#: Voxels a run must span to become a fixed-Huffman block: shorter runs cost less as
#: stored bytes than a block's ~11 bytes of framing.
MIN_RUN_VOXELS = 8

_STORED_MAX = 65535  # bytes in one stored block
_MATCH_MAX = 258  # longest deflate match
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0, OS unknown


def _reversed_bits(code: int, width: int) -> int:
    """Huffman codes are packed most significant bit first into deflate's LSB-first
    bit stream."""
    return int(f"{code:0{width}b}"[::-1], 2)


_DISTANCE_4 = _reversed_bits(3, 5)  # distance symbol 3 (distance 4): five bits


def _match_codes() -> tuple[np.ndarray, np.ndarray]:
    """For each match length 3-258, the bits of a match of that length at distance 4
    (fixed-Huffman length symbol, its extra bits, distance symbol) as written to the
    stream, and their count."""
    bases = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258]
    extra = [0] * 8 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4 + [0]
    bits = np.zeros(_MATCH_MAX + 1, dtype=np.uint64)
    widths = np.zeros(_MATCH_MAX + 1, dtype=np.int64)
    for length in range(3, _MATCH_MAX + 1):
        index = max(i for i, base in enumerate(bases) if base <= length) if length < 258 else 28
        symbol = 257 + index
        code, width = (symbol - 256, 7) if symbol < 280 else (0xC0 + symbol - 280, 8)
        bits[length] = _reversed_bits(code, width) | ((length - bases[index]) << width)
        bits[length] |= _DISTANCE_4 << (width + extra[index])
        widths[length] = width + extra[index] + 5
    return bits, widths


_MATCH_BITS, _MATCH_WIDTHS = _match_codes()
_LITERAL_BITS = np.array([_reversed_bits(0x30 + v, 8) if v < 144 else _reversed_bits(0x190 + v - 144, 9) for v in range(256)], dtype=np.uint64)
_LITERAL_WIDTHS = np.array([8 if v < 144 else 9 for v in range(256)], dtype=np.int64)


@numba.njit(inline="always")
def _put(out, stream, bits, width):
    """``stream`` (byte position, bit buffer, bits in the buffer) after appending
    ``width`` (<= 24) bits; whole bytes leave the buffer four at a time."""
    position, buffer, count = stream
    buffer |= np.uint64(bits) << np.uint64(count)
    count += width
    if count >= 32:
        for k in range(4):
            out[position + k] = np.uint8((buffer >> np.uint64(8 * k)) & np.uint64(0xFF))
        buffer >>= np.uint64(32)
        count -= 32
        position += 4
    return position, buffer, count


@numba.njit(inline="always")
def _align(out, stream):
    """``stream`` with its buffer written out, padded with zero bits to a byte."""
    position, buffer, count = stream
    for k in range((count + 7) // 8):
        out[position + k] = np.uint8((buffer >> np.uint64(8 * k)) & np.uint64(0xFF))
    return position + (count + 7) // 8, np.uint64(0), 0


@intrinsic
def _copy_bytes(typingctx, destination, destination_start, source, source_start, count):
    """``destination[destination_start:][:count] = source[source_start:][:count]`` as
    one ``memcpy`` (numba's slice assignment first checks the two for overlap and goes
    through a temporary copy: 14 times slower). Byte arrays only."""
    if not all(isinstance(a, types.Array) and a.dtype == types.uint8 for a in (destination, source)):
        return None

    def codegen(context, builder, signature, args):
        destination_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        source_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        target = builder.gep(destination_data, [args[1]])
        origin = builder.gep(source_data, [args[3]])
        cgutils.raw_memcpy(builder, target, origin, args[4], 1)
        return context.get_dummy_value()

    return types.void(destination, types.int64, source, types.int64, types.int64), codegen


@numba.njit
def _put_stored(out, stream, data, first, stop):
    """``data[first:stop]`` (bytes) appended as stored blocks of at most 65,535 bytes."""
    while first < stop:
        size = min(stop - first, _STORED_MAX)
        stream = _align(out, _put(out, stream, 0, 3))  # not final, type 00 (stored)
        position = stream[0]
        out[position] = size & 0xFF
        out[position + 1] = size >> 8
        out[position + 2] = (~size) & 0xFF
        out[position + 3] = ((~size) >> 8) & 0xFF
        _copy_bytes(out, position + 4, data, first, size)
        stream = (position + 4 + size, stream[1], stream[2])
        first += size
    return stream


@numba.njit
def _put_run(out, stream, data, first, n_bytes, literal_bits, literal_widths, match_bits, match_widths):
    """``n_bytes`` bytes from ``data[first]`` on, a 4-byte value repeated, appended as
    one fixed-Huffman block: the value's 4 literals, then matches at distance 4."""
    stream = _put(out, stream, 2, 3)  # not final, type 01 (fixed Huffman)
    for k in range(4):
        value = data[first + k]
        stream = _put(out, stream, literal_bits[value], literal_widths[value])
    left = n_bytes - 4
    while left > 0:
        length = min(left, _MATCH_MAX)
        if 0 < left - length < 3:  # the last match must be at least 3 long
            length = left - 3
        stream = _put(out, stream, match_bits[length], match_widths[length])
        left -= length
    return _put(out, stream, 0, 7)  # end of block (symbol 256)


@numba.njit(inline="always")
def _run_end(words, first, value):
    """The index after the run of ``value`` that starts at ``first``, eight words per
    step while it lasts (one branch per step, not per word)."""
    stop = first
    while stop + 8 <= words.size:
        differs = np.uint32(0)
        for k in range(8):
            differs |= words[stop + k] ^ value
        if differs:
            break
        stop += 8
    while stop < words.size and words[stop] == value:
        stop += 1
    return stop


@compile_kernel
def _deflate(prefix, data, words, min_run, out, literal_bits, literal_widths, match_bits, match_widths):
    """Raw deflate stream of ``prefix`` then ``data`` (bytes) into ``out``; ``words``
    is ``data`` as uint32. ``prefix`` is stored; in ``data``, runs of one word at least
    ``min_run`` (>= 8) long become fixed-Huffman blocks. Returns the stream's length.

    A run of 8 or more words holds two words 4 apart among every fourth word, so only
    every fourth word is compared until two match; the run is then found exactly."""
    stream = _put_stored(out, (0, np.uint64(0), 0), prefix, 0, prefix.size)
    stored_from = 0  # first byte of data not yet written
    searched_from = 0  # first word not part of a run already written
    sample = 0
    while sample + 4 < words.size:
        value = words[sample]
        if words[sample + 4] != value:
            sample += 4
            continue
        first = sample
        while first > searched_from and words[first - 1] == value:
            first -= 1
        stop = _run_end(words, first, value)
        if stop - first >= min_run:
            stream = _put_stored(out, stream, data, stored_from, 4 * first)
            stream = _put_run(out, stream, data, 4 * first, 4 * (stop - first), literal_bits, literal_widths, match_bits, match_widths)
            stored_from = 4 * stop
            searched_from = stop
            sample = stop
        else:
            sample += 4
    stream = _put_stored(out, stream, data, stored_from, data.size)
    stream = _put(out, stream, 3, 3)  # final block, fixed Huffman, empty:
    stream = _put(out, stream, 0, 7)  # its end-of-block symbol
    return _align(out, stream)[0]


@numba.njit
def _put_stored_recorded(out, stream, data, first, stop, payloads, count):
    """:func:`_put_stored`, recording each block's content as a row (position in ``out``,
    position in ``data``, size) of ``payloads`` from row ``count`` on."""
    while first < stop:
        size = min(stop - first, _STORED_MAX)
        start = _align(out, _put(out, stream, 0, 3))[0] + 4
        stream = _put_stored(out, stream, data, first, first + size)
        payloads[count, 0] = start
        payloads[count, 1] = first
        payloads[count, 2] = size
        count += 1
        first += size
    return stream, count


@compile_kernel
def _deflate_planned(prefix, data, run_first, run_stop, out, payloads, literal_bits, literal_widths, match_bits, match_widths):
    """Raw deflate stream of ``prefix`` then ``data`` with the given runs of words
    (``run_first`` to ``run_stop``, each one repeated word) as fixed-Huffman blocks and
    everything else stored; records each stored block's content taken from ``data`` in
    ``payloads`` (see :func:`_put_stored_recorded`). Returns the stream's length and the
    number of those blocks."""
    stream = _put_stored(out, (0, np.uint64(0), 0), prefix, 0, prefix.size)
    count = 0
    stored_from = 0
    for r in range(run_first.size):
        stream, count = _put_stored_recorded(out, stream, data, stored_from, 4 * run_first[r], payloads, count)
        first = 4 * run_first[r]
        stream = _put_run(out, stream, data, first, 4 * run_stop[r] - first, literal_bits, literal_widths, match_bits, match_widths)
        stored_from = 4 * run_stop[r]
    stream, count = _put_stored_recorded(out, stream, data, stored_from, data.size, payloads, count)
    stream = _put(out, stream, 3, 3)  # final block, fixed Huffman, empty:
    stream = _put(out, stream, 0, 7)  # its end-of-block symbol
    return _align(out, stream)[0], count


@compile_kernel
def _runs_hold(words, in_runs, value):
    """Whether every word where ``in_runs`` is True equals ``value`` (one pass over the
    whole map: checking run by run costs five times as long)."""
    differs = 0
    for i in range(words.size):
        differs += (words[i] != value) & in_runs[i]
    return differs == 0


@compile_kernel
def _fill_template(framing, framing_stops, payload_first, payload_sizes, data, out):
    """A planned stream rebuilt for new ``data``: ``framing[:framing_stops[0]]``, the
    first payload's bytes of ``data``, the next framing bytes, and so on. Returns its
    length."""
    position = 0
    taken = 0
    for k in range(framing_stops.size):
        size = framing_stops[k] - taken
        _copy_bytes(out, position, framing, taken, size)
        position += size
        taken = framing_stops[k]
        _copy_bytes(out, position, data, payload_first[k], payload_sizes[k])
        position += payload_sizes[k]
    size = framing.size - taken
    _copy_bytes(out, position, framing, taken, size)
    return position + size


@dataclass(frozen=True)
class _Template:
    """A planned stream without its stored contents: everything else (``framing``) and
    where each stored content goes (after ``framing_stops[k]`` framing bytes) and comes
    from (``payload_first``, ``payload_sizes``, in the map's bytes)."""

    framing: np.ndarray
    framing_stops: np.ndarray
    payload_first: np.ndarray
    payload_sizes: np.ndarray

    @classmethod
    def of(cls, stream: np.ndarray, payloads: np.ndarray) -> "_Template":
        """The template of a planned ``stream`` whose stored contents are ``payloads``."""
        starts, sizes = payloads[:, 0], payloads[:, 2]
        before = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # payload bytes before each
        keep = np.ones(stream.size, dtype=bool)
        keep[np.repeat(starts - before, sizes) + np.arange(int(sizes.sum()))] = False
        return cls(stream[keep], starts - before, payloads[:, 1].copy(), sizes.copy())


class _ExpectedRuns:
    """Word runs that maps of one size usually hold (the voxels outside a connectome's
    brain mask), with the templates of the streams planned around them, one per header
    and repeated word (the stream's framing depends on nothing else)."""

    def __init__(self, run_first: np.ndarray, run_stop: np.ndarray, n_words: int):
        self.run_first = run_first
        self.run_stop = run_stop
        edges = np.zeros(n_words + 1, dtype=np.int8)
        np.add.at(edges, run_first, 1)
        np.add.at(edges, run_stop, -1)
        self.in_runs = np.cumsum(edges[:-1], dtype=np.int8).astype(np.bool_)
        self._templates: dict[tuple[bytes, int], _Template] = {}
        self._lock = threading.Lock()

    def deflate(self, head: np.ndarray, data: np.ndarray, words: np.ndarray, out: np.ndarray) -> int:
        """The raw deflate stream of ``head`` then ``data`` into ``out``; -1 (nothing
        written) when ``words`` do not hold one value over all the runs."""
        if self.run_first.size == 0:
            return -1
        value = words[self.run_first[0]]
        if not _runs_hold(words, self.in_runs, value):
            return -1
        key = (head.tobytes(), int(value))
        with self._lock:
            template = self._templates.get(key)
        if template is not None:
            return _fill_template(template.framing, template.framing_stops, template.payload_first, template.payload_sizes, data, out)
        payloads = np.empty((self.run_first.size + data.size // _STORED_MAX + 2, 3), dtype=np.int64)
        size, count = _deflate_planned(
            head, data, self.run_first, self.run_stop, out, payloads, _LITERAL_BITS, _LITERAL_WIDTHS, _MATCH_BITS, _MATCH_WIDTHS
        )
        with self._lock:
            if len(self._templates) >= _TEMPLATES_MAX:
                self._templates.clear()
            self._templates[key] = _Template.of(out[:size].copy(), payloads[:count])
        return size


_TEMPLATES_MAX = 16
_EXPECTED_MAX = 4  # layouts kept per map size
_EXPECTED: dict[int, list[_ExpectedRuns]] = {}
_EXPECTED_LOCK = threading.Lock()


def expect_constant(outside: np.ndarray) -> None:
    """Tell the encoder where maps of ``outside.size`` voxels usually repeat one value:
    where ``outside`` (flat, in the order the voxels are written) is True, e.g. outside
    a connectome's brain mask.

    Every map of that size is checked (each run of at least :data:`MIN_RUN_VOXELS` such
    voxels must hold one value); one that passes is written from a template of its
    stream, planned once per header and value, with no search for runs (a third of
    the time). Any other map is encoded as before; the file decompresses to the same
    bytes either way (runs elsewhere in a passing map are then stored, not deflated).
    """
    flat = np.asarray(outside, dtype=bool).reshape(-1)
    first, stop = _long_runs(flat)
    with _EXPECTED_LOCK:
        known = _EXPECTED.setdefault(flat.size, [])
        if any(np.array_equal(e.run_first, first) and np.array_equal(e.run_stop, stop) for e in known):
            return  # announced before (each group of a cohort announces it again)
        known.insert(0, _ExpectedRuns(first, stop, flat.size))
        del known[_EXPECTED_MAX:]


_PREPARED = threading.Event()


def prepare() -> None:
    """Load every kernel of the encoder now (from numba's cache: tens of milliseconds
    each, holding the GIL), with the argument types of real maps; later calls return at
    once. Run it where the GIL is free, e.g. on a thread during a connectome pass."""
    if _PREPARED.is_set():
        return
    volume = np.zeros((4, 4, 4), dtype=np.float32, order="F")
    volume[1:3, 1:3, 1:3] = 0.5
    outside = (volume == 0).reshape(-1, order="F")
    expected = _ExpectedRuns(*_long_runs(outside), outside.size)
    for _ in range(2):  # the stream planned, then filled from its template
        _encode(b"header", volume, [expected])
    broken = volume.copy(order="F")
    broken[0, 0, 0] = 0.25  # a run does not hold: searched for
    _encode(b"header", broken, [expected])
    _PREPARED.set()


def plan(prefix: bytes, n_voxels: int, fill: float) -> None:
    """Plan now the stream of ``n_voxels``-voxel float32 maps after ``prefix`` that hold
    ``fill`` where an announced layout (:func:`expect_constant`) repeats one value, so
    that the first such map written is filled from its template too (planning one
    costs about 15 ms)."""
    gzip_map_bytes(prefix, np.full(n_voxels, fill, dtype=np.float32))


def prepare_in_background(then=None) -> None:
    """:func:`prepare`, then ``then()`` (e.g. calls of :func:`plan`), on a thread of its
    own (nothing when prepared already and nothing follows). A failure is only logged:
    the first map that needs the item meets it again."""
    if _PREPARED.is_set() and then is None:
        return

    def prepare_and_plan() -> None:
        try:
            prepare()
            if then is not None:
                then()
        except Exception as exc:
            log.debug("preparing the map encoder failed: %s", exc)

    threading.Thread(target=prepare_and_plan, name="lacuna-encoder-warm-up", daemon=True).start()


def _long_runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and stop indices of the runs of True in ``flat`` at least
    :data:`MIN_RUN_VOXELS` long."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], flat, [False]]).astype(np.int8)))
    first, stop = edges[0::2], edges[1::2]
    long_enough = stop - first >= MIN_RUN_VOXELS
    return first[long_enough].astype(np.int64), stop[long_enough].astype(np.int64)


def _raw_deflate(head: np.ndarray, data: np.ndarray, words: np.ndarray, out: np.ndarray, candidates) -> int:
    """The raw deflate stream of ``head`` then ``data`` into ``out``: from a template
    where the map holds the runs one of the ``candidates`` (:class:`_ExpectedRuns`)
    expects, else by finding its runs."""
    for expected in candidates:
        size = expected.deflate(head, data, words, out)
        if size >= 0:
            return size
    return _deflate(head, data, words, MIN_RUN_VOXELS, out, _LITERAL_BITS, _LITERAL_WIDTHS, _MATCH_BITS, _MATCH_WIDTHS)


def gzip_map_bytes(prefix: bytes, voxels: np.ndarray) -> memoryview:
    """A gzip member of ``prefix`` (a NIfTI header) followed by the bytes of
    ``voxels`` (4-byte values, in the order written, e.g. a Fortran-ordered float32
    volume); runs of one voxel value are deflated, the other bytes stored.

    Returns a read-only bytes-like view (files and hashes take it as it is; ``bytes()``
    copies it) that decompresses to ``prefix + voxels.tobytes(order="A")``. The member
    is built in place, trailer included: a map is not copied after it is encoded.
    """
    voxels = np.asarray(voxels)
    with _EXPECTED_LOCK:
        candidates = list(_EXPECTED.get(voxels.size, ()))
    return _encode(prefix, voxels, candidates)


def _encode(prefix: bytes, voxels: np.ndarray, candidates) -> memoryview:
    if voxels.dtype.itemsize != 4 or not (voxels.flags.c_contiguous or voxels.flags.f_contiguous):
        raise ValueError("gzip_map_bytes needs a contiguous array of 4-byte values")
    words = voxels.reshape(-1, order="A").view(np.uint32)
    data = words.view(np.uint8)
    head = np.frombuffer(prefix, dtype=np.uint8)
    total = head.size + data.size
    # Worst case: everything stored, 5 bytes of framing per 65,535 and per segment.
    out = np.empty(len(_GZIP_HEADER) + total + 5 * (total // _STORED_MAX + 3) + 16, dtype=np.uint8)
    start = len(_GZIP_HEADER)
    out[:start] = np.frombuffer(_GZIP_HEADER, dtype=np.uint8)
    end = start + _raw_deflate(head, data, words, out[start:], candidates)
    checksum = crc32(data, crc32(head))
    out[end : end + 8] = np.frombuffer(struct.pack("<II", checksum & 0xFFFFFFFF, total & 0xFFFFFFFF), dtype=np.uint8)
    member = out[: end + 8]
    member.flags.writeable = False
    return member.data
