"""Fused linear + cross-entropy (lowmem.model.fused_loss) against the plain path: logits = hidden @ Wᵀ, upcast,
F.cross_entropy(mean, ignore_index). In fp32 the two differ only by summation order (the log-sum-exp combined over
vocabulary blocks, the input's gradient summed over blocks): a few ulp of the sums, bounded here by 1e-5 relative
(fp32 eps 1.2e-7 times the ~100 terms' worth of reordering, with margin). The head's weight gradient of a float head is
one GEMM per block over all tokens, the same products as the plain path's."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem.model.fused_loss import causal_lm_loss, linear_cross_entropy
from lowmem.model.head_grad import HeadRows, SoftmaxCEGrad
from lowmem.model.int8_linear import Int8Linear
from lowmem.optim.linop import FactoredGrad

RTOL = 1e-5


def _close(a, b, rtol=RTOL):
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp(min=1e-30)
    assert float((a - b).abs().max() / scale) <= rtol, float((a - b).abs().max() / scale)


def _data(T=37, h=24, V=301, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, h, generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    if ignore:
        labels[::5] = -100
    return hidden, labels


@pytest.mark.parametrize("block_elements", [37 * 16, 37 * 1000, 1 << 22])   # 19 blocks, 1 block (all rows)
@pytest.mark.parametrize("ignore", [True, False])
def test_float_head_loss_and_gradients_equal_plain_cross_entropy(block_elements, ignore):
    hidden, labels = _data(ignore=ignore)
    head = nn.Linear(24, 301, bias=False)
    ref_h = hidden.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_h @ head.weight.T, labels, ignore_index=-100)
    ref.backward()
    ref_wgrad = head.weight.grad.clone()
    head.weight.grad = None
    h = hidden.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, head, labels, block_elements=block_elements)
    (loss * 1.0).backward()
    _close(loss.detach(), ref.detach())
    _close(h.grad, ref_h.grad)
    _close(head.weight.grad, ref_wgrad)


def test_all_ignored_gives_nan_like_cross_entropy_and_bad_labels_raise():
    hidden, labels = _data()
    head = nn.Linear(24, 301, bias=False)
    labels[:] = -100
    assert torch.isnan(linear_cross_entropy(hidden, head, labels))
    assert torch.isnan(F.cross_entropy(hidden @ head.weight.T, labels))
    labels[0] = 301
    with pytest.raises(ValueError, match="labels must lie in"):
        linear_cross_entropy(hidden, head, labels)
    with pytest.raises(ValueError, match="without bias"):
        linear_cross_entropy(hidden, nn.Linear(24, 301), labels)


def test_tied_embedding_gradient_sums_both_uses():
    """A tied head: the weight's gradient is the embedding's plus the head's, as on the plain path."""
    torch.manual_seed(0)
    emb = nn.Embedding(301, 24)
    head = nn.Linear(24, 301, bias=False)
    head.weight = emb.weight
    ids = torch.randint(0, 301, (3, 13))
    proj = nn.Linear(24, 24)

    def run(fused):
        emb.weight.grad = None
        hidden = torch.tanh(proj(emb(ids)))
        if fused:
            loss = linear_cross_entropy(hidden[:, :-1], head, ids[:, 1:], block_elements=13 * 3 * 20)
        else:
            loss = F.cross_entropy((hidden[:, :-1] @ head.weight.T).reshape(-1, 301), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), emb.weight.grad.clone()
    ref_loss, ref_grad = run(False)
    loss, grad = run(True)
    _close(loss, ref_loss)
    _close(grad, ref_grad)


def test_int8_head_hands_an_operator_equal_to_the_plain_factored_gradient():
    """Int8Linear head: the sink gets SoftmaxCEGrad; its products equal FactoredGrad(A, X) of the plain path
    (Int8Linear forward + F.cross_entropy), and no weight gradient tensor exists."""
    hidden, labels = _data()
    head = Int8Linear.from_linear(nn.Linear(24, 301, bias=False), block_size=8)
    got = []
    head.grad_sink = lambda module, op: got.append(op)
    h_ref = hidden.clone().requires_grad_(True)
    ref = F.cross_entropy(head(h_ref).float(), labels, ignore_index=-100)
    ref.backward()
    h = hidden.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, head, labels, block_elements=37 * 40)
    loss.backward()
    plain, fused = got
    assert isinstance(plain, FactoredGrad) and isinstance(fused, SoftmaxCEGrad)
    _close(loss.detach(), ref.detach())
    _close(h.grad, h_ref.grad)
    G = plain.dense()
    _close(fused.dense(), G)
    g = torch.Generator().manual_seed(1)
    M, N = torch.randn(24, 5, generator=g), torch.randn(301, 6, generator=g)
    _close(fused.matmul(M), G @ M)
    _close(fused.rmatmul(N), G.T @ N)
    idx = torch.randint(0, 301 * 24, (50,), generator=g)
    _close(fused.gather(idx), G.flatten()[idx])
    _close(fused.rows(100, 250).dense(), G[100:250])
    rows = torch.tensor([3, 299, 17, 3])
    _close(fused.take_rows(rows).dense(), G[rows])
    _close(fused.rows(10, 200).take_rows(torch.tensor([0, 5])).dense(), G[[10, 15]])
    T = fused.t()
    _close(T.dense(), G.T)
    _close(T.matmul(N), G.T @ N)
    _close(T.rows(4, 9).dense(), G.T[4:9])
    _close(T.gather(idx % (24 * 301)), G.T.flatten()[idx % (24 * 301)])
    _close(fused.sq_norm(), (G * G).sum())


