"""Our safetensors reader/writer against the `safetensors` library: each side reads what the other wrote."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from gptoss.io.safetensors_io import CheckpointError, TensorIndex, find_nonfinite, read_header, read_tensor, write_file

BF16 = np.dtype(ml_dtypes.bfloat16)


def torch_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.u8": torch.randint(0, 256, (3, 4, 16), generator=g, dtype=torch.uint8),
        "c.f32": torch.randn(11, generator=g),
        "d.f16": torch.randn(2, 3, 4, generator=g).to(torch.float16),
        "e.i64": torch.randint(-(2**40), 2**40, (6,), generator=g, dtype=torch.int64),
        "f.scalar": torch.tensor(3.25),
        "g.empty": torch.zeros(0, 4),
    }


def as_f32(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def header_bytes(header: dict) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob


# ----------------------------------------------------------------------------------------------- reading


def test_read_files_written_by_safetensors_torch(tmp_path):
    tensors = torch_tensors()
    path = str(tmp_path / "t.safetensors")
    torch_save_file(tensors, path, metadata={"format": "pt"})
    infos = read_header(path)
    assert set(infos) == set(tensors)
    want_dtype = {"a.bf16": "BF16", "b.u8": "U8", "c.f32": "F32", "d.f16": "F16", "e.i64": "I64",
                  "f.scalar": "F32", "g.empty": "F32"}
    for name, t in tensors.items():
        info = infos[name]
        assert info.dtype == want_dtype[name] and info.shape == tuple(t.shape) and info.file == path
        got = read_tensor(info)
        assert got.shape == tuple(t.shape)
        assert got.flags.writeable and got.flags.c_contiguous
        if name == "a.bf16":
            assert got.dtype == BF16
        want = as_f32(t)
        np.testing.assert_array_equal(got.astype(want.dtype), want)


def test_read_bf16_bits_exact(tmp_path):
    """bf16 round trip through torch compares bit patterns too (incl. -0, subnormals, extremes)."""
    vals = torch.tensor([0.0, -0.0, 1.0, -2.5, 1e-40, 3.0e38, -1.17e-38, 0.1], dtype=torch.float32).to(torch.bfloat16)
    path = str(tmp_path / "b.safetensors")
    torch_save_file({"x": vals}, path)
    got = TensorIndex([path]).read("x")
    np.testing.assert_array_equal(got.view(np.uint16), vals.view(torch.int16).numpy().view(np.uint16))


def test_tensor_index_over_several_files(tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    np_save_file({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, a)
    np_save_file({"y": np.arange(4, dtype=np.uint8)}, b)
    idx = TensorIndex([a, b])
    assert idx.names() == {"x", "y"} and "x" in idx and "z" not in idx
    assert idx.info("y").file == b
    np.testing.assert_array_equal(idx.read("x"), np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(idx.read("y"), np.arange(4, dtype=np.uint8))


def test_tensor_in_two_files_is_an_error(tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    np_save_file({"x": np.zeros(2, np.float32)}, a)
    np_save_file({"x": np.ones(2, np.float32)}, b)
    with pytest.raises(CheckpointError, match="'x'.*a.safetensors.*b.safetensors"):
        TensorIndex([a, b])


# ----------------------------------------------------------------------------------------------- writing


def test_write_file_loads_with_safetensors_torch(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "w.bf16": rng.standard_normal((9, 4)).astype(BF16),
        "w.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "w.f16": rng.standard_normal((8,)).astype(np.float16),
        "w.u8": rng.integers(0, 256, (2, 3, 16), dtype=np.uint8),
        "w.i32": rng.integers(-1000, 1000, (5,), dtype=np.int32),
        "w.odd": rng.standard_normal((3,)).astype(np.float16),  # 6 bytes: next tensor starts unaligned
        "w.after_odd": rng.standard_normal((3,)).astype(np.float32),
    }
    codes = {"w.bf16": "BF16", "w.f32": "F32", "w.f16": "F16", "w.u8": "U8", "w.i32": "I32", "w.odd": "F16",
             "w.after_odd": "F32"}
    produced = []

    def producer(name):
        def f():
            produced.append(name)
            return arrays[name]
        return f

    path = str(tmp_path / "ours.safetensors")
    write_file(path, [(n, codes[n], a.shape, producer(n)) for n, a in arrays.items()])
    assert produced == list(arrays)  # streamed in order, each produced once

    loaded = torch_load_file(path)
    assert set(loaded) == set(arrays)
    assert loaded["w.bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["w.bf16"].view(torch.int16).numpy().view(np.uint16),
                                  arrays["w.bf16"].view(np.uint16))
    for name in ("w.f32", "w.f16", "w.u8", "w.i32", "w.odd", "w.after_odd"):
        assert loaded[name].numpy().dtype == arrays[name].dtype, name
        np.testing.assert_array_equal(loaded[name].numpy(), arrays[name])
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_write_file_loads_with_safetensors_numpy_and_custom_metadata(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.array(7.5, np.float32),
              "e": np.zeros((0, 3), np.float32)}
    path = str(tmp_path / "m.safetensors")
    write_file(path, [(n, "F32", a.shape, lambda a=a: a) for n, a in arrays.items()], metadata={"who": "test"})
    loaded = np_load_file(path)
    for name, a in arrays.items():
        assert loaded[name].shape == a.shape
        np.testing.assert_array_equal(loaded[name], a)
    with safe_open(path, framework="np") as f:
        assert f.metadata() == {"who": "test"}
    # and the header is 8-byte aligned, as the format recommends
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    assert n % 8 == 0


def test_write_file_rejects_a_producer_that_lies(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    with pytest.raises(AssertionError, match="x"):
        write_file(path, [("x", "F32", (2, 2), lambda: np.zeros((2, 2), np.float16))])
    with pytest.raises(AssertionError, match="y"):
        write_file(path, [("y", "F32", (2, 2), lambda: np.zeros((4,), np.float32))])


# ----------------------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_find_nonfinite(dtype, bad):
    x = np.linspace(-3, 3, 60, dtype=np.float32).reshape(5, 12)
    x[-1, -1] = 65000.0 if dtype == np.float16 else 3.0e38  # large but finite
    x[0, 0] = -0.0
    x = x.astype(dtype)
    assert find_nonfinite(x) is None
    y = x.copy()
    y[2, 7] = bad
    y[4, 1] = bad
    assert find_nonfinite(y) == 2 * 12 + 7
    assert find_nonfinite(y[3:]) == 12 + 1


def test_find_nonfinite_nan_payloads_and_non_float():
    # every bf16 NaN/Inf bit pattern is caught, every finite one is not
    all_bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    as_bf16 = all_bits.view(BF16)
    finite = np.isfinite(as_bf16.astype(np.float32))
    for i in np.flatnonzero(~finite)[::97]:
        assert find_nonfinite(as_bf16[i:i + 1]) == 0
    assert find_nonfinite(as_bf16[finite]) is None
    f16 = all_bits.view(np.float16)
    assert find_nonfinite(f16[np.isfinite(f16)]) is None
    assert find_nonfinite(np.array([1, 2, 3], np.int32)) is None
    assert find_nonfinite(np.array([255, 0], np.uint8)) is None


# ----------------------------------------------------------------------------------------------- corruption


def good_file(tmp_path):
    path = str(tmp_path / "good.safetensors")
    np_save_file({"x": np.arange(8, dtype=np.float32), "y": np.ones((2, 2), np.float32)}, path)
    return path


def raw_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), f.read()


def rewrite(path, header, data):
    with open(path, "wb") as f:
        f.write(header_bytes(header) + data)


def corrupt_cases():
    def short(p):
        with open(p, "wb") as f:
            f.write(b"\x01\x02\x03")

    def empty(p):
        open(p, "wb").close()

    def huge_len(p):
        with open(p, "r+b") as f:
            f.write(struct.pack("<Q", 10**12))

    def len_past_end(p):
        size = len(open(p, "rb").read())
        with open(p, "r+b") as f:
            f.write(struct.pack("<Q", size))

    def not_json(p):
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", 8) + b"\xff\xfe{notjs" + b"\0" * 64)

    def text_file(p):
        with open(p, "w") as f:
            f.write("this is not a safetensors file at all, it is text " * 4)

    def truncated(p):
        data = open(p, "rb").read()
        with open(p, "wb") as f:
            f.write(data[:-5])

    def bad_dtype(p):
        h, d = raw_header(p)
        h["x"]["dtype"] = "Q7"
        rewrite(p, h, d)

    def span_mismatch(p):
        h, d = raw_header(p)
        h["x"]["shape"] = [9]
        rewrite(p, h, d)

    def offsets_past_end(p):
        h, d = raw_header(p)
        h["y"]["data_offsets"] = [32, 48 + 64]
        h["y"]["shape"] = [4, 5]
        rewrite(p, h, d)

    def missing_field(p):
        h, d = raw_header(p)
        del h["x"]["dtype"]
        rewrite(p, h, d)

    def header_is_list(p):
        h, d = raw_header(p)
        rewrite(p, [1, 2, 3], d)

    def entry_not_dict(p):
        h, d = raw_header(p)
        h["x"] = "oops"
        rewrite(p, h, d)

    def bad_offsets(p):
        h, d = raw_header(p)
        h["x"]["data_offsets"] = [0]
        rewrite(p, h, d)

    def negative_offsets(p):
        h, d = raw_header(p)
        h["x"]["data_offsets"] = [-8, 24]
        rewrite(p, h, d)

    return dict(short=short, empty=empty, huge_len=huge_len, len_past_end=len_past_end, not_json=not_json,
                text_file=text_file, truncated=truncated, bad_dtype=bad_dtype, span_mismatch=span_mismatch,
                offsets_past_end=offsets_past_end, missing_field=missing_field, header_is_list=header_is_list,
                entry_not_dict=entry_not_dict, bad_offsets=bad_offsets, negative_offsets=negative_offsets)


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_header_corruption_raises_checkpoint_error_naming_the_file(tmp_path, case):
    path = good_file(tmp_path)
    corrupt_cases()[case](path)
    # the safetensors library agrees that these files are broken
    with pytest.raises(Exception):  # noqa: B017 - any error from the oracle will do
        np_load_file(path)
    with pytest.raises(CheckpointError) as e:
        TensorIndex([path])
    assert path in str(e.value)


@pytest.mark.parametrize("case", ["truncated", "span_mismatch", "offsets_past_end", "bad_dtype"])
def test_corruption_message_names_the_tensor(tmp_path, case):
    path = good_file(tmp_path)
    corrupt_cases()[case](path)
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    assert "'x'" in str(e.value) or "'y'" in str(e.value)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    path = str(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        TensorIndex([path])


def test_file_shrunk_after_indexing(tmp_path):
    path = good_file(tmp_path)
    idx = TensorIndex([path])
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-4])
    with pytest.raises(CheckpointError, match="truncated.*'y'"):
        idx.read("y")
