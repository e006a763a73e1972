"""Convert musicnn's MSD_musicnn TensorFlow-1 checkpoint into genre_batch/analysis/musicnn_msd.onnx.

Reads the checkpoint without TensorFlow: a tensor bundle is an SSTable (LevelDB table format) whose
keys are variable names and whose values are BundleEntryProto messages pointing at raw little-endian
data in the .data shard (each tensor's CRC-32C is checked). Batch norms (inference mode, epsilon 1e-3
as tf.compat.v1.layers uses) are folded into per-channel scale and shift, and the network of musicnn's
models.build_musicnn is written as an ONNX graph with float32 weights, run by onnxruntime at runtime
(measured faster than a numpy forward pass on one thread; see genre_batch/analysis/musicnn.py).

Usage (musicnn 0.1.0 is on PyPI; its declared requirements are obsolete, so no dependencies):
    pip install -e '.[convert]'   # the onnx package, needed by this script only
    pip download musicnn==0.1.0 --no-deps -d /tmp/musicnn && unzip -q /tmp/musicnn/musicnn-0.1.0-*.whl -d /tmp/musicnn
    python scripts/convert_musicnn.py /tmp/musicnn/musicnn/MSD_musicnn
It prints the SHA-256 to record in musicnn.py (MODEL_SHA256) and LICENSE-musicnn.md; reruns are byte-identical.

    python scripts/convert_musicnn.py /tmp/musicnn/musicnn/MSD_vgg --out /tmp/msd_vgg.onnx
converts the MSD VGG variant instead (issue #14's cheaper alternative), for bench/embedding_probe.py --vgg only: it is
measured, not shipped (README, Accuracy), and not checked against the TensorFlow network.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TABLE_MAGIC = 0xDB4775248B80FB57
BN_EPSILON = 1e-3
DT_FLOAT = 1
OPSET = 18  # ReduceMax/ReduceMin take axes as an input from opset 18
IR_VERSION = 8  # the oldest IR that carries opset 18, so older onnxruntime releases load the file
OUT_DIR = Path(__file__).resolve().parents[1] / "genre_batch" / "analysis"

# (layer name in the ONNX graph, TF1 conv/dense scope, TF1 batch-norm scope applied after it)
LAYERS = [
    ("timbral74", "conv2d", "batch_normalization_1"),
    ("timbral77", "conv2d_1", "batch_normalization_2"),
    ("temporal128", "conv2d_2", "batch_normalization_3"),
    ("temporal64", "conv2d_3", "batch_normalization_4"),
    ("temporal32", "conv2d_4", "batch_normalization_5"),
    ("mid1", "conv2d_5", "batch_normalization_6"),
    ("mid2", "conv2d_6", "batch_normalization_7"),
    ("mid3", "conv2d_7", "batch_normalization_8"),
    ("dense", "dense", "batch_normalization_10"),
]
INPUT_BN = "batch_normalization"
POOL_BN = "batch_normalization_9"
OUTPUT_DENSE = "dense_1"


@dataclass(frozen=True)
class Entry:
    """Where one tensor of a bundle lives in its data shard."""

    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at pos; return (value, next position)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Split a protobuf message into (field number, varint value or raw bytes) pairs."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(buf, pos)
        elif wire == 2:
            length, pos = varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, value))
    return fields


def parse_entry(buf: bytes) -> Entry:
    """Decode a BundleEntryProto (dtype, shape, shard_id, offset, size, crc32c)."""
    values = dict.fromkeys(("dtype", "shard", "offset", "size", "crc32c"), 0)
    shape: list[int] = []
    names = {1: "dtype", 3: "shard", 4: "offset", 5: "size", 6: "crc32c"}
    for number, value in proto_fields(buf):
        if number == 2:
            dims = [d for n, d in proto_fields(value) if n == 2]
            shape = [dict(proto_fields(d)).get(1, 0) for d in dims]
        elif number == 7:
            raise ValueError("sliced tensors are not supported")
        elif number in names:
            values[names[number]] = value
    return Entry(shape=tuple(shape), **values)


def block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Decode one uncompressed SSTable block into its (key, value) pairs."""
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * n_restarts
    entries: list[tuple[bytes, bytes]] = []
    pos, key = 0, b""
    while pos < end:
        shared, pos = varint(block, pos)
        unshared, pos = varint(block, pos)
        value_len, pos = varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def read_block(table: bytes, handle: bytes) -> bytes:
    """Return the contents of the block a BlockHandle points at (uncompressed blocks only)."""
    offset, pos = varint(handle, 0)
    size, _ = varint(handle, pos)
    if table[offset + size] != 0:
        raise ValueError("compressed SSTable blocks are not supported")
    return table[offset : offset + size]


