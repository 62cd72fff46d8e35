import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from conftest import randomize_adapter
from helpers import assert_matches_reference, relative_error
from leantune.errors import LeantuneError
from leantune.loss import causal_lm_loss, count_loss_tokens, full_logits_loss


def random_batch(vocab=512, batch=3, length=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :7] = -100  # a masked prompt
    labels[1, 15:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0
    return input_ids, labels, attention_mask


def hf_reference_loss(model, input_ids, labels, attention_mask):
    """Hugging Face's loss written out (its own upcasts float64 logits to float32): shift, ignore -100, mean."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk_tokens", [1, 5, 64, 1000])
def test_chunked_loss_matches_hf_loss_and_gradients_float64(tiny_llama, chunk_tokens):
    model = tiny_llama.double()
    lt.attach(model, lt.LoRA(r=4))
    randomize_adapter(model)
    input_ids, labels, mask = random_batch()

    expected = hf_reference_loss(model, input_ids, labels, mask)
    expected.backward()
    expected_grads = trainable_grads(model)
    model.zero_grad()

    loss = causal_lm_loss(model, input_ids, labels, mask, chunk_tokens=chunk_tokens, chunked=True)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_chunked_loss_trains_a_tied_output_head(tiny_llama):
    """With every weight trainable, the head's gradient (tied to the embedding) must match too."""
    model = tiny_llama.double()
    input_ids, labels, mask = random_batch(seed=3)
    hf_reference_loss(model, input_ids, labels, mask).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    causal_lm_loss(model, input_ids, labels, mask, chunk_tokens=7, chunked=True).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_head_with_bias_matches_plain_cross_entropy():
    from leantune.loss import _ChunkedLinearCrossEntropy

    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(11, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(30, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 30, (11,), generator=generator)
    total = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, 4, torch.float64, True)
    refs = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    expected = F.cross_entropy(F.linear(refs[0], refs[1], refs[2]), targets, reduction="sum")
    mine = (hidden, weight, bias)
    assert_matches_reference(total, expected, lambda: [(t.grad, ref.grad) for t, ref in zip(mine, refs)],
                             upstream=torch.tensor(0.7, dtype=torch.float64))


def test_float32_chunked_matches_full_logits_and_num_items(tiny_llama):
    lt.attach(tiny_llama, lt.LoRA(r=4))
    randomize_adapter(tiny_llama)
    input_ids, labels, mask = random_batch(seed=1)
    full = full_logits_loss(tiny_llama, input_ids, labels, mask)
    hf_own = tiny_llama(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(full, hf_own)
    chunked = causal_lm_loss(tiny_llama, input_ids, labels, mask, chunk_tokens=16, chunked=True)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    count = count_loss_tokens(labels)
    assert count == int((labels[:, 1:] != -100).sum()) > 0
    summed = causal_lm_loss(tiny_llama, input_ids, labels, mask, chunked=True, num_items=1)
    torch.testing.assert_close(summed, full * count, rtol=1e-5, atol=1e-4)


def test_auto_choice_uses_full_logits_for_small_vocabularies(tiny_llama, monkeypatch):
    import leantune.loss as loss_module

    calls = []
    original = loss_module._ChunkedLinearCrossEntropy.apply
    monkeypatch.setattr(loss_module._ChunkedLinearCrossEntropy, "apply",
                        lambda *a: calls.append(1) or original(*a))
    input_ids, labels, mask = random_batch(seed=2)
    causal_lm_loss(tiny_llama, input_ids, labels, mask)  # vocabulary 512: below the threshold
    assert not calls
    monkeypatch.setattr(loss_module, "CHUNKED_MIN_VOCAB", 100)
    causal_lm_loss(tiny_llama, input_ids, labels, mask)
    assert calls


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("num_items", [None, 0, torch.tensor(0), 7, torch.tensor(7.0)], ids=repr)
def test_all_masked_batch_gives_exactly_zero_loss_and_gradients(tiny_llama, chunked, num_items):
    """Every label -100: the loss is exactly 0.0 (a zero sum over no tokens, never 0/0), it still
    backpropagates, and every trainable gradient exists and is exactly zero (a NaN counts as non-zero)."""
    lt.attach(tiny_llama, lt.LoRA(r=4))
    randomize_adapter(tiny_llama)  # non-zero B: any labelled token would give non-zero gradients
    input_ids, _, mask = random_batch()
    labels = torch.full_like(input_ids, -100)
    loss = causal_lm_loss(tiny_llama, input_ids, labels, mask, chunked=chunked, num_items=num_items)
    assert loss.dtype == torch.float32 and loss.shape == () and loss.requires_grad
    assert torch.equal(loss.detach(), torch.zeros(())), loss
    loss.backward()
    grads = trainable_grads(tiny_llama)
    assert len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.count_nonzero(grad) == 0, name


@pytest.mark.parametrize("chunked", [True, False])
def test_an_all_masked_micro_batch_adds_nothing_to_an_accumulated_step(tiny_llama, chunked):
    lt.attach(tiny_llama, lt.LoRA(r=4))
    randomize_adapter(tiny_llama)
    input_ids, labels, mask = random_batch(seed=6)
    count = count_loss_tokens(labels)
    causal_lm_loss(tiny_llama, input_ids, labels, mask, chunked=chunked, num_items=count).backward()
    alone = trainable_grads(tiny_llama)
    tiny_llama.zero_grad()
    masked = torch.full_like(input_ids, -100)
    total = (causal_lm_loss(tiny_llama, input_ids, labels, mask, chunked=chunked, num_items=count)
             + causal_lm_loss(tiny_llama, input_ids, masked, mask, chunked=chunked, num_items=count))
    total.backward()
    for name, grad in trainable_grads(tiny_llama).items():
        torch.testing.assert_close(grad, alone[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("chunked", [True, False])
def test_num_items_is_the_denominator_even_below_one(tiny_llama, chunked):
    """A fractional token count (an average over processes, say) divides the summed loss as given."""
    input_ids, labels, mask = random_batch(seed=7)
    summed = causal_lm_loss(tiny_llama, input_ids, labels, mask, chunked=chunked, num_items=1)
    for num_items in (0.25, torch.tensor(0.25), 3, torch.tensor(3)):
        got = causal_lm_loss(tiny_llama, input_ids, labels, mask, chunked=chunked, num_items=num_items)
        torch.testing.assert_close(got, summed / float(num_items), rtol=1e-6, atol=0)


def test_bf16_autocast_matches_full_logits_and_is_close_to_float32(tiny_llama):
    """Under bf16 autocast the chunked loss is the full-logits loss under the same autocast (both take
    bf16 logits and a float32 softmax), and both are within bf16 rounding of float32: the loss to
    half a bf16 ulp (2e-3), the gradient of every weight to 1% (measured 0.5%)."""
    input_ids, labels, mask = random_batch(seed=4)

    def loss_and_gradient(chunked, autocast):
        tiny_llama.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = causal_lm_loss(tiny_llama, input_ids, labels, mask, chunked=chunked)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in tiny_llama.parameters()])

    reference, reference_grad = loss_and_gradient(chunked=True, autocast=False)
    low, low_grad = loss_and_gradient(chunked=True, autocast=True)
    full, full_grad = loss_and_gradient(chunked=False, autocast=True)
    assert low.dtype == torch.float32 and torch.isfinite(low_grad).all()
    torch.testing.assert_close(low, full, rtol=1e-6, atol=0)
    assert relative_error(low_grad, full_grad) < 1e-2
    torch.testing.assert_close(low, reference, rtol=2e-3, atol=0)
    assert low != reference  # autocast did run in bf16
    assert relative_error(low_grad, reference_grad) < 1e-2


def test_errors_are_clear(tiny_llama):
    input_ids, labels, mask = random_batch()
    with pytest.raises(LeantuneError, match="labels have shape"):
        causal_lm_loss(tiny_llama, input_ids, labels[:, 1:], mask)
    with pytest.raises(LeantuneError, match="chunk_tokens"):
        causal_lm_loss(tiny_llama, input_ids, labels, mask, chunked=True, chunk_tokens=0)
    with pytest.raises(LeantuneError, match="plain linear"):
        causal_lm_loss(torch.nn.Linear(3, 3), input_ids, labels, mask, chunked=True)


def test_no_gradient_is_formed_without_grad_mode(tiny_llama, monkeypatch):
    import leantune.loss as loss_module

    calls = []
    original = loss_module._accumulate_chunk_gradients
    monkeypatch.setattr(loss_module, "_accumulate_chunk_gradients", lambda *a: calls.append(1) or original(*a))
    input_ids, labels, mask = random_batch(seed=3)
    with torch.no_grad():
        quiet = causal_lm_loss(tiny_llama, input_ids, labels, mask, chunk_tokens=16, chunked=True)
    assert not calls
    tracked = causal_lm_loss(tiny_llama, input_ids, labels, mask, chunk_tokens=16, chunked=True)
    assert calls
    torch.testing.assert_close(quiet, tracked.detach())


def test_right_padding_mask_is_dropped_only_where_it_changes_nothing():
    from leantune.loss import decoder_attention_mask

    input_ids, labels, mask = random_batch()
    assert decoder_attention_mask(mask, labels) is None  # right padding without labels: causal attention suffices
    left = mask.flip(1)
    assert decoder_attention_mask(left, labels.flip(1)) is left
    inner = mask.clone()
    inner[0, 3] = 0
    assert decoder_attention_mask(inner, labels) is inner
    labelled_padding = labels.clone()
    labelled_padding[1, 17] = 5
    assert decoder_attention_mask(mask, labelled_padding) is mask
    assert decoder_attention_mask(None, labels) is None


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("chunked", [True, False])
def test_padded_batches_match_the_reference_with_their_mask(tiny_llama, padding, chunked):
    """Left padding keeps its mask (dropping it would change the loss); right padding loses it and
    still equals the masked reference, loss and adapter gradients."""
    model = tiny_llama.double()
    lt.attach(model, lt.LoRA(r=4))
    randomize_adapter(model)
    input_ids, labels, mask = random_batch()
    if padding == "left":
        input_ids, labels, mask = input_ids.flip(1), labels.flip(1), mask.flip(1)
    expected = hf_reference_loss(model, input_ids, labels, mask)
    expected.backward()
    expected_grads = trainable_grads(model)
    model.zero_grad()
    loss = causal_lm_loss(model, input_ids, labels, mask, chunked=chunked)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for name, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", ["plain", "position_ids", "bidirectional"])
def test_the_decoder_gets_the_mask_unless_dropping_it_is_exact(tiny_llama, case):
    seen = []
    tiny_llama.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                               with_kwargs=True)
    input_ids, labels, mask = random_batch()
    positions = None
    if case == "position_ids":  # restarting positions, no mask: transformers reads packed documents
        positions = torch.cat([torch.arange(10), torch.arange(10)]).expand(3, -1)
    if case == "bidirectional":
        tiny_llama.config.use_bidirectional_attention = True
    causal_lm_loss(tiny_llama, input_ids, labels, mask, chunked=True, position_ids=positions)
    assert (seen[-1] is None) == (case != "bidirectional")  # the last call is the loss's


@pytest.mark.parametrize("transform", ["recurrent-gemma-cap", "scaled-subclass"])
def test_logits_transformed_under_an_unlisted_name_leave_the_chunked_path(transform):
    """The chunked loss applies the head to the decoder's output; a model that changes its logits
    after the head under a config name the loss does not list (RecurrentGemma's logits_soft_cap, a
    subclass that scales them) must get its own logits' loss: auto falls back, chunked=True refuses."""
    import transformers as tf

    torch.manual_seed(0)
    if transform == "recurrent-gemma-cap":
        model = tf.RecurrentGemmaForCausalLM(tf.RecurrentGemmaConfig(
            vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, lru_width=64, attention_window_size=16, logits_soft_cap=2.0))
    else:
        class ScaledLogits(tf.LlamaForCausalLM):
            def forward(self, *args, **kwargs):
                output = super().forward(*args, **kwargs)
                output.logits = output.logits * 0.25
                return output

        model = ScaledLogits(tf.LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)  # confident logits, as a trained head gives
    model.eval()
    input_ids, labels, mask = random_batch(vocab=8192)
    expected = full_logits_loss(model, input_ids, labels, mask)
    torch.testing.assert_close(causal_lm_loss(model, input_ids, labels, mask), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(LeantuneError, match="plain linear layer"):
        causal_lm_loss(model, input_ids, labels, mask, chunked=True)
