"""Reads LLaRA's released recommender checkpoints (`torch.save` of a whole nn.Module) safely,
without torch, and converts them to our Flax GRU4Rec / Caser / SASRec params.

A torch checkpoint is a zip archive: `<root>/data.pkl` (a pickle) and raw storages under
`<root>/data/<key>`. Unpickling runs whatever callables the pickle names, so the pickle is
read by a restricted unpickler that resolves only
  - torch's tensor-rebuild functions and typed-storage names, mapped to NumPy equivalents
    that check every offset, shape and stride against the storage they index;
  - nn.Module classes (torch.nn.modules.* and LLaRA's own module classes), mapped to inert
    placeholders that just keep their attribute dict (from which the state dict is read);
  - a few harmless containers and values (OrderedDict, set, numeric NumPy scalars/dtypes,
    the latin-1 byte decoding those use, torch.device as a string).
Any other global raises `UnsafeCheckpointError` naming the file and the global, before
anything is called. Nothing in the archive is ever executed.
"""

import collections
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np

from rsllm_jax.checkpoint.unpickler import BoundedUnpickler
from rsllm_jax.recommenders import models as models_lib


class UnsafeCheckpointError(ValueError):
    """The checkpoint references something the restricted unpickler does not admit."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# LLaRA's model classes: pickled from its training script (`__main__`) and its attention
# module file. Their code is never needed: only their attribute dicts are read.
_LLARA_CLASSES = {
    ("__main__", "SASRec"),
    ("__main__", "GRU"),
    ("__main__", "Caser"),
    ("SASRecModules_ori", "MultiHeadAttention"),
    ("SASRecModules_ori", "PositionwiseFeedForward"),
}


class ModulePlaceholder:
    """Stands in for a pickled nn.Module: pickle's BUILD fills `__dict__`, nothing runs."""

    torch_class = ""

    def __new__(cls, *args, **kwargs):
        del args, kwargs
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        del args, kwargs


