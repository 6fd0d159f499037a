"""K-FAC (chop/pruning/kfac.py): costs and updates against brute force with the explicit Kronecker Hessian, the exact
least-squares optimum, K-OBD, and the factors as input and output-gradient moments."""

import pytest
import torch
from helpers import TINY, spd

from chop.models.loading import load_model
from chop.pruning import kfac
from chop.pruning.structures import linears

D = torch.float64


@pytest.fixture()
def layer():
    torch.manual_seed(0)
    w = torch.randn(6, 5, dtype=D)
    f = kfac.Factors(spd(5, 1), spd(6, 2)).invert(0.0, 0.0)
    return w, f, torch.kron(f.G, f.A)  # vec(W) row-major: F[(i,j),(k,l)] = G_ik A_jl


def obs(w, F, q):
    """Brute force: remove weights q (flat indices) of vec(W) under Hessian F: (cost, new W)."""
    Fi = torch.linalg.inv(F)
    theta = w.flatten()
    lam = torch.linalg.solve(Fi[q][:, q], theta[q])
    return 0.5 * theta[q] @ lam, (theta - Fi[:, q] @ lam).view_as(w)


def test_element_costs_and_update_equal_brute_force(layer):
    w, f, F = layer
    costs = kfac.element_costs(w, f)
    for q in range(w.numel()):
        cost, _ = obs(w, F, [q])
        assert costs.flatten()[q] == pytest.approx(float(cost), rel=1e-9)
    mask = torch.zeros(w.shape, dtype=torch.bool)
    mask[[0, 2, 2, 5], [1, 0, 4, 3]] = True
    _, want = obs(w, F, mask.flatten().nonzero()[:, 0])
    got = kfac.remove_elements(w, f, mask, max_correlate=64)
    assert torch.allclose(got, want, atol=1e-10) and (got[mask] == 0).all()


def test_row_and_column_costs_and_updates_equal_brute_force(layer):
    w, f, F = layer
    rows, cols = kfac.row_costs(w, f), kfac.column_costs(w, f)
    for r in range(w.shape[0]):
        cost, _ = obs(w, F, [r * w.shape[1] + j for j in range(w.shape[1])])
        assert rows[r] == pytest.approx(float(cost), rel=1e-9)
    for c in range(w.shape[1]):
        cost, _ = obs(w, F, [i * w.shape[1] + c for i in range(w.shape[0])])
        assert cols[c] == pytest.approx(float(cost), rel=1e-9)
    R, C = torch.tensor([1, 4]), torch.tensor([0, 3])
    _, want = obs(w, F, [r * 5 + j for r in R.tolist() for j in range(5)])
    assert torch.allclose(kfac.remove_rows(w, f, R), want, atol=1e-10)
    _, want = obs(w, F, [i * 5 + c for i in range(6) for c in C.tolist()])
    assert torch.allclose(kfac.remove_columns(w, f, C), want, atol=1e-10)


def test_one_shot_column_removal_of_a_linear_layer_is_the_least_squares_optimum():
    """Quadratic loss ½‖X W'ᵀ − X Wᵀ‖²: its Hessian is I ⊗ XᵀX exactly, and dropping input columns C with the
    correlated update gives the least-squares fit of the dense outputs on the remaining inputs."""
    torch.manual_seed(1)
    x, w = torch.randn(200, 8, dtype=D), torch.randn(5, 8, dtype=D)
    f = kfac.Factors(x.T @ x, torch.eye(5, dtype=D)).invert(0.0, 0.0)
    C = torch.tensor([2, 5, 6])
    got = kfac.remove_columns(w, f, C)
    keep = [j for j in range(8) if j not in C.tolist()]
    best = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    assert torch.allclose(got[:, keep], best, atol=1e-9) and (got[:, C] == 0).all()
    # and the loss it reaches is the cost the formula predicted
    loss = 0.5 * ((x @ got.T - x @ w.T) ** 2).sum()
    assert float(loss) == pytest.approx(float(kfac.column_costs(w, f)[C].sum()), rel=0.5)  # individual costs: an estimate
    joint = 0.5 * torch.trace(w[:, C] @ torch.linalg.inv(f.A_inv[C][:, C]) @ w[:, C].T)
    assert float(loss) == pytest.approx(float(joint), rel=1e-9)  # the joint cost: exact


def test_obd_costs_are_the_diagonal_of_the_kronecker_hessian(layer):
    w, f, F = layer
    assert torch.allclose(kfac.element_costs_obd(w, f).flatten(), 0.5 * w.flatten() ** 2 * F.diagonal())


