"""estimate_flops against the matmul FLOPs actually executed (counted with torch's flop registry)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ttte2e.kernels.attention import chunk_backend
from ttte2e.model import PRESETS, TTTConfig, TTTModel, count_parameters, preset
from ttte2e.model.flops import _mean_keys

CFG = TTTConfig(
    vocab_size=512,
    d_model=64,
    n_layers=4,
    n_ttt_blocks=2,
    n_heads=4,
    mlp_hidden=96,
    seq_len=128,
    window=32,
    chunk_size=16,
)


class MatmulFlops(TorchDispatchMode):
    """Sums registry FLOPs of mm/bmm/addmm. CPU fused SDPA is not in the registry: the test adds
    the prefix attention term by hand."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry and "attention" not in str(packet):
            self.total += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


class TermFlops(MatmulFlops):
    """MatmulFlops by term: the phase (forward; the inner gradient = a backward graph task run
    inside the forward; the outer backward) and the region (the head: a dimension V; the
    prefix: B * T rows; else the suffix)."""

    def __init__(self, prefix_rows: int):
        super().__init__()
        self.prefix_rows = prefix_rows
        self.outer = False
        self.terms = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry and "attention" not in str(packet):
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            dims = {n for a in (*args, out) if isinstance(a, torch.Tensor) for n in a.shape}
            phase = (
                "forward"
                if torch._C._current_graph_task_id() == -1
                else "outer"
                if self.outer
                else "inner"
            )
            region = (
                "head"
                if CFG.vocab_size in dims
                else "prefix"
                if self.prefix_rows in dims
                else "suffix"
            )
            self.terms[phase, region] = self.terms.get((phase, region), 0) + flops
            self.total += flops
        return out


def _counted_step(model, tokens, remat, final_update):
    with TermFlops(tokens.shape[0] * CFG.seq_len) as counter, chunk_backend("math"):
        loss = model.meta_loss(tokens, remat=remat, final_update=final_update).loss
        counter.outer = True
        loss.backward()
    return counter


@pytest.mark.parametrize("final_update", [False, True], ids=["training", "final-update"])
def test_every_term_of_the_meta_step_matches_its_counted_matmuls(final_update):
    """The breakdown (`MetaTerms`) term by term against the matmuls the meta step runs (remat
    none: the recompute term separately below)."""
    torch.manual_seed(0)
    model = TTTModel(CFG)
    batch = 2
    tokens = torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len + 1))
    counted = {
        k: v / (batch * CFG.seq_len)
        for k, v in _counted_step(model, tokens, "none", final_update).terms.items()
    }
    est = model.estimate_flops(remat="none", final_update=final_update).meta_terms
    assert set(counted) == {
        ("forward", "prefix"),
        ("forward", "suffix"),
        ("forward", "head"),
        ("inner", "suffix"),
        ("outer", "prefix"),
        ("outer", "suffix"),
        ("outer", "head"),
    }  # nothing of the head or prefix in G
    # the prefix attention runs in fused SDPA (not counted): 4 d keys forward, 2x that backward
    sdpa = CFG.n_prefix_blocks * 4 * CFG.d_model * _mean_keys(CFG.seq_len, CFG.attn_window)
    assert counted["forward", "prefix"] + sdpa == pytest.approx(est.prefix_forward, rel=1e-6)
    assert counted["outer", "prefix"] + 2 * sdpa == pytest.approx(est.prefix_backward, rel=1e-6)
    assert counted["forward", "suffix"] == pytest.approx(est.suffix_forward, rel=1e-6)
    assert counted["forward", "head"] == pytest.approx(est.head_forward, rel=1e-6)
    assert counted["inner", "suffix"] == pytest.approx(est.inner_gradient, rel=1e-6)
    assert counted["outer", "suffix"] == pytest.approx(
        est.outer_backward_forward + est.outer_backward_inner_gradient, rel=1e-6
    )
    # + the softmax's <p, dG> per row (a batched dot product, O(V) per token)
    assert counted["outer", "head"] == pytest.approx(est.outer_backward_head, rel=0.005)


