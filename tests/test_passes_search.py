"""Budget search: binarize_to_budget, SNLSearchPass, LayerDropSearchPass, FinetunePass."""

from __future__ import annotations

import pytest
import torch

from relucomp.infra import PassManager
from relucomp.models import tinycnn
from relucomp.nn import ReLUGate
from relucomp.passes.finetune import FinetunePass
from relucomp.passes.insert_gates import gates_of
from relucomp.passes.layer_drop import LayerDropSearchPass
from relucomp.passes.snl_search import SNLSearchPass, binarize_to_budget, hard_count


def _gates(granularity, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, shape in enumerate(shapes):
        g = ReLUGate(shape, granularity, site=f"s{i}")
        with torch.no_grad():
            g.alpha.copy_(torch.rand(g.alpha.shape, generator=gen))
        out[g.site] = g
    return out


SHAPES = [(4, 6, 6), (8, 3, 3), (2, 5, 5), (16, 2, 2)]  # 144 + 72 + 50 + 64 = 330 ReLUs


@pytest.mark.parametrize("granularity", ["pixel", "channel", "layer"])
@pytest.mark.parametrize("seed", range(4))
def test_binarize_never_above_budget(granularity, seed):
    total = sum(torch.Size(s).numel() for s in SHAPES)
    for budget in (0, 1, 7, 49, 50, 100, 143, 200, 329, 330, 1000):
        gates = _gates(granularity, SHAPES, seed)
        kept = binarize_to_budget(gates, budget)
        assert kept == hard_count(gates.values()) == sum(g.kept_relus() for g in gates.values())
        assert kept <= budget
        assert all(bool(g.hard) for g in gates.values())
        assert all(set(g.mask.unique().tolist()) <= {0.0, 1.0} for g in gates.values())
        if budget >= total:
            assert kept == total
        if granularity == "pixel":
            assert kept == min(budget, total)  # cost 1 per entry: exactly the budget
        else:
            # greedy is maximal: every dropped entry is more expensive than what is left
            left = budget - kept
            for g in gates.values():
                if (g.mask == 0).any():
                    assert g.elements_per_gate > left


def test_binarize_keeps_highest_scores():
    gates = _gates("pixel", SHAPES, seed=1)
    scores = torch.cat([g.alpha.detach().flatten() for g in gates.values()])
    threshold = scores.sort(descending=True).values[99]
    binarize_to_budget(gates, 100)
    for g in gates.values():
        assert torch.equal(g.mask.bool(), g.alpha.detach() >= threshold)  # alpha == mask after set_mask
    # explicit scores override alpha
    gates = _gates("pixel", SHAPES[:2], seed=2)
    scores = {"s0": torch.zeros(1, 4, 6, 6), "s1": torch.ones(1, 8, 3, 3)}
    assert binarize_to_budget(gates, 72, scores=scores) == 72
    assert gates["s0"].mask.sum() == 0 and gates["s1"].mask.sum() == 72


def test_binarize_mixed_costs():
    ch = ReLUGate((4, 6, 6), "channel", site="ch")  # 36 ReLUs per entry
    px = ReLUGate((3, 2, 2), "pixel", site="px")  # 1 per entry
    with torch.no_grad():
        ch.alpha.copy_(torch.tensor([0.9, 0.2, 0.8, 0.1]).reshape(1, 4, 1, 1))
        px.alpha.fill_(0.5)
    kept = binarize_to_budget({"ch": ch, "px": px}, 80)
    assert kept == 80  # channels 0 and 2 (72), then 8 pixels
    assert ch.mask.flatten().tolist() == [1, 0, 1, 0]
    assert px.mask.flatten().tolist() == [1] * 8 + [0] * 4


def test_binarize_ties_are_deterministic_by_site_order():
    def open_gates():
        return {f"s{i}": ReLUGate((2, 2, 2), "pixel", site=f"s{i}") for i in range(3)}  # all alpha = 1

    g1 = open_gates()
    assert binarize_to_budget(g1, 11) == 11
    assert g1["s0"].mask.sum() == 8 and g1["s1"].mask.sum() == 3 and g1["s2"].mask.sum() == 0
    assert g1["s1"].mask.flatten().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    g2 = open_gates()
    binarize_to_budget(g2, 11)
    assert all(torch.equal(g1[k].mask, g2[k].mask) for k in g1)

    ch = {f"c{i}": ReLUGate((3, 2, 2), "channel", site=f"c{i}") for i in range(2)}  # cost 4 per channel
    assert binarize_to_budget(ch, 18) == 16
    assert ch["c0"].mask.flatten().tolist() == [1, 1, 1] and ch["c1"].mask.flatten().tolist() == [1, 0, 0]


def test_binarize_rejects_negative_budget():
    with pytest.raises(ValueError):
        binarize_to_budget(_gates("pixel", SHAPES), -1)


# --------------------------------------------------------------------------- search passes on tinycnn

def _loader(n_batches=3, batch=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n_batches)]


