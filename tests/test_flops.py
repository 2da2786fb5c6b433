"""estimate_flops against the matmul FLOPs actually executed (counted with torch's flop registry)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ttte2e.kernels.attention import chunk_backend
from ttte2e.model import PRESETS, TTTConfig, TTTModel, count_parameters, preset
from ttte2e.model.flops import _mean_keys

CFG = TTTConfig(vocab_size=512, d_model=64, n_layers=4, n_ttt_blocks=2, n_heads=4, mlp_hidden=96,
                seq_len=128, window=32, chunk_size=16)


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


@pytest.mark.parametrize("remat", ["none", "chunk", "nested"])
def test_estimate_matches_counted_matmuls(remat):
    torch.manual_seed(0)
    model = TTTModel(CFG)
    batch = 2
    tokens = torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len + 1))
    # The estimate counts the algorithm's matmuls (the math path). The default fused suffix op runs
    # inside registered ops (opaque to this counter) and recomputes probabilities on top.
    with MatmulFlops() as meta, chunk_backend("math"):
        model.meta_loss(tokens, remat=remat).loss.backward()
    with MatmulFlops() as plain:
        model.lm_loss(tokens).loss.backward()
    tokens_per_step = batch * CFG.seq_len
    # sliding-window attention through fused SDPA: fwd + bwd = 3 x 4 d keys per token and layer
    sdpa = 3 * 4 * CFG.d_model * _mean_keys(CFG.seq_len, CFG.attn_window) * tokens_per_step
    est = model.estimate_flops(remat=remat)
    assert plain.total + CFG.n_layers * sdpa == pytest.approx(est.swa_step * tokens_per_step,
                                                              rel=0.01)
    assert meta.total + CFG.n_prefix_blocks * sdpa == pytest.approx(est.meta_step * tokens_per_step,
                                                                    rel=0.03)


def test_remat_costs_more_and_full_attention_grows_with_length():
    cfg = CFG.replace(seq_len=1024)
    from ttte2e.model import estimate_flops
    none, chunk, nested = (estimate_flops(cfg, remat=r).meta_step for r in ("none", "chunk", "nested"))
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
