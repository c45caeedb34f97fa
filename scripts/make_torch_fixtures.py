#!/usr/bin/env python3
"""Writes small PyTorch-format checkpoints without needing torch, for the reader's tests:
tests/data/views_zip.pth (zip format) and tests/data/views_legacy.pth (legacy stream format).

Both hold the same three tensors, chosen to exercise what real checkpoints do:
  a: float32 [2, 3] stored transposed (strides (1, 2)) at storage offset 4 of a shared storage
  b: float16 [4] with stride 2 (every other element)
  c: float32 [3] sharing a's storage at offset 0
and a nested {'state_dict': ..., 'epoch': 3} wrapper with a `module.` prefix, as training scripts save.
Expected values are asserted in src/weights/torch.rs tests.
"""
import collections
import io
import pickle
import struct
import sys
import types
import zipfile

# Fake `torch` modules so pickle records the same GLOBALs torch.save writes.
torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
sys.modules["torch"] = torch
sys.modules["torch._utils"] = utils


def _rebuild_tensor_v2(*args):
    raise NotImplementedError


_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2


class FloatStorage:
    pass


class HalfStorage:
    pass


FloatStorage.__module__ = HalfStorage.__module__ = "torch"
torch.FloatStorage, torch.HalfStorage = FloatStorage, HalfStorage


class Storage:
    def __init__(self, key, kind, values):
        self.key, self.kind, self.values = key, kind, values


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (_rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


shared = Storage("0", FloatStorage, [float(i) for i in range(10)])
halves = Storage("1", HalfStorage, [0.5, -1.0, 1.5, -2.0, 2.5, -3.0, 3.5, -4.0])
state = collections.OrderedDict(
    [
        ("module.a", Tensor(shared, 4, (2, 3), (1, 2))),
        ("module.b", Tensor(halves, 0, (4,), (2,))),
        ("module.c", Tensor(shared, 0, (3,), (1,))),
    ]
)
obj = {"state_dict": state, "epoch": 3}


def raw(storage):
    fmt = "<%d%s" % (len(storage.values), "f" if storage.kind is FloatStorage else "e")
    return struct.pack(fmt, *storage.values)


class ZipPickler(pickle.Pickler):
    def persistent_id(self, o):
        if isinstance(o, Storage):
            return ("storage", o.kind, o.key, "cpu", len(o.values))
        return None


class LegacyPickler(pickle.Pickler):
    def persistent_id(self, o):
        if isinstance(o, Storage):
            return ("storage", o.kind, o.key, "cpu", len(o.values), None)
        return None


def main(out_dir):
    buf = io.BytesIO()
    ZipPickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(f"{out_dir}/views_zip.pth", "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for s in (shared, halves):
            z.writestr(f"archive/data/{s.key}", raw(s))

    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    LegacyPickler(buf, protocol=2).dump(obj)
    pickle.dump([shared.key, halves.key], buf, protocol=2)
    for s in (shared, halves):
        buf.write(struct.pack("<q", len(s.values)))
        buf.write(raw(s))
    open(f"{out_dir}/views_legacy.pth", "wb").write(buf.getvalue())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