def read_bundle_index(index_path: Path) -> dict[str, Entry]:
    """Read a tensor bundle's .index SSTable into {variable name: Entry}."""
    table = Path(index_path).read_bytes()
    if struct.unpack_from("<Q", table, len(table) - 8)[0] != TABLE_MAGIC:
        raise ValueError(f"{index_path} is not an SSTable")
    footer = table[-48:-8]
    _, pos = varint(footer, 0)  # the metaindex handle (offset, size) comes first
    _, pos = varint(footer, pos)
    index_block = read_block(table, footer[pos:])
    entries: dict[str, Entry] = {}
    for _, handle in block_entries(index_block):
        for key, value in block_entries(read_block(table, handle)):
            if key:  # the empty key holds the BundleHeaderProto
                entries[key.decode()] = parse_entry(value)
    return entries


def crc32c_table() -> list[int]:
    """The 256-entry lookup table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    return table


def masked_crc32c(data: bytes, table: list[int]) -> int:
    """CRC-32C of data, masked the way TensorFlow stores it in a BundleEntryProto."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_tensor(data: bytes, name: str, entry: Entry, table: list[int]) -> np.ndarray:
    """Read one float32 tensor from the data shard, checking its stored CRC-32C."""
    if entry.dtype != DT_FLOAT or entry.shard != 0:
        raise ValueError(f"{name}: expected a float32 tensor in shard 0, got {entry}")
    raw = data[entry.offset : entry.offset + entry.size]
    if masked_crc32c(raw, table) != entry.crc32c:
        raise ValueError(f"{name}: CRC-32C mismatch, the checkpoint is corrupt")
    return np.frombuffer(raw, dtype="<f4").reshape(entry.shape).copy()


