"""Importing LLaRA's torch recommender checkpoints without torch, and refusing unsafe ones.

The PyTorch classes below restate LLaRA's model code (its SASRec with the key/query masks of
its attention module, its GRU and Caser), pickled under LLaRA's module names as its released
files are; our import must score exactly as their eval-mode forward does.
"""

import pickle
import sys
import tracemalloc
import types
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from conftest import RunsShellWhenUnpickled  # noqa: E402
from rsllm_jax.checkpoint import llara_rec  # noqa: E402

NUM_ITEMS = 30


class MultiHeadAttention(nn.Module):

    def __init__(self, hidden, heads, dropout):
        super().__init__()
        self.hidden_size, self.num_heads = hidden, heads
        self.linear_q, self.linear_k, self.linear_v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, keys):
        q, k, v = self.linear_q(queries), self.linear_k(keys), self.linear_v(keys)
        split = self.hidden_size // self.num_heads
        q_, k_, v_ = (torch.cat(torch.split(x, split, dim=2), dim=0) for x in (q, k, v))
        logits = torch.bmm(q_, k_.transpose(1, 2)) / self.hidden_size**0.5
        key_mask = torch.sign(torch.abs(keys.sum(-1))).repeat(self.num_heads, 1)
        logits = torch.where(
            key_mask.unsqueeze(1) == 0, torch.full_like(logits, -2**32 + 1), logits)
        causal = torch.tril(torch.ones_like(logits[0]))
        logits = torch.where(causal == 0, torch.full_like(logits, -2**32 + 1), logits)
        weights = torch.softmax(logits, -1)
        query_mask = torch.sign(torch.abs(queries.sum(-1))).repeat(self.num_heads, 1)
        weights = self.dropout(weights * query_mask.unsqueeze(-1))
        out = torch.bmm(weights, v_)
        return torch.cat(torch.split(out, out.shape[0] // self.num_heads, dim=0), dim=2) + queries


class PositionwiseFeedForward(nn.Module):

    def __init__(self, hidden, dropout):
        super().__init__()
        self.w_1, self.w_2 = nn.Conv1d(hidden, hidden, 1), nn.Conv1d(hidden, hidden, 1)
        self.layer_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = self.w_2(torch.relu(self.w_1(x.transpose(1, 2)))).transpose(1, 2)
        return self.layer_norm(self.dropout(out) + x)


class SASRec(nn.Module):

    def __init__(self, hidden=64, items=NUM_ITEMS, state_size=10, dropout=0.1, heads=1):
        super().__init__()
        self.state_size, self.hidden_size, self.item_num = state_size, hidden, items
        self.item_embeddings = nn.Embedding(items + 1, hidden)
        self.positional_embeddings = nn.Embedding(state_size, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.ln_1, self.ln_2, self.ln_3 = (nn.LayerNorm(hidden) for _ in range(3))
        self.mh_attn = MultiHeadAttention(hidden, heads, dropout)
        self.feed_forward = PositionwiseFeedForward(hidden, dropout)
        self.s_fc = nn.Linear(hidden, items)

    def forward(self, states, len_states):
        seq = self.item_embeddings(states) + self.positional_embeddings(
            torch.arange(self.state_size))
        mask = torch.ne(states, self.item_num).float().unsqueeze(-1)
        seq = self.emb_dropout(seq) * mask
        out = self.feed_forward(self.ln_2(self.mh_attn(self.ln_1(seq), seq))) * mask
        out = self.ln_3(out)
        return self.s_fc(out[torch.arange(len(states)), len_states - 1])


class GRU(nn.Module):

    def __init__(self, hidden=64, items=NUM_ITEMS, state_size=10):
        super().__init__()
        self.hidden_size, self.item_num, self.state_size = hidden, items, state_size
        self.item_embeddings = nn.Embedding(items + 1, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.s_fc = nn.Linear(hidden, items)

    def forward(self, states, len_states):
        packed = nn.utils.rnn.pack_padded_sequence(self.item_embeddings(states), len_states,
                                                   batch_first=True, enforce_sorted=False)
        _, hidden = self.gru(packed)
        return self.s_fc(hidden[0])


class Caser(nn.Module):

    def __init__(self, hidden=64, items=NUM_ITEMS, state_size=10, filters=16, sizes=(2, 3, 4)):
        super().__init__()
        self.hidden_size, self.item_num, self.state_size = hidden, items, state_size
        self.num_filters, self.filter_sizes = filters, list(sizes)
        self.item_embeddings = nn.Embedding(items + 1, hidden)
        self.horizontal_cnn = nn.ModuleList([nn.Conv2d(1, filters, (i, hidden)) for i in sizes])
        self.vertical_cnn = nn.Conv2d(1, 1, (state_size, 1))
        self.s_fc = nn.Linear(hidden + filters * len(sizes), items)
        self.dropout = nn.Dropout(0.1)

    def forward(self, states, len_states):
        emb = self.item_embeddings(states) * torch.ne(states, self.item_num).float()[..., None]
        emb = emb.unsqueeze(1)
        pooled = [torch.relu(cnn(emb)).squeeze(3).max(dim=2).values for cnn in self.horizontal_cnn]
        vertical = torch.relu(self.vertical_cnn(emb)).view(-1, self.hidden_size)
        return self.s_fc(self.dropout(torch.cat(pooled + [vertical], 1)))


@pytest.fixture
def llara_names(monkeypatch):
    """Makes the classes picklable under LLaRA's module names (`__main__`, its module file)."""
    ori = types.ModuleType("SASRecModules_ori")
    for cls in (MultiHeadAttention, PositionwiseFeedForward):
        monkeypatch.setattr(cls, "__module__", "SASRecModules_ori")
        setattr(ori, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "SASRecModules_ori", ori)
    for cls in (SASRec, GRU, Caser):
        monkeypatch.setattr(cls, "__module__", "__main__")
        monkeypatch.setattr(sys.modules["__main__"], cls.__name__, cls, raising=False)


def _batch():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 10, 5, 1, 7], np.int64)
    states = rng.integers(0, NUM_ITEMS, (5, 10))
    for row, n in enumerate(lengths):
        states[row, n:] = NUM_ITEMS
    return states, lengths


@pytest.mark.parametrize("cls,expected", [(SASRec, "SASRec"), (GRU, "GRU4Rec"), (Caser, "Caser")])
def test_import_scores_like_torch(llara_names, tmp_path, cls, expected):
    torch.manual_seed(0)
    module = cls().eval()
    path = tmp_path / "model.pt"
    torch.save(module, path)
    model, params = llara_rec.import_llara_recommender(path, num_items=NUM_ITEMS)
    assert type(model).__name__ == expected
    states, lengths = _batch()
    with torch.no_grad():
        reference = module(torch.from_numpy(states), torch.from_numpy(lengths)).numpy()
    ours = model.apply(params, states.astype(np.int32), lengths.astype(np.int32))
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(params["params"]["item_embeddings"]["embedding"],
                                  module.item_embeddings.weight.detach().numpy())
    with pytest.raises(ValueError, match="catalogue has 31"):
        llara_rec.import_llara_recommender(path, num_items=31)


def test_reads_tensors_with_strides_and_offsets(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "transposed": base.t(), "slice": base[1:, 2:5], "ints": torch.arange(5),
        "half": torch.ones(3, dtype=torch.float16)
    }
    torch.save(state, tmp_path / "state.pt")
    loaded = llara_rec.load_torch_archive(tmp_path / "state.pt")
    for key, tensor in state.items():
        np.testing.assert_array_equal(loaded[key], tensor.numpy())
        assert loaded[key].dtype == tensor.numpy().dtype


def test_refuses_malicious_archive_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": RunsShellWhenUnpickled(marker)}, path)
    with pytest.raises(llara_rec.UnsafeCheckpointError) as error:
        llara_rec.load_torch_archive(path)
    assert str(path) in str(error.value) and "system" in str(error.value)
    assert not marker.exists()


def test_refuses_unlisted_classes_and_bad_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"f": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(llara_rec.UnsafeCheckpointError, match="types.SimpleNamespace"):
        llara_rec.load_torch_archive(path)
    not_zip = tmp_path / "plain.pt"
    not_zip.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        llara_rec.load_torch_archive(not_zip)


def _replace_entry(path, suffix, write):
    """Rewrites the torch archive at `path`, the entry ending in `suffix` (deflated) written
    by `write(file)`."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename.endswith(suffix):
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(entry, "w") as f:
                    write(f)
            else:
                archive.writestr(info, data)


def test_zip_bomb_storage_is_refused_before_it_is_read(tmp_path):
    """A storage entry that inflates to far more than its tensor needs: refused by its declared
    size, before a byte of it is decompressed."""
    path = tmp_path / "bomb.pt"
    torch.save({"weight": torch.zeros(10)}, path)
    zero_mib = bytes(1 << 20)

    def bomb(f):
        for _ in range(64):
            f.write(zero_mib)

    with zipfile.ZipFile(path) as archive:
        deflated = [i for i in archive.infolist() if i.filename.endswith("/data/0")]
    assert len(deflated) == 1
    _replace_entry(path, "/data/0", bomb)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(deflated[0].filename)
    assert info.file_size == 64 << 20 and info.compress_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(llara_rec.UnsafeCheckpointError,
                           match=r"data/0 declares 67108864 bytes, 10 FloatStorage elements"):
            llara_rec.load_torch_archive(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"read {peak >> 20} MiB before refusing"


def test_storages_and_tensors_are_capped(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"weight": torch.zeros(1 << 18)}, path)  # 1 MiB.
    with pytest.raises(llara_rec.UnsafeCheckpointError, match=r"needs 1048576 bytes"):
        llara_rec.load_torch_archive(path, max_bytes=1 << 19)
    assert llara_rec.load_torch_archive(path, max_bytes=2 << 20)["weight"].shape == (1 << 18, )
    # One stored element repeated with stride 0: 4 bytes on disk, 4 MiB once rebuilt.
    torch.save({"expanded": torch.zeros(1).expand(1 << 20)}, path)
    with pytest.raises(llara_rec.UnsafeCheckpointError, match=r"tensor of shape \(1048576,\)"):
        llara_rec.load_torch_archive(path, max_bytes=1 << 20)


def test_non_finite_weights_are_refused_naming_the_tensor(llara_names, tmp_path):
    module = SASRec().eval()
    with torch.no_grad():
        module.mh_attn.linear_k.weight[3, 5] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(module, path)
    with pytest.raises(
            ValueError, match=r"nan.pt: tensor mh_attn.linear_k.weight holds 1 "
            r"non-finite value\(s\) of 4096"):
        llara_rec.import_llara_recommender(path, num_items=NUM_ITEMS)


def test_pickle_memo_index_allocates_nothing(tmp_path):
    """A PUT at memo index 2^25: CPython's C unpickler would allocate a 256 MiB memo for it."""
    path = tmp_path / "memo.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl",
                         b"\x80\x04N" + b"r" + (1 << 25).to_bytes(4, "little") + b".")
    tracemalloc.start()
    try:
        assert llara_rec.load_torch_archive(path) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"allocated {peak >> 20} MiB"
