"""The three neuron-sparsity definitions and the frequency normalisations, recomputed by hand.

The sparsity test captures every expert's raw gate output with a plain PyTorch forward hook on ``expert.gate``
(not the workbench's hook points, not the recorder), computes each definition with torch, and compares with the
library's DataFrames of a recording of the same run.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_model
from hypothesis import given, settings
from hypothesis import strategies as st

import smallthinker_lab as sl
from smallthinker_lab.instruments import (
    dead_neurons,
    frequency_normalisations,
    frequency_shares,
    hot_share_cap,
    neuron_sparsity_by_expert,
    neuron_sparsity_by_neuron,
    neuron_sparsity_definitions,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# neurons whose gate row is zeroed: gate = 0 for every token, so relu(gate) = 0 always (dead wherever routed)
ZEROED = {(0, 0): [3, 7], (1, 2): [0], (3, 5): [1, 2, 4]}


def _prompts(n, length, seed, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def run():
    model = random_model()
    with torch.no_grad():
        for (layer, e), rows in ZEROED.items():
            model.model.layers[layer].block_sparse_moe.experts[e].gate.weight[rows] = 0.0
    raw: dict[tuple[int, int, str], list[torch.Tensor]] = {}
    current = {"dataset": None}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for e, expert in enumerate(layer.block_sparse_moe.experts):
            def hook(module, args, out, key=(i, e)):
                raw.setdefault((*key, current["dataset"]), []).append(out.detach().clone())
            handles.append(expert.gate.register_forward_hook(hook))
    recs = []
    try:
        for ds, seed in (("a", 1), ("b", 2)):
            current["dataset"] = ds
            recs.append(sl.profile(model, _prompts(3, 10, seed), dataset=ds, max_new_tokens=4, kinds=("neurons",),
                                   progress=False, stop_tokens=[]))
    finally:
        for h in handles:
            h.remove()
    rec = sl.Recording.concat(recs)
    gates = {k: torch.cat(v) for k, v in raw.items()}
    return model, rec, gates


def _pooled(gates, layer, expert, datasets=("a", "b")):
    parts = [gates[(layer, expert, d)] for d in datasets if (layer, expert, d) in gates]
    return torch.cat(parts) if parts else None


def test_hook_sees_the_zeroed_neurons_as_gate_zero(run):
    model, _, gates = run
    for (layer, e), rows in ZEROED.items():
        g = _pooled(gates, layer, e)
        assert g is not None and len(g) > 0, f"expert {e} of layer {layer} was never routed: pick another"
        assert (g[:, rows] == 0).all()


def test_per_pair_and_per_expert_equal_the_raw_gates(run):
    model, rec, gates = run
    F = model.config.moe_ffn_hidden_size
    pairs = rec.to_dataframe("neurons")
    by_expert = neuron_sparsity_by_expert(pairs).set_index(["dataset", "layer", "expert"])
    n_checked = 0
    for (layer, e, ds), g in gates.items():
        inactive = (torch.relu(g) == 0).sum(dim=1)  # per routed pair
        lib = pairs[(pairs.dataset == ds) & (pairs.layer == layer) & (pairs.expert == e)]
        np.testing.assert_array_equal(np.sort(lib["inactive"].to_numpy()), np.sort(inactive.numpy()))
        np.testing.assert_allclose(np.sort(lib["sparsity"].to_numpy()), np.sort((inactive.double() / F).numpy()))
        row = by_expert.loc[(ds, layer, e)]
        assert row["tokens"] == len(g)
        assert row["sparsity"] == pytest.approx(float((torch.relu(g) == 0).double().mean(dim=1).mean()))
        n_checked += 1
    assert n_checked == len(by_expert)  # every (dataset, layer, expert) the library lists was routed, and back


def test_per_neuron_and_dead_neurons_equal_the_raw_gates(run):
    model, rec, gates = run
    counts = rec.to_dataframe("neuron_counts")
    per = neuron_sparsity_by_neuron(counts).set_index(["dataset", "layer", "expert", "neuron"]).sort_index()
    pooled = neuron_sparsity_by_neuron(counts.assign(dataset="all")).set_index(["layer", "expert", "neuron"])
    dead_total = {}
    for layer in range(model.config.num_hidden_layers):
        for e in range(model.config.num_experts):
            g = _pooled(gates, layer, e)
            if g is None:
                assert not (pooled.index.get_level_values("expert")[pooled.index.get_level_values("layer") == layer]
                            == e).any()
                continue
            active = (torch.relu(g) > 0).sum(dim=0)
            mine = pooled.loc[(layer, e)]
            np.testing.assert_array_equal(mine["active"].to_numpy(), active.numpy())
            np.testing.assert_allclose(mine["sparsity"].to_numpy(), (1 - active.double() / len(g)).numpy())
            np.testing.assert_array_equal(mine["dead"].to_numpy(), (active == 0).numpy())
            dead_total[layer] = dead_total.get(layer, 0) + int((active == 0).sum())
            for ds in ("a", "b"):
                if (layer, e, ds) in gates:
                    gd = gates[(layer, e, ds)]
                    np.testing.assert_allclose(per.loc[(ds, layer, e)]["sparsity"].to_numpy(),
                                               (1 - (torch.relu(gd) > 0).sum(0).double() / len(gd)).numpy())
    for (layer, e), rows in ZEROED.items():
        assert pooled.loc[(layer, e)].loc[rows, "dead"].all()
    dead = dead_neurons(counts.assign(dataset="all")).set_index("layer")
    assert dead["dead"].to_dict() == {i: dead_total.get(i, 0) for i in dead.index}
    assert dead.loc[3, "dead"] >= 3 and dead.loc[0, "dead"] >= 2


def test_definitions_summary_from_the_raw_gates(run):
    model, rec, gates = run
    pairs, counts = rec.to_dataframe("neurons"), rec.to_dataframe("neuron_counts")
    summary = neuron_sparsity_definitions(pairs.assign(dataset="all"), counts.assign(dataset="all"))
    assert list(summary["definition"].unique()) == ["pair", "expert", "neuron"]
    s = summary.set_index(["layer", "definition"])
    for layer in range(model.config.num_hidden_layers):
        per_pair, per_expert, per_neuron, weights, dead, n_neurons = [], [], [], [], 0, 0
        for e in range(model.config.num_experts):
            g = _pooled(gates, layer, e)
            if g is None:
                continue
            off = (torch.relu(g) == 0).double()  # (routed tokens, F)
            per_pair.append(off.mean(dim=1))
            per_expert.append(off.mean())
            col = off.mean(dim=0)
            live = off.sum(dim=0) < len(g)
            per_neuron.append(col[live])
            weights.append(torch.full((int(live.sum()),), float(len(g))))
            dead += int((~live).sum())
            n_neurons += off.shape[1]
        by_def = {"pair": torch.cat(per_pair), "expert": torch.stack(per_expert), "neuron": torch.cat(per_neuron)}
        for name, values in by_def.items():
            row = s.loc[(layer, name)]
            v = values.numpy()
            assert row["samples"] == len(v)
            assert row["median"] == pytest.approx(np.median(v))
            assert row["q1"] == pytest.approx(np.quantile(v, 0.25)) and row["q3"] == pytest.approx(
                np.quantile(v, 0.75))
            assert row["min"] == pytest.approx(v.min()) and row["max"] == pytest.approx(v.max())
            assert row["mean"] == pytest.approx(v.mean())
            assert row["dead"] == dead and row["neurons"] == n_neurons
    # the same zeros read along other axes: weighted by routed tokens, the per-neuron values (dead ones at 1)
    # have the per-pair mean
    per = neuron_sparsity_by_neuron(counts.assign(dataset="all"))
    weighted = (per["sparsity"] * per["tokens"]).groupby(per["layer"]).sum() / per.groupby("layer")["tokens"].sum()
    np.testing.assert_allclose(weighted.to_numpy(), summary[summary.definition == "pair"]["mean"].to_numpy())


def test_definitions_reject_missing_columns(run):
    _, rec, _ = run
    with pytest.raises(KeyError, match="active"):
        neuron_sparsity_by_neuron(rec.to_dataframe("neuron_counts").drop(columns="active"))
    with pytest.raises(ValueError, match="by="):
        neuron_sparsity_definitions(rec.to_dataframe("neurons"), rec.to_dataframe("neuron_counts"), by=("sequence",))


# ---------------------------------------------------------------------------------------------- frequency
def _trace(rows, num_experts, top_k):
    """rows: (sequence, layer, [experts of the token]) -> an experts frame like rec.to_dataframe("experts")."""
    recs = []
    for pos, (seq, layer, experts) in enumerate(rows):
        for slot, e in enumerate(experts):
            recs.append({"dataset": "d", "sequence": seq, "step": 0, "position": pos, "layer": layer, "slot": slot,
                         "expert": e, "weight": 1.0 / top_k})
    df = pd.DataFrame(recs)
    df.attrs.update({"num_experts": num_experts, "top_k": top_k})
    return df


def test_frequency_normalisations_on_a_hand_made_trace():
    # 4 tokens, 2 sequences, E = 4, k = 2: expert 0 gets every token, 1 two, 2 and 3 one each
    trace = _trace([(0, 0, [0, 1]), (0, 0, [0, 2]), (0, 0, [0, 1]), (1, 0, [0, 3])], num_experts=4, top_k=2)
    norm = frequency_normalisations(trace).pivot(index="expert", columns="normalisation", values="frequency")
    np.testing.assert_allclose(norm["per_token"], [1.0, 0.5, 0.25, 0.25])
    np.testing.assert_allclose(norm["per_slot"], [0.5, 0.25, 0.125, 0.125])
    np.testing.assert_allclose(norm["max_normalised"], [1.0, 0.5, 0.25, 0.25])
    np.testing.assert_allclose(norm["per_sequence"], [1.0, 0.5, 0.5, 0.5])
    shares = frequency_shares(frequency_normalisations(trace), cold=0.14, hot=(0.4, 0.6)).set_index("normalisation")
    assert list(shares.index) == ["per_token", "per_slot", "max_normalised", "per_sequence"]
    assert shares.loc["per_token", ["cold_share", "hot_share", "band_share"]].tolist() == [0.0, 0.5, 0.25]
    assert shares.loc["per_slot", ["cold_share", "hot_share", "band_share"]].tolist() == [0.5, 0.25, 0.25]
    assert shares.loc["per_sequence", ["cold_share", "hot_share", "band_share"]].tolist() == [0.0, 1.0, 0.75]
    assert (shares["experts"] == 4).all()


def test_hot_share_cap():
    assert hot_share_cap(6, 64) == pytest.approx(6 / 25.6)  # the 21B: 23.4%
    assert hot_share_cap(4, 32) == pytest.approx(0.3125)
    assert hot_share_cap(4, 8) == 1.0
    with pytest.raises(ValueError):
        hot_share_cap(0, 64)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(1, 4), st.integers(1, 40), st.integers(0, 10**6))
def test_per_token_frequencies_sum_to_k_and_hot_share_respects_the_cap(E, k, n_tokens, seed):
    k = min(k, E)
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(E, 0.3))
    rows = [(int(t % 3), 0, rng.choice(E, size=k, replace=False, p=skew).tolist()) for t in range(n_tokens)]
    norm = frequency_normalisations(_trace(rows, E, k))
    per_token = norm[norm.normalisation == "per_token"]
    assert per_token["frequency"].sum() == pytest.approx(k)
    assert norm[norm.normalisation == "per_slot"]["frequency"].sum() == pytest.approx(1.0)
    assert norm[norm.normalisation == "max_normalised"]["frequency"].max() == pytest.approx(1.0)
    assert (norm["frequency"].between(0, 1)).all()
    for threshold in (0.2, 0.4, 0.6):
        assert (per_token["frequency"] >= threshold).mean() <= hot_share_cap(k, E, threshold) + 1e-12