def test_the_trainers_step_skips_the_last_inner_gradient_and_nothing_else():
    """final_update=False: the same loss and meta-gradient, the last chunk's inner gradient (and
    its norm) not taken: fewer matmuls, by the last chunk's G."""
    torch.manual_seed(0)
    model = TTTModel(CFG)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len + 1))
    runs = {}
    for final_update in (True, False):
        model.zero_grad(set_to_none=True)
        out = model.meta_loss(tokens, final_update=final_update)
        out.loss.backward()
        runs[final_update] = out, [p.grad.clone() for p in model.parameters()]
    (full, full_grads), (lean, lean_grads) = runs[True], runs[False]
    assert torch.equal(full.loss, lean.loss) and torch.equal(full.token_nll, lean.token_nll)
    assert all(torch.equal(a, b) for a, b in zip(full_grads, lean_grads))
    assert torch.equal(lean.inner_grad_norm, full.inner_grad_norm[:, :-1])
    counted = {
        f: _counted_step(model, tokens, "none", f).terms["inner", "suffix"] for f in (True, False)
    }
    n_chunks = CFG.seq_len // CFG.chunk_size
    last = counted[True] - counted[False]
    assert 0 < last and last > counted[True] / n_chunks  # the last chunk has the most keys


@pytest.mark.parametrize("remat", ["none", "chunk", "nested"])
def test_estimate_matches_counted_matmuls(remat):
    torch.manual_seed(0)
    model = TTTModel(CFG)
    batch = 2
    tokens = torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len + 1))
    # The estimate counts the algorithm's matmuls (the math path). The default fused suffix op runs
    # inside registered ops (opaque to this counter) and recomputes probabilities on top.
    meta = _counted_step(model, tokens, remat, final_update=False)
    none = _counted_step(model, tokens, "none", final_update=False)
    with MatmulFlops() as plain:
        model.lm_loss(tokens).loss.backward()
    tokens_per_step = batch * CFG.seq_len
    # sliding-window attention through fused SDPA: fwd + bwd = 3 x 4 d keys per token and layer
    sdpa = 3 * 4 * CFG.d_model * _mean_keys(CFG.seq_len, CFG.attn_window) * tokens_per_step
    est = model.estimate_flops(remat=remat)
    assert plain.total + CFG.n_layers * sdpa == pytest.approx(
        est.swa_step * tokens_per_step, rel=0.01
    )
    assert meta.total + CFG.n_prefix_blocks * sdpa == pytest.approx(
        est.meta_step * tokens_per_step, rel=0.005
    )
    # what remat adds is its recompute, no more
    assert (meta.total - none.total) / tokens_per_step == pytest.approx(
        est.meta_terms.remat_recompute, rel=1e-6, abs=1
    )


def test_3b_at_8k_within_5_percent_of_the_paper():
    """The paper's 3B at T 8K: 2.99e10 training FLOPs per token for the meta step, 2.12e10 for
    full attention (arXiv 2512.23675); the count here is ours, validated term by term above."""
    est = preset("3B", seq_len=8192).replace(remat="none")
    from ttte2e.model import estimate_flops

    flops = estimate_flops(est)
    assert flops.full_attention_step == pytest.approx(2.12e10, rel=0.02)
    assert flops.meta_step <= 2.99e10 * 1.05
    assert flops.meta_terms.total == flops.meta_step


def test_remat_costs_more_and_full_attention_grows_with_length():
    cfg = CFG.replace(seq_len=1024)
    from ttte2e.model import estimate_flops

    none, chunk, nested = (
        estimate_flops(cfg, remat=r).meta_step for r in ("none", "chunk", "nested")
    )
    assert none < chunk < nested
    short, long = estimate_flops(cfg, 256), estimate_flops(cfg, 4096)
    assert long.swa_step == pytest.approx(short.swa_step, rel=0.05)  # window-bound
    assert long.full_attention_step > 1.5 * short.full_attention_step


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_parameters_matches_the_built_model(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = TTTModel(cfg)
    assert count_parameters(cfg) == model.num_parameters()
