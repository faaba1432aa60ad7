"""The sequential engine's activation store: disk offload (safetensors) equals memory, bit for bit."""

import copy
import tempfile
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from layerprune.engine.sequential import ActivationStore, run_sequential
from layerprune.models.adapter import ModelAdapter
from layerprune.models.tiny import tiny_model
from layerprune.pruners.unstructured import prune
from layerprune.scorers.outliers import score as outliers


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile.mkdtemp() lands in tmp_path, so that leftovers can be seen."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def activation_folders(tmp):
    """Our temporary folders (torch may put caches of its own, e.g. torchinductor_*, there too)."""
    return sorted(tmp.glob("layerprune-acts-*"))


def test_disk_store_round_trips_dtypes_and_shapes_through_safetensors(private_tmp):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, 10, generator=g)
    tensors = {
        0: base,
        1: base.to(torch.bfloat16),
        2: base.to(torch.float16).transpose(1, 2),  # not contiguous
        3: base.double()[1:3],  # a view with a storage offset
        4: base[0, 0, :1],
    }
    with ActivationStore("disk") as store:
        for b, t in tensors.items():
            store.put(b, t)
        (folder,) = activation_folders(private_tmp)
        files = sorted(folder.iterdir())
        assert [f.suffix for f in files] == [".safetensors"] * 5
        for b, t in tensors.items():
            back = store.get(b, "cpu")
            assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
            (f,) = folder.glob(f"{b}-*.safetensors")
            assert torch.equal(load_file(f)["h"], t)  # a plain safetensors file
        # A block may return its input unchanged: the stored tensor goes back in while a tensor
        # read from its file is alive. The old file must not be overwritten under it.
        h = store.get(0, "cpu")
        store.put(0, h)
        store.put(0, h * 2)
        assert torch.equal(h, base) and torch.equal(store.get(0, "cpu"), base * 2)
        assert len(list(folder.iterdir())) == 5  # one file per micro-batch: the old ones are gone
    assert not activation_folders(private_tmp)


def test_memory_store_and_bad_offload():
    t = torch.randn(2, 3)
    with ActivationStore("memory") as store:
        store.put(0, t)
        assert torch.equal(store.get(0, "cpu"), t)
    with pytest.raises(ValueError, match="memory or disk"):
        ActivationStore("ssd")


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_disk_offload_prunes_exactly_as_memory(pruner, private_tmp):
    model = tiny_model("llama", num_layers=3)
    ids = torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(2))
    targets = {n: 0.5 for n in ModelAdapter(model).layer_names()}
    results = {}
    for offload in ("memory", "disk"):
        m = copy.deepcopy(model)
        achieved = prune(
            m, ModelAdapter(m), ids, targets, pruner, batch_size=2, offload=offload, progress=False
        )
        results[offload] = (achieved, m.state_dict())
    (a_mem, sd_mem), (a_disk, sd_disk) = results["memory"], results["disk"]
    assert a_mem == a_disk and a_mem["2.down"] == pytest.approx(0.5, abs=0.01)
    assert sd_mem.keys() == sd_disk.keys() and all(torch.equal(sd_mem[k], sd_disk[k]) for k in sd_mem)
    assert not activation_folders(private_tmp)


def test_disk_offload_gives_the_same_statistics_and_cleans_up_on_errors(private_tmp):
    model = tiny_model("llama", num_layers=3)
    adapter = ModelAdapter(model)
    windows = SimpleNamespace(
        input_ids=torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(3))
    )
    ratios = {
        offload: outliers(model, adapter, windows, batch_size=2, hyper_m=3.0, offload=offload, progress=False)
        for offload in ("memory", "disk")
    }
    assert ratios["memory"].importance == ratios["disk"].importance
    assert not activation_folders(private_tmp)

    seen = []

    class Stop(Exception):
        pass

    def on_block(i, calibrate):
        (folder,) = activation_folders(private_tmp)
        seen.append(sorted(p.suffix for p in folder.iterdir()))
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        run_sequential(
            model, adapter, windows.input_ids, on_block, batch_size=2, offload="disk", progress=False
        )
    assert seen == [[".safetensors"] * 3] * 2  # 3 micro-batches on disk while the blocks ran
    assert not activation_folders(private_tmp)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_stats_group_the_layers_fed_one_tensor_and_equal_per_layer_statistics(arch):
    from layerprune.engine.sequential import ColumnNorms, Hessian, SharedStats

    model = tiny_model(arch, num_layers=2)
    adapter = ModelAdapter(model)
    ids = torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(1))
    groups, checked = [], []

    def on_block(i, calibrate):
        roles = list(adapter.linears(i))
        shared = SharedStats(roles, Hessian)
        alone = {r: (ColumnNorms(), Hessian()) for r in roles}

        def both(role, x):
            shared(role, x)
            for stat in alone[role]:
                stat.add(x)

        calibrate(both)
        groups.append(shared.groups())
        for r in roles:  # every layer's own statistic, from its own inputs, equals the shared one
            assert torch.equal(shared[r].value(), alone[r][1].value())
            checked.append(r)
        with pytest.raises(KeyError):
            shared["not-a-layer"]

    run_sequential(model, adapter, ids, on_block, batch_size=2, progress=False, modifies=False)
    assert len(checked) == 2 * len(adapter.linears(0))
    if arch == "llama":  # q, k, v read one normed state; gate and up another
        assert groups == [[["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]] * 2
    else:  # GPT-2's fused c_attn: nothing to share
        assert all(len(g) == 1 for gs in groups for g in gs)


def test_shared_stats_never_group_equal_values_in_other_tensors_or_a_changed_tensor():
    from layerprune.engine.sequential import ColumnNorms, SharedStats

    x = torch.rand(6, 4)
    stats = SharedStats(["a", "b", "c", "d", "e"], ColumnNorms)
    stats("a", x)
    stats("b", x.clone())  # equal values, another tensor
    stats("c", x.detach())  # the same tensor as a's, but b came between: its own statistic
    stats("d", x[:, :4])  # same storage, same view: shared with c, so with c's leader
    before = x.clone()
    x.add_(1.0)
    stats("e", x)  # changed in place since: its own statistic
    assert stats.groups() == [["a"], ["b"], ["c", "d"], ["e"]]
    assert torch.equal(stats["e"].norms(), x.pow(2).sum(0).sqrt())
    assert torch.equal(stats["c"].norms(), before.pow(2).sum(0).sqrt())
    stats2 = SharedStats(["a", "b"], ColumnNorms)
    stats2("a", x)
    stats2("b", x)
    stats2("a", x)
    with pytest.raises(RuntimeError, match="shares its input differently"):
        stats2("b", x.clone())