def test_operator_refuses_a_rewritten_weight():
    hidden, labels = _data()
    head = Int8Linear.from_linear(nn.Linear(24, 301, bias=False), block_size=8)
    op = SoftmaxCEGrad(hidden, torch.zeros(37), labels.clamp(min=0), torch.ones(37), HeadRows(module=head))
    head.weight_q.add_(1)
    with pytest.raises(RuntimeError, match="rewritten"):
        op.matmul(torch.randn(24, 2))


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_loss_equals_hf_loss_and_gradients(tied):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=211, tie_word_embeddings=tied, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    ids = torch.randint(0, 211, (2, 17))
    labels = ids.clone()
    labels[0, :5] = -100
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, ids, labels, block_elements=32 * 30)
    loss.backward()
    _close(loss.detach(), ref.detach())
    for name, p in model.named_parameters():
        _close(p.grad, ref_grads[name], rtol=1e-4)   # through the layers' backward: more terms reordered


def test_bf16_float_head_matches_the_plain_bf16_path():
    """bf16: both paths round each logit to bf16 (one ulp = 2^-8 relative, the only difference a GEMM blocking can
    make per element) and upcast; the loss can differ by at most about one ulp of the largest logit. Gradients: the
    plain path rounds grad_hidden once from one GEMM over V; the fused one sums B = 9 bf16-rounded block products in
    fp32 and rounds once more: B + 1 roundings of 2^-8 relative each, bound (B + 1) * 2^-8 of the largest entry."""
    hidden, labels = _data(T=64, h=32, V=301)
    head = nn.Linear(32, 301, bias=False).to(torch.bfloat16)
    h_ref = hidden.to(torch.bfloat16).requires_grad_(True)
    logits = h_ref @ head.weight.T
    ref = F.cross_entropy(logits.float(), labels, ignore_index=-100)
    ref.backward()
    ref_wgrad = head.weight.grad.clone()
    head.weight.grad = None
    h = hidden.to(torch.bfloat16).requires_grad_(True)
    loss = linear_cross_entropy(h, head, labels, block_elements=64 * 34)   # 34 rows per block: 9 blocks
    loss.backward()
    ulp = 2.0 ** -8
    assert abs(float(loss) - float(ref)) <= ulp * float(logits.detach().float().abs().max())
    _close(h.grad.float(), h_ref.grad.float(), rtol=10 * ulp)
    _close(head.weight.grad.float(), ref_wgrad.float(), rtol=2 * ulp)   # one GEMM per block row, as the plain path


@pytest.mark.parametrize("model_type", ["cohere", "granite"])
def test_logit_factor_models_give_the_models_own_gradients(model_type):
    """Cohere multiplies the logits by logit_scale, Granite divides them by logits_scaling: folded into the hidden
    state, the fused loss's parameter gradients equal those of the model's own loss (fp32, summation order only)."""
    from tests.unit.lowmem.model.architecture_matrix import tiny_model

    model = tiny_model(model_type).eval()
    factor = model.config.logit_scale if model_type == "cohere" else 1 / model.config.logits_scaling
    assert factor != 1.0
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    causal_lm_loss(model, ids).backward()
    for name, p in model.named_parameters():
        _close(p.grad, reference[name], rtol=1e-4)


def test_router_auxiliary_loss_and_soft_capping_are_refused_with_the_setting_to_use():
    from tests.unit.lowmem.model.architecture_matrix import tiny_model

    ids = torch.randint(3, 128, (1, 8))
    mixtral = tiny_model("mixtral", output_router_logits=True)
    with pytest.raises(ValueError, match=r"'mixtral' sets output_router_logits=True.*fused_loss=false"):
        causal_lm_loss(mixtral, ids)
    gemma2 = tiny_model("gemma2")
    with pytest.raises(ValueError, match=r"'gemma2' sets final_logit_softcapping=.*fused_loss=false"):
        causal_lm_loss(gemma2, ids)
    gemma2.config.final_logit_softcapping = None   # without capping the logits are a plain linear: accepted
    with torch.no_grad():
        reference = gemma2(input_ids=ids, labels=ids).loss
        assert abs(float(causal_lm_loss(gemma2, ids)) - float(reference)) <= RTOL * float(reference)