class _StorageType:

    def __init__(self, name):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode` as pickle protocol 2 uses it for bytes; only latin-1 is admitted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _numeric_dtype(spec, align=False, copy=False):
    del align, copy
    dtype = np.dtype(spec)
    if dtype.kind not in "biuf":
        raise UnsafeCheckpointError(f"non-numeric NumPy dtype {spec!r} is not allowed")
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise UnsafeCheckpointError("only numeric NumPy scalars are allowed")
    return np.frombuffer(data, dtype, count=1)[0]


def _tensor_view(storage, offset, size, stride):
    """`torch._utils._rebuild_tensor_v2`'s layout on a NumPy storage, with bounds checked."""
    if not isinstance(storage, np.ndarray):
        raise UnsafeCheckpointError("tensor rebuilt from something that is not a storage")
    size, stride, offset = tuple(map(int, size)), tuple(map(int, stride)), int(offset)
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise UnsafeCheckpointError(f"invalid tensor layout: offset {offset}, size {size}, "
                                    f"stride {stride}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise UnsafeCheckpointError(f"tensor layout (offset {offset}, size {size}, stride "
                                        f"{stride}) reaches past its storage of {storage.size}")
    return np.lib.stride_tricks.as_strided(
        storage[offset:] if storage.size > offset else storage[:0], size,
        tuple(s * storage.itemsize for s in stride), writeable=False)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *rest):
    del requires_grad, hooks, rest
    return data


def _device(*args):
    return ":".join(str(a) for a in args)


_ALLOWED = {
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "device"): _device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}

# A LLaRA recommender is a few MB; a checkpoint whose storages and tensors need more is refused
# before they are read (a small zip can declare gigabytes: a zip bomb, or a tensor repeating one
# element with stride 0).
MAX_BYTES = 1 << 30
MAX_PICKLE_BYTES = 64 << 20


class _RestrictedUnpickler(BoundedUnpickler):

    def __init__(self, data, path, archive, root, max_bytes):
        super().__init__(data)
        self._path, self._archive, self._root = path, archive, root
        self._placeholders = {}
        self._storages = {}
        self._budget = max_bytes  # Bytes still allowed for storages and rebuilt tensors.

    def _spend(self, nbytes, what):
        if nbytes > self._budget:
            raise UnsafeCheckpointError(
                f"{self._path}: {what} needs {nbytes} bytes, more than the {self._budget} left "
                "of the checkpoint's allowance (max_bytes)")
        self._budget -= nbytes

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None,
                        metadata=None):
        del requires_grad, hooks, metadata
        view = _tensor_view(storage, offset, size, stride)
        self._spend(view.size * view.itemsize, f"a tensor of shape {view.shape}")
        return np.array(view)  # A copy: nothing keeps pointing into the archive's buffer.

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module.startswith("torch.nn.modules.") or (module, name) in _LLARA_CLASSES:
            key = f"{module}.{name}"
            if key not in self._placeholders:
                self._placeholders[key] = type(name, (ModulePlaceholder, ), {"torch_class": key})
            return self._placeholders[key]
        raise UnsafeCheckpointError(
            f"{self._path}: refusing to unpickle global {module}.{name}: only torch tensor "
            "rebuilding, nn.Module classes and plain containers are allowed")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self._path}: unexpected persistent id {pid!r}")
        _, storage_type, key, _, numel = pid
        name = f"{self._root}/data/{key}"
        if name in self._storages:  # Tensors sharing a storage read it once.
            return self._storages[name]
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise UnsafeCheckpointError(f"{self._path}: storage {name} is missing") from None
        expected = int(numel) * storage_type.dtype.itemsize
        # The declared size is checked before a byte is decompressed.
        if info.file_size != expected:
            raise UnsafeCheckpointError(f"{self._path}: storage {name} declares {info.file_size} "
                                        f"bytes, {numel} {storage_type.name} elements expected")
        self._spend(expected, f"storage {name}")
        storage = np.frombuffer(self._archive.read(name), storage_type.dtype.newbyteorder("<"))
        self._storages[name] = storage
        return storage


def load_torch_archive(path, max_bytes=MAX_BYTES):
    """Unpickles a torch zip checkpoint with the restricted unpickler: tensors become NumPy
    arrays, nn.Modules `ModulePlaceholder`s. Storages and tensors together may take at most
    `max_bytes`, each storage exactly the bytes its pickle expects. Raises
    UnsafeCheckpointError / ValueError."""
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a torch zip checkpoint ({e})") from e
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one <root>/data.pkl in the archive, found "
                             f"{len(pickles)}")
        root = pickles[0][:-len("/data.pkl")]
        if f"{root}/byteorder" in archive.namelist():
            if archive.getinfo(f"{root}/byteorder").file_size > 16:
                raise ValueError(f"{path}: {root}/byteorder is not a byte order")
            if archive.read(f"{root}/byteorder").strip() != b"little":
                raise ValueError(f"{path}: big-endian checkpoints are not supported")
        if archive.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
            raise UnsafeCheckpointError(f"{path}: {pickles[0]} declares "
                                        f"{archive.getinfo(pickles[0]).file_size} bytes, more "
                                        f"than the {MAX_PICKLE_BYTES} a checkpoint's pickle needs")
        unpickler = _RestrictedUnpickler(archive.read(pickles[0]), path, archive, root, max_bytes)
        try:
            return unpickler.load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, ValueError, IndexError,
                KeyError, struct.error, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path}: malformed checkpoint ({type(e).__name__}: "
                             f"{e})") from e


def module_state(module, prefix=""):
    """A placeholder module's state dict: {'a.b.weight': array} like nn.Module.state_dict()."""
    state = {}
    for key in ("_parameters", "_buffers"):
        for name, value in module.__dict__.get(key, {}).items():
            if value is not None:
                state[prefix + name] = value
    for name, child in module.__dict__.get("_modules", {}).items():
        if child is not None:
            state.update(module_state(child, f"{prefix}{name}."))
    return state


# LLaRA's class → our model name.
_MODEL_NAMES = {"SASRec": "sasrec", "GRU": "gru4rec", "Caser": "caser"}


def sasrec_params(s):
    """Our SASRec's model-specific parameters from a LLaRA SASRec state dict (NumPy arrays)."""
    linear = lambda n: dict(kernel=s[f"{n}.weight"].T, bias=s[f"{n}.bias"])
    conv = lambda n: dict(kernel=s[f"{n}.weight"][:, :, 0].T, bias=s[f"{n}.bias"])
    norm = lambda n: dict(scale=s[f"{n}.weight"], bias=s[f"{n}.bias"])
    return dict(positional_embeddings=dict(embedding=s["positional_embeddings.weight"]),
                ln_1=norm("ln_1"), ln_2=norm("ln_2"), ln_3=norm("ln_3"),
                query=linear("mh_attn.linear_q"), key=linear("mh_attn.linear_k"),
                value=linear("mh_attn.linear_v"), ffn_in=conv("feed_forward.w_1"),
                ffn_out=conv("feed_forward.w_2"), ffn_norm=norm("feed_forward.layer_norm"))


def gru_params(s):
    """Our GRU4Rec's recurrent-cell parameters from a LLaRA GRU state dict."""
    # Flax `input_bias` is torch's b_ih and `hidden_bias` its b_hh: same gate layout (r, z, n).
    return dict(input_kernel=s["gru.weight_ih_l0"].T, input_bias=s["gru.bias_ih_l0"],
                hidden_kernel=s["gru.weight_hh_l0"].T, hidden_bias=s["gru.bias_hh_l0"])


def caser_params(s, filter_sizes):
    """Our Caser's convolution parameters from a LLaRA Caser state dict."""
    params = {}
    for i, size in enumerate(filter_sizes):
        weight = s[f"horizontal_cnn.{i}.weight"]  # (filters, 1, size, hidden)
        params[f"horizontal_kernel_{size}"] = weight[:, 0].transpose(1, 2, 0)
        params[f"horizontal_bias_{size}"] = s[f"horizontal_cnn.{i}.bias"]
    params["vertical_kernel"] = s["vertical_cnn.weight"][0, 0, :, 0]
    params["vertical_bias"] = s["vertical_cnn.bias"][0]
    return params


def import_llara_recommender(path, num_items=None):
    """(model, params) for a LLaRA recommender checkpoint (SASRec, GRU or Caser).

    `model` is our Flax module with the checkpoint's sizes; `params` its {"params": ...} tree
    (float32 NumPy arrays), scoring exactly as LLaRA's eval-mode forward does. `num_items`,
    when given, must match the checkpoint (the catalogue of the data it will score).
    """
    path = os.fspath(path)
    root = load_torch_archive(path)
    if not isinstance(root, ModulePlaceholder):
        raise ValueError(f"{path}: expected a pickled LLaRA model, found {type(root).__name__}")
    cls = root.torch_class.rsplit(".", 1)[-1]
    if cls not in _MODEL_NAMES:
        raise ValueError(f"{path}: {root.torch_class} is not one of LLaRA's recommenders "
                         f"({', '.join(_MODEL_NAMES)})")
    state = module_state(root)
    for name, value in state.items():  # NaN weights would score every item NaN: HR@1 0.
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            bad = int(value.size - np.isfinite(value).sum())
            if bad:
                raise ValueError(f"{path}: tensor {name} holds {bad} non-finite value(s) of "
                                 f"{value.size}; refusing to import it")
    attrs, children = root.__dict__, root.__dict__.get("_modules", {})
    try:
        table = state["item_embeddings.weight"]
        items = int(attrs.get("item_num", state["s_fc.weight"].shape[0]))
        hidden = int(table.shape[1])
        max_len = int(attrs.get("state_size", 10))
        if table.shape[0] != items + 1 or state["s_fc.weight"].shape[0] != items:
            raise ValueError(f"{path}: item table {table.shape} / head "
                             f"{state['s_fc.weight'].shape} do not fit {items} items")
        if num_items is not None and items != num_items:
            raise ValueError(f"{path}: the checkpoint scores {items} items, the catalogue has "
                             f"{num_items}")
        name = _MODEL_NAMES[cls]
        kwargs = dict(hidden_size=hidden, max_len=max_len)
        if name == "sasrec":
            specific = sasrec_params(state)
            kwargs["num_heads"] = int(children["mh_attn"].__dict__.get("num_heads", 1))
        elif name == "gru4rec":
            if "gru.weight_ih_l1" in state:
                raise ValueError(f"{path}: multi-layer GRUs are not supported")
            specific = gru_params(state)
        else:
            sizes = tuple(
                int(state[f"horizontal_cnn.{i}.weight"].shape[2])
                for i in range(len(children["horizontal_cnn"].__dict__["_modules"])))
            kwargs["filter_sizes"] = sizes
            kwargs["num_filters"] = int(state["horizontal_cnn.0.weight"].shape[0])
            specific = caser_params(state, sizes)
    except KeyError as e:
        raise ValueError(f"{path}: {cls} checkpoint lacks {e}") from None
    params = dict(item_embeddings=dict(embedding=table), head_kernel=state["s_fc.weight"].T,
                  head_bias=state["s_fc.bias"], **specific)
    model = models_lib.build_model(name, items, **kwargs)
    as_float32 = lambda tree: {
        k: as_float32(v) if isinstance(v, dict) else np.asarray(v, np.float32)
        for k, v in tree.items()
    }
    return model, {"params": as_float32(params)}