def test_kfac_factors_of_a_linear_layer_are_its_input_and_output_gradient_moments():
    torch.manual_seed(0)
    model = load_model(config=TINY["llama"]).double()
    layers = linears(model)
    ids = torch.randint(2, 128, (2, 9))
    model.lm_head.weight.requires_grad_(False)  # frozen before: stays frozen
    during = []  # no weight takes part in backward (its gradient is never computed), and all are as before after
    spy = model.register_forward_hook(lambda m, a, o: during.append(any(p.requires_grad for p in m.parameters())))
    factors = kfac.collect(model, layers, [ids])
    spy.remove()
    assert during == [False]
    assert not model.lm_head.weight.requires_grad and all(p.requires_grad for n, p in model.named_parameters()
                                                             if n != "lm_head.weight")
    assert all(p.grad is None for p in model.parameters())
    name = next(n for n in layers if n.endswith("mlp.down_proj"))
    seen = {}
    layer = layers[name]
    h = layer.register_forward_hook(lambda m, a, o: seen.update(a=a[0], o=o) or o.retain_grad())
    logits = model(input_ids=ids[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    h.remove()
    a, g = seen["a"].flatten(0, 1), seen["o"].grad.flatten(0, 1)
    assert torch.allclose(factors[name].A, a.T @ a / len(a), rtol=1e-8)
    assert torch.allclose(factors[name].G, g.T @ g / len(g), rtol=1e-6)


def test_the_gradient_enters_at_the_first_layer_whose_curvature_is_gathered():
    """Curvature of block 2 of 4 alone (``blocks_per_pass``): blocks 0 and 1 are neither traced nor run backward, and
    block 2's factors are those gathered with every layer at once."""
    torch.manual_seed(0)
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=4)).double()
    every = linears(model)
    mine = {n: l for n, l in every.items() if n.startswith("model.layers.2.")}
    traced = {}

    def record(i):  # whether block i's output is traced for backward
        return lambda m, a, o: traced.__setitem__(i, (o[0] if isinstance(o, tuple) else o).requires_grad)

    spies = [block.register_forward_hook(record(i)) for i, block in enumerate(model.model.layers)]
    ids = torch.randint(2, 128, (2, 9))
    alone = kfac.collect(model, mine, [ids])
    for s in spies:
        s.remove()
    assert traced == {0: False, 1: False, 2: True, 3: True}
    together = kfac.collect(model, every, [ids])
    for name in mine:
        assert torch.allclose(alone[name].A, together[name].A) and torch.allclose(alone[name].G, together[name].G)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_an_input_that_layers_share_has_its_moment_computed_once(monkeypatch, model_type):
    """q, k and v read one tensor, as do gate and up: its moment is computed once a batch, and each layer's A is its
    own copy of it (equal, not the same tensor). qwen2's q, k and v have biases: the ones column is shared too."""
    torch.manual_seed(0)
    model = load_model(config=TINY[model_type]).double()
    layers = linears(model)
    sizes, moment = [], kfac._moment
    monkeypatch.setattr(kfac, "_moment", lambda x, device: sizes.append(x.shape[-1]) or moment(x, device))
    batches = [torch.randint(2, 128, (2, 9)), torch.randint(2, 128, (2, 9))]
    factors = kfac.collect(model, layers, batches)
    blocks, per_block = model.config.num_hidden_layers, 4 + 7  # inputs: q/k/v, o, gate/up, down; outputs: all seven
    assert len(layers) == 7 * blocks and len(sizes) == 2 * blocks * per_block
    for block in range(blocks):
        q, k, v = (factors[f"model.layers.{block}.self_attn.{n}_proj"].A for n in "qkv")
        gate, up = (factors[f"model.layers.{block}.mlp.{n}_proj"].A for n in ("gate", "up"))
        assert torch.equal(q, k) and torch.equal(q, v) and torch.equal(gate, up)
        assert len({t.data_ptr() for t in (q, k, v, gate, up)}) == 5
    for name in ("model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"):  # as when gathered alone
        alone = kfac.collect(model, {name: layers[name]}, batches)[name]
        torch.testing.assert_close(factors[name].A, alone.A, rtol=1e-12, atol=0)
        torch.testing.assert_close(factors[name].G, alone.G, rtol=1e-9, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_moment_on_a_gpu_is_the_float32_product(dtype):
    """A bf16 or float16 layer input's moment runs on the tensor cores into float32: the same as the float32 product
    of the same values (exact products), to float32's rounding of the sums."""
    torch.manual_seed(0)
    x = torch.randn(4, 1024, 384, device="cuda").to(dtype)
    got = kfac._moment(x, None)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, kfac._moment(x.float(), None), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(kfac._moment(x, torch.device("cpu")), got.cpu(), rtol=1e-5, atol=1e-3)
