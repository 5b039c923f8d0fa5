"""storage/token_packing.py: id widths, exact pack/unpack round trips (16/17/18 bits and a
few odd widths), row slicing, byte accounting, bf16 bits."""

import numpy as np
import pytest

from storage.token_packing import (
    bf16_bits,
    bytes_per_token,
    counts_bits,
    from_bf16_bits,
    id_bits,
    pack_ids,
    packed_row_bytes,
    unpack_ids,
)


def test_id_bits():
    assert id_bits(50) == 16 and id_bits(49_152) == 16 and id_bits(65_536) == 16
    assert id_bits(65_537) == 17 and id_bits(131_072) == 17 and id_bits(131_073) == 18
    assert id_bits(151_936) == 18 and id_bits(262_144) == 18 and id_bits(262_145) == 19
    with pytest.raises(ValueError):
        id_bits(0)
    assert counts_bits(64) == 8 and counts_bits(255) == 8 and counts_bits(256) == 16


@pytest.mark.parametrize("bits", [16, 17, 18, 3, 13, 32])
@pytest.mark.parametrize("k", [1, 7, 32])
def test_round_trip_exact_including_max_id(bits, k):
    rng = np.random.default_rng(bits * 100 + k)
    top = (1 << bits) - 1
    ids = rng.integers(0, top + 1, size=(37, k), dtype=np.int64)
    ids[0, 0], ids[-1, -1], ids[5] = top, 0, top  # the max id, 0 and an all-max row
    buf = pack_ids(ids, bits)
    assert buf.dtype == np.uint8 and buf.shape == (37, packed_row_bytes(k, bits))
    assert buf.shape[1] == (k * bits + 7) // 8
    back = unpack_ids(buf, bits, ids.shape)
    assert back.dtype == np.int64 and np.array_equal(back, ids)
    assert np.array_equal(unpack_ids(buf.reshape(-1), bits, ids.shape), ids)  # flat buffer too
    # rows are byte-aligned: one row decodes alone
    assert np.array_equal(unpack_ids(buf[5:6], bits, (1, k)), ids[5:6])
    # input dtype does not matter
    assert np.array_equal(pack_ids(ids.astype(np.uint32), bits), buf)


def test_16_bit_is_little_endian_uint16_and_17_bit_layout():
    ids = np.array([[0x1234, 0xFFFF]], np.uint16)
    assert pack_ids(ids, 16).tolist() == [[0x34, 0x12, 0xFF, 0xFF]]
    # 17 bits: id0 = 1 (bit 0), id1 = 1 -> stream bit 17 -> byte 2, bit 1; 5 bytes per row
    buf = pack_ids(np.array([[1, 1]]), 17)
    assert buf.tolist() == [[1, 0, 2, 0, 0]]
    buf = pack_ids(np.array([[1 << 16, 0]]), 17)  # id0's top bit -> stream bit 16
    assert buf.tolist() == [[0, 0, 1, 0, 0]]


def test_refusals():
    with pytest.raises(ValueError, match="ids must lie"):
        pack_ids(np.array([[1 << 17]]), 17)
    with pytest.raises(ValueError, match="ids must lie"):
        pack_ids(np.array([[-1]]), 16)
    with pytest.raises(ValueError, match="do not hold"):
        unpack_ids(np.zeros(9, np.uint8), 17, (2, 2))
    with pytest.raises(ValueError):
        pack_ids(np.zeros(4, np.int64), 16)


@pytest.mark.parametrize("bits,dtype,vbytes", [(16, np.float16, 2), (17, np.float16, 2), (18, np.float32, 4)])
def test_bytes_per_token_matches_packed_topk_rows(bits, dtype, vbytes):
    n, k = 10, 32
    ids = np.random.default_rng(0).integers(0, 1 << bits, size=(n, k))
    values = np.zeros((n, k), dtype)
    tail = np.zeros(n, dtype)
    stored = pack_ids(ids, bits).nbytes + values.nbytes + tail.nbytes
    name = {2: "float16", 4: "float32"}[vbytes]
    assert bytes_per_token(k=k, id_bits=bits, value_dtype=name) == stored / n
    assert bytes_per_token(k=k, id_bits=bits, value_dtype=name, tail=False) == (stored - tail.nbytes) / n
    assert bytes_per_token(k=32, id_bits=16, value_dtype="bfloat16") == 130.0  # 64 + 64 + 2
    assert bytes_per_token(k=32, id_bits=17, value_dtype="bfloat16") == 134.0  # 68 + 64 + 2


def test_bytes_per_token_sampled_ragged_rows():
    u = np.array([3, 10, 1, 64])  # unique ids per row
    rows = [pack_ids(np.zeros((1, n), np.int64), 16).nbytes + n + 1 for n in u]  # ids + uint8 counts + uint8 length
    assert bytes_per_token(k=u, id_bits=16, counts_bits=8, tail=False) == np.mean(rows)
    assert bytes_per_token(k=20, id_bits=16, counts_bits=8, tail=False, length_bytes=0) == 60.0
    assert bytes_per_token(k=5, id_bits=17, counts_bits=8, tail=False) == 11 + 5 + 1
    with pytest.raises(ValueError):
        bytes_per_token(k=5, id_bits=16, counts_bits=8)  # tail given for a sampled label


def test_bf16_bits_round_trip_and_rounding():
    x = np.array([1.0, -2.5, 0.0, 3.140625, np.inf, -np.inf], np.float32)
    assert np.array_equal(from_bf16_bits(bf16_bits(x)), x)  # exactly representable in bf16
    y = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 10
    back = from_bf16_bits(bf16_bits(y))
    assert np.all(np.abs(back - y) <= np.abs(y) * 2.0**-8)  # half an ulp of an 8-bit mantissa
    assert np.isnan(from_bf16_bits(bf16_bits(np.array([np.nan], np.float32))))[0]
    assert (
        bf16_bits(np.array([1.0 + 2.0**-8], np.float32))[0] == bf16_bits(np.array([1.0], np.float32))[0]
    )  # ties to even


def test_bf16_bits_agree_with_torch():
    torch = pytest.importorskip("torch")
    y = (np.random.default_rng(2).standard_normal(4096) * 30).astype(np.float32)
    want = torch.from_numpy(y).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16_bits(y), want)


def test_logprob_codes_round_trip_and_range():
    from storage.token_packing import LOGPROB_STEP, from_logprob_codes, logprob_codes

    lp = np.array([0.0, -0.03, -1.0, -15.9, -40.0, -np.inf])
    codes = logprob_codes(lp)
    assert codes.dtype == np.uint8 and codes.tolist() == [0, 0, 16, 254, 255, 255]
    back = from_logprob_codes(codes)
    assert back.dtype == np.float32 and back[4] == np.float32(-255 * LOGPROB_STEP)
    x = -np.random.default_rng(3).uniform(0, 15.9, 1000)
    assert np.abs(from_logprob_codes(logprob_codes(x)) - x).max() <= LOGPROB_STEP / 2 + 1e-6
    assert bytes_per_token(k=32, id_bits=16, value_dtype="uint8") == 97.0  # 64 + 32 + 1