@pytest.mark.parametrize("granularity, budget", [("pixel", 3000), ("channel", 5000)])
def test_snl_search_meets_budget(make_gated, granularity, budget):
    gm, x = make_gated(tinycnn(), granularity)
    torch.manual_seed(0)
    saved = []
    sp = SNLSearchPass(budget=budget, train_loader=_loader(), teacher=None, epochs=2, lr=0.01, check_every=1,
                       checkpoint=saved.append)
    pm = PassManager([sp], calibration=x)
    res = pm.run(gm)
    st = res.stats["passes"][0]["stats"]
    gates = gates_of(gm)
    assert all(bool(g.hard) for g in gates.values())
    assert st["hard_relus"] == hard_count(gates.values()) <= budget
    assert st["total_relus"] == 20_480 and st["budget"] == budget
    if granularity == "pixel":
        assert st["hard_relus"] == budget
    assert len(st["history"]) == 2 and len(st["lambda_trace"]) == 6  # checked every step
    counts = [t[1] for t in st["lambda_trace"]]
    assert counts[-1] <= counts[0] <= 20_480 and st["soft_relus_at_end"] <= 20_480
    assert [s["epoch"] for s in saved] == [1, 2] and saved[-1]["phase"] == "search"
    assert set(saved[-1]) >= {"model", "optimizer", "optimizer_alpha", "lam", "trace"}
    assert SNLSearchPass(budget=budget, train_loader=_loader())(gm).modified is False


def test_layer_drop_search(make_gated):
    gm, x = make_gated(tinycnn(), "pixel")
    budget = 9000  # room for two of the 4096-ReLU sites, not the 8192 one plus one
    res = PassManager([LayerDropSearchPass(budget=budget, calib_loader=_loader(2))]).run(gm)
    st = res.stats["passes"][0]["stats"]
    gates = gates_of(gm)
    kept = hard_count(gates.values())
    assert kept == st["hard_relus"] <= budget
    assert set(st["criticality"]) == set(gates)
    for site, g in gates.items():
        assert bool(g.hard) and g.mask.sum() in (0, g.mask.numel())
        assert (g.mask.sum() > 0) == (site in st["kept_sites"])
    assert LayerDropSearchPass(budget=budget, calib_loader=_loader(1))(gm).modified is False


def test_finetune_freezes_gates_and_trains_weights(make_gated):
    gm, x = make_gated(tinycnn(), "channel")
    binarize_to_budget(gates_of(gm), 6000)
    masks = {k: g.mask.clone() for k, g in gates_of(gm).items()}
    w0 = gm.conv1.weight.detach().clone()
    assert FinetunePass(train_loader=_loader(), epochs=0)(gm).modified is False
    saved = []
    res = PassManager([FinetunePass(train_loader=_loader(2), epochs=1, checkpoint=saved.append)]).run(gm)
    assert res.modified is True
    assert not torch.equal(gm.conv1.weight.detach(), w0)
    for k, g in gates_of(gm).items():
        assert torch.equal(g.mask, masks[k]) and not g.alpha.requires_grad
    assert saved and saved[-1]["phase"] == "finetune" and saved[-1]["epoch"] == 1
