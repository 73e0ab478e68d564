"""An adapter that read_adapter already read goes into load_adapter and restore_adapter (training
resume) without its file being read and hashed a second time."""
import copy
import pickle
import re

import pytest
import torch
from _model_helpers import TARGETS, TinyNet, inputs, perturb

import loldu
from loldu import AdapterError, LoLDUConfig, adapter_io
from loldu.adapter_io import WEIGHTS_NAME, AdapterFile


def trained(base, rank=3):
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=rank, target_modules=TARGETS))
    perturb(model)
    return model


@pytest.fixture
def counts(monkeypatch):
    """How often the adapter file is read and its tensor data hashed."""
    seen = {"read": 0, "hash": 0}
    read, data_hash = adapter_io._read_bytes, adapter_io._data_hash

    def counted_read(path):
        seen["read"] += 1
        return read(path)

    def counted_hash(tensors):
        seen["hash"] += 1
        return data_hash(tensors)

    monkeypatch.setattr(adapter_io, "_read_bytes", counted_read)
    monkeypatch.setattr(adapter_io, "_data_hash", counted_hash)
    return seen


def test_load_adapter_takes_what_read_adapter_read(tmp_path, counts):
    base = TinyNet()
    model = trained(base)
    loldu.save_adapter(model, tmp_path)
    counts.update(read=0, hash=0)
    stored = adapter_io.read_adapter(tmp_path)
    header, config, tensors = stored  # still the (header, config, tensors) tuple
    assert stored.header is header and stored.config is config and stored.tensors is tensors
    assert stored.source == tmp_path / WEIGHTS_NAME
    fresh = loldu.load_adapter(copy.deepcopy(base), stored)
    assert counts == {"read": 1, "hash": 1}
    ids, img = inputs()
    for a, b in zip(fresh(ids, img), model(ids, img)):
        assert torch.equal(a, b)
    # the same AdapterFile loads again (its tensors are copied into the model, not taken over)
    again = loldu.load_adapter(copy.deepcopy(base), stored, is_trainable=True)
    for (_, la), (_, lb) in zip(loldu.adapted_layers(again), loldu.adapted_layers(fresh)):
        assert torch.equal(la.loldu_z["default"], lb.loldu_z["default"])
    assert counts == {"read": 1, "hash": 1}


def test_an_adapter_file_is_refused_naming_its_file(tmp_path):
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path)
    stored = adapter_io.read_adapter(tmp_path)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.fc1.weight.add_(1.0)  # another base: the fingerprint check still runs on an AdapterFile
    before = {n: p.detach().clone() for n, p in other.state_dict().items()}
    with pytest.raises(AdapterError, match=re.escape(str(tmp_path / WEIGHTS_NAME)) + ".*fingerprint differs"):
        loldu.load_adapter(other, stored)
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_adapter_file_pickles(tmp_path):
    loldu.save_adapter(trained(TinyNet()), tmp_path)
    stored = adapter_io.read_adapter(tmp_path)
    back = pickle.loads(pickle.dumps(stored))
    assert isinstance(back, AdapterFile) and back.source == stored.source and back.header == stored.header


def test_resume_reads_the_checkpoint_once(tmp_path, counts):
    pytest.importorskip("transformers")
    from loldu.trainer import restore_adapter

    base = TinyNet()
    model = trained(base)
    loldu.save_adapter(model, tmp_path)
    saved = {n: layer.loldu_z["default"].detach().clone() for n, layer in loldu.adapted_layers(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    perturb(model, scale=2.0)
    counts.update(read=0, hash=0)
    restore_adapter(model, tmp_path)
    assert counts == {"read": 1, "hash": 1}
    for n, layer in loldu.adapted_layers(model):
        assert torch.equal(layer.loldu_z["default"], saved[n])
    assert [p for p in model.parameters() if p.requires_grad] == params  # the same objects, an optimizer's still