def read_checkpoint(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Read the named variables of the single-shard checkpoint in folder (musicnn's '.index' files)."""
    entries = read_bundle_index(folder / ".index")
    data = (folder / ".data-00000-of-00001").read_bytes()
    table = crc32c_table()
    return {name: read_tensor(data, name, entries[name], table) for name in names}


def folded_batch_norm(variables: dict[str, np.ndarray], scope: str) -> tuple[np.ndarray, np.ndarray]:
    """Inference-mode batch norm of scope as (scale, shift), computed in float64."""
    gamma, beta, mean, var = (variables[f"{scope}/{v}"].astype(np.float64) for v in ("gamma", "beta", "moving_mean", "moving_variance"))
    scale = gamma / np.sqrt(var + BN_EPSILON)
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def variable_names() -> list[str]:
    """Every checkpoint variable the inference graph reads (no optimiser slots)."""
    bn_scopes = [INPUT_BN, POOL_BN] + [bn for _, _, bn in LAYERS]
    weight_scopes = [scope for _, scope, _ in LAYERS] + [OUTPUT_DENSE]
    return [f"{s}/{v}" for s in bn_scopes for v in ("gamma", "beta", "moving_mean", "moving_variance")] + [
        f"{s}/{v}" for s in weight_scopes for v in ("kernel", "bias")
    ]


def converted_arrays(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The runtime's arrays: kernels, biases and folded batch norms under stable layer names."""
    arrays: dict[str, np.ndarray] = {}
    for name, bn in (("input", INPUT_BN), ("pool", POOL_BN)):
        arrays[f"{name}/scale"], arrays[f"{name}/shift"] = folded_batch_norm(variables, bn)
    for name, scope, bn in LAYERS:
        arrays[f"{name}/kernel"] = variables[f"{scope}/kernel"]
        arrays[f"{name}/bias"] = variables[f"{scope}/bias"]
        arrays[f"{name}/scale"], arrays[f"{name}/shift"] = folded_batch_norm(variables, bn)
    arrays["output/kernel"] = variables[f"{OUTPUT_DENSE}/kernel"]
    arrays["output/bias"] = variables[f"{OUTPUT_DENSE}/bias"]
    return arrays


@dataclass
class Graph:
    """An ONNX graph under construction: initializers and nodes in order."""

    initializers: list[onnx.TensorProto] = field(default_factory=list)
    nodes: list[onnx.NodeProto] = field(default_factory=list)

    def const(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; return its name."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attributes: object) -> str:
        """Add a node with one output named output; return that name."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output


def relu_bn(g: Graph, arrays: dict[str, np.ndarray], z: str, layer: str, shape: tuple[int, ...], output: str = "") -> str:
    """ReLU then the layer's folded inference batch norm (scale, shift reshaped to broadcast as shape)."""
    z = g.op("Relu", [z], f"{layer}_relu")
    z = g.op("Mul", [z, g.const(f"{layer}/scale", arrays[f"{layer}/scale"].reshape(shape))], f"{layer}_scaled")
    return g.op("Add", [z, g.const(f"{layer}/shift", arrays[f"{layer}/shift"].reshape(shape))], output or f"{layer}_bn")


def front_block(g: Graph, arrays: dict[str, np.ndarray], x: str, layer: str, pads: list[int]) -> str:
    """A front-end conv (bias inside), then ReLU + batch norm + max over frequency, [batch, filters, time].

    Pools first: bias, ReLU and a batch norm are monotonic per channel, so max over frequency commutes
    with them exactly, turning into min where the batch-norm scale is negative. Saves passes over the
    largest tensors of the network.
    """
    kernel = arrays[f"{layer}/kernel"].transpose(3, 2, 0, 1)  # TF HWIO -> ONNX OIHW
    z = g.op("Conv", [x, g.const(f"{layer}/W", kernel), g.const(f"{layer}/bias", arrays[f"{layer}/bias"])], layer, pads=pads)
    high = g.op("ReduceMax", [z, "freq_axis"], f"{layer}_max", keepdims=0)
    low = g.op("ReduceMin", [z, "freq_axis"], f"{layer}_min", keepdims=0)
    positive = g.const(f"{layer}/positive_scale", (arrays[f"{layer}/scale"] > 0).reshape(1, -1, 1))
    return relu_bn(g, arrays, g.op("Where", [positive, high, low], f"{layer}_pooled"), layer, (1, -1, 1))


def mid_block(g: Graph, arrays: dict[str, np.ndarray], x: str, layer: str) -> str:
    """A mid-end layer: conv over 7 frames of all features ('same' in time), ReLU, batch norm, [batch, 64, time]."""
    kernel = arrays[f"{layer}/kernel"]  # [7, features, 1, filters]
    weights = kernel[:, :, 0, :].transpose(2, 1, 0)  # -> [filters, features, 7]
    z = g.op("Conv", [x, g.const(f"{layer}/W", weights), g.const(f"{layer}/bias", arrays[f"{layer}/bias"])], layer, pads=[3, 3])
    return relu_bn(g, arrays, z, layer, (1, -1, 1))


def dense(g: Graph, arrays: dict[str, np.ndarray], x: str, layer: str) -> str:
    """x @ kernel + bias of a dense layer."""
    z = g.op("MatMul", [x, g.const(f"{layer}/kernel", arrays[f"{layer}/kernel"])], f"{layer}_matmul")
    return g.op("Add", [z, g.const(f"{layer}/bias", arrays[f"{layer}/bias"])], f"{layer}_linear")


def musicnn_graph(arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """musicnn's build_musicnn (MSD: 64 mid-end filters, 200 back-end units) in inference mode, as ONNX.

    Input "logmel" [batch, 187, 96]; outputs "penultimate" [batch, 200] (dense, ReLU, batch norm) and
    "tags" [batch, 50] (sigmoid of the output layer). Dropout is the identity in inference.
    """
    g = Graph()
    g.const("freq_axis", np.array([3], np.int64))
    g.const("time_axis", np.array([2], np.int64))
    x = g.op("Unsqueeze", ["logmel", g.const("channel_axis", np.array([1], np.int64))], "logmel_nchw")
    x = g.op("Mul", [x, g.const("input/scale", arrays["input/scale"])], "input_scaled")
    x = g.op("Add", [x, g.const("input/shift", arrays["input/shift"])], "input_bn")
    front = [front_block(g, arrays, x, name, [3, 0, 3, 0]) for name in ("timbral74", "timbral77")]
    front += [front_block(g, arrays, x, f"temporal{k}", [(k - 1) // 2, 0, k // 2, 0]) for k in (128, 64, 32)]
    features = [g.op("Concat", front, "frontend", axis=1)]  # [batch, 561, time]
    for layer in ("mid1", "mid2", "mid3"):
        z = mid_block(g, arrays, features[-1], layer)
        features.append(z if layer == "mid1" else g.op("Add", [z, features[-1]], f"{layer}_residual"))
    midend = g.op("Concat", features, "midend", axis=1)  # [batch, 753, time]
    high = g.op("ReduceMax", [midend, "time_axis"], "max_pool")
    mean = g.op("ReduceMean", [midend, "time_axis"], "mean_pool")
    pooled = g.op("Flatten", [g.op("Concat", [high, mean], "pools", axis=2)], "pooled")  # (max, mean) per feature
    pooled = g.op("Mul", [pooled, g.const("pool/scale", arrays["pool/scale"])], "pool_scaled")
    pooled = g.op("Add", [pooled, g.const("pool/shift", arrays["pool/shift"])], "pool_bn")
    penultimate = relu_bn(g, arrays, dense(g, arrays, pooled, "dense"), "dense", (1, -1), output="penultimate")
    g.op("Sigmoid", [dense(g, arrays, penultimate, "output")], "tags")
    graph = helper.make_graph(
        g.nodes,
        "musicnn_msd",
        [helper.make_tensor_value_info("logmel", TensorProto.FLOAT, ["batch", 187, 96])],
        [
            helper.make_tensor_value_info("penultimate", TensorProto.FLOAT, ["batch", 200]),
            helper.make_tensor_value_info("tags", TensorProto.FLOAT, ["batch", 50]),
        ],
        g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="genre-batch convert_musicnn"
    )
    onnx.checker.check_model(model, full_check=True)
    return model


VGG_POOLS = [([4, 1], [2, 2]), ([2, 2], [2, 2]), ([2, 2], [2, 2]), ([2, 2], [2, 2]), ([4, 4], [4, 4])]
"""musicnn's models.vgg: max pooling (time, frequency) window and strides after each of its five 3x3 conv layers."""


def vgg_variable_names() -> list[str]:
    """Every checkpoint variable of musicnn's VGG (MSD: 128 filters) that inference reads."""
    bn = [f"batch_normalization{'' if i == 0 else f'_{i}'}/{v}" for i in range(6) for v in ("gamma", "beta", "moving_mean", "moving_variance")]
    return bn + [f"{s}/{v}" for s in [f"{i}CNN" for i in range(1, 6)] + ["dense"] for v in ("kernel", "bias")]


def vgg_graph(variables: dict[str, np.ndarray]) -> onnx.ModelProto:
    """musicnn's models.vgg in inference mode, as ONNX: input "logmel" [batch, 187, 96]; outputs "pool5" [batch, 256]
    (the last pooling flattened in TensorFlow's (time, frequency, channel) order, musicnn's 'pool5') and "tags"."""
    g = Graph()
    scale, shift = folded_batch_norm(variables, "batch_normalization")
    x = g.op("Unsqueeze", ["logmel", g.const("channel_axis", np.array([1], np.int64))], "logmel_nchw")
    x = g.op("Add", [g.op("Mul", [x, g.const("input/scale", scale)], "input_scaled"), g.const("input/shift", shift)], "input_bn")
    for i, (window, strides) in enumerate(VGG_POOLS, start=1):
        arrays = dict(zip((f"conv{i}/scale", f"conv{i}/shift"), folded_batch_norm(variables, f"batch_normalization_{i}")))
        kernel = variables[f"{i}CNN/kernel"].transpose(3, 2, 0, 1)  # TF HWIO -> ONNX OIHW
        z = g.op("Conv", [x, g.const(f"conv{i}/W", kernel), g.const(f"conv{i}/bias", variables[f"{i}CNN/bias"])], f"conv{i}", pads=[1, 1, 1, 1])
        x = g.op("MaxPool", [relu_bn(g, arrays, z, f"conv{i}", (1, -1, 1, 1))], f"maxpool{i}", kernel_shape=window, strides=strides)
    pool5 = g.op("Flatten", [g.op("Transpose", [x], "maxpool5_nhwc", perm=[0, 2, 3, 1])], "pool5")
    g.op("Sigmoid", [dense(g, {"output/kernel": variables["dense/kernel"], "output/bias": variables["dense/bias"]}, pool5, "output")], "tags")
    graph = helper.make_graph(
        g.nodes,
        "musicnn_msd_vgg",
        [helper.make_tensor_value_info("logmel", TensorProto.FLOAT, ["batch", 187, 96])],
        [helper.make_tensor_value_info("pool5", TensorProto.FLOAT, ["batch", 256]), helper.make_tensor_value_info("tags", TensorProto.FLOAT, ["batch", 50])],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="genre-batch convert_musicnn")
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    """Convert the checkpoint folder given on the command line and print the model's SHA-256."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="musicnn's MSD_musicnn (or MSD_vgg) folder (holds .index and .data-00000-of-00001)")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "musicnn_msd.onnx")
    args = parser.parse_args()
    if args.checkpoint.name == "MSD_vgg":
        arrays = read_checkpoint(args.checkpoint, vgg_variable_names())
        model = vgg_graph(arrays)
    else:
        arrays = converted_arrays(read_checkpoint(args.checkpoint, variable_names()))
        model = musicnn_graph(arrays)
    args.out.write_bytes(model.SerializeToString())
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {sum(a.size for a in arrays.values())} parameters)")
    print(f"sha256 {digest}")


if __name__ == "__main__":
    main()
