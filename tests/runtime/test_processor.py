"""PerfusionAttnProcessor on the tiny pipeline's real diffusers modules (docs/runtime.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor

from perfusion_runtime.method import processor as processor_module
from perfusion_runtime.method.key_locking import gate
from perfusion_runtime.method.layers import cross_attention_layers
from perfusion_runtime.method.processor import ConceptState, PerfusionAttnProcessor, install

PROMPT = "a photo of a teddy bear on the beach"
SUPER = "a photo of a toy on the beach"
Inputs = Callable[..., tuple[Tensor, Tensor, Tensor]]
MakeState = Callable[..., ConceptState]
Encode = Callable[[list[str]], Tensor]


def unet_out(pipe: Any, latents: Tensor, t: Tensor, encodings: Tensor, **kwargs: Any) -> Tensor:
    with torch.no_grad():
        out: Tensor = pipe.unet(latents, t, encoder_hidden_states=encodings, **kwargs).sample
    return out


def render(pipe: Any, prompt: str = PROMPT, steps: int = 5, **kwargs: Any) -> Tensor:
    out = pipe(prompt, num_inference_steps=steps, output_type="pt",
               generator=torch.Generator().manual_seed(0), **kwargs)
    image: Tensor = out.images
    return image


@contextmanager
def calls_of(modules: list[torch.nn.Module]) -> Iterator[list[int]]:
    """Counts forward calls of each module (one shared list of counts)."""
    counts = [0] * len(modules)

    def hook(index: int) -> Callable[..., None]:
        def count(*_: Any) -> None:
            counts[index] += 1
        return count

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def kv_projections(pipe: Any) -> list[torch.nn.Module]:
    return [p for a in cross_attention_layers(pipe.unet).values() for p in (a.to_k, a.to_v)]


def test_parity_with_default_processor_when_no_concept(pipe: Any, unet_inputs: Inputs) -> None:
    latents, t, encodings = unet_inputs(["", PROMPT])
    mask = torch.ones(2, 77)
    mask[:, 40:] = 0  # covers the attention-mask path (SD itself passes none)
    base = unet_out(pipe, latents, t, encodings)
    base_masked = unet_out(pipe, latents, t, encodings, encoder_attention_mask=mask)
    image = render(pipe)
    with install(pipe.unet, ConceptState()):
        assert torch.equal(unet_out(pipe, latents, t, encodings), base)
        assert torch.equal(unet_out(pipe, latents, t, encodings), base)  # from the K/V cache
        assert torch.equal(unet_out(pipe, latents, t, encodings, encoder_attention_mask=mask),
                           base_masked)
        assert torch.equal(render(pipe), image)


@pytest.mark.parametrize("options", [
    {"norm_num_groups": 4, "residual_connection": True, "rescale_output_factor": 2.0},
    {"cross_attention_norm": "layer_norm", "bias": True, "out_bias": False},
    {"cross_attention_norm": "group_norm", "cross_attention_norm_num_groups": 4},
    {"spatial_norm_dim": 3, "qk_norm": "layer_norm"},
])
def test_parity_on_every_branch_of_attn_processor(options: dict[str, Any]) -> None:
    """Group norm, spatial norm, residual, rescale, norm_cross, q/k norm, biases, 4-D input."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=8, heads=2, dim_head=8, **options).eval()
    hidden = torch.randn(2, 32, 4, 4)
    context = torch.randn(2, 5, 8)
    extra = {"temb": torch.randn(2, 3, 2, 2)} if "spatial_norm_dim" in options else {}
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2])
    with torch.no_grad():
        for attention_mask in (None, mask):
            attn.set_processor(AttnProcessor2_0())
            base = attn(hidden, context, attention_mask=attention_mask, **extra)
            attn.set_processor(PerfusionAttnProcessor(ConceptState(), "layer"))
            assert torch.equal(attn(hidden, context, attention_mask=attention_mask, **extra), base)


def test_kv_computed_once_per_prompt(pipe: Any) -> None:
    projections = kv_projections(pipe)
    with install(pipe.unet, ConceptState()), calls_of(projections) as counts:
        render(pipe, steps=5)  # classifier-free guidance: one batch of 2 prompts per step
        assert counts == [1] * len(projections)
        render(pipe, "a photo of a cat", steps=5)
        assert counts == [2] * len(projections)


def test_kv_cache_works_in_inference_mode(pipe: Any, unet_inputs: Inputs) -> None:
    latents, t, encodings = unet_inputs([PROMPT])
    base = unet_out(pipe, latents, t, encodings)
    projections = kv_projections(pipe)
    with install(pipe.unet, ConceptState()), torch.inference_mode(), \
            calls_of(projections) as counts:
        inference_encodings = encodings.clone()
        outs = [pipe.unet(latents, t, encoder_hidden_states=inference_encodings).sample
                for _ in range(2)]
    assert all(torch.equal(out, base) for out in outs)
    assert counts == [1] * len(projections)


def test_kv_cache_follows_the_state_and_the_tensor(pipe: Any, unet_inputs: Inputs) -> None:
    latents, t, encodings = unet_inputs([PROMPT])
    state = ConceptState()
    projections = kv_projections(pipe)
    with install(pipe.unet, state), calls_of(projections) as counts:
        unet_out(pipe, latents, t, encodings)
        unet_out(pipe, latents, t, encodings)
        assert counts == [1] * len(projections)
        state.touch()  # a changed state: recompute
        unet_out(pipe, latents, t, encodings)
        encodings.mul_(1.0)  # changed in place: recompute
        unet_out(pipe, latents, t, encodings)
        unet_out(pipe, latents, t, encodings.clone())  # another tensor: recompute
        assert counts == [4] * len(projections)
        state.caching = False  # training: every call computes (and does not bump the version)
        unet_out(pipe, latents, t, encodings)
        unet_out(pipe, latents, t, encodings)
        assert counts == [6] * len(projections)


def test_edited_kv_computed_once_per_prompt(pipe: Any, encode: Encode,
                                            concept_state: MakeState,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    encodings = encode([PROMPT, SUPER])
    state = concept_state(encodings[0, 5:6], encodings, beta=0.7)
    calls = []
    real = processor_module.edited_projection

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(processor_module, "edited_projection", spy)
    with install(pipe.unet, state):
        render(pipe, steps=5)
    # K and V together (local locking edits the stacked [W_K; W_V]), once per layer
    assert len(calls) == len(cross_attention_layers(pipe.unet))


def test_closed_gate_and_orthogonal_input_stay_at_the_base(
        pipe: Any, unet_inputs: Inputs, concept_state: MakeState) -> None:
    latents, t, encodings = unet_inputs(["", PROMPT])
    flat = encodings.reshape(-1, encodings.shape[-1])
    # the direction in which the prompt's encodings have the least energy: a(e) ≈ 0 for all
    i_star = torch.linalg.eigh(flat.T.double() @ flat.double()).eigenvectors[:, 0].float()
    state = concept_state(i_star[None], flat, beta=1e4)  # σ((a − β)/τ) ≈ 0
    base = unet_out(pipe, latents, t, encodings)
    with install(pipe.unet, state):
        edited = unet_out(pipe, latents, t, encodings)
    assert not torch.equal(edited, base)  # the edit did run
    torch.testing.assert_close(edited, base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_local_lock_changes_the_output_when_the_gate_is_open(
        pipe: Any, unet_inputs: Inputs, concept_state: MakeState, k: int) -> None:
    latents, t, encodings = unet_inputs(["", PROMPT])
    base = unet_out(pipe, latents, t, encodings)
    state = concept_state(encodings[1, 5:5 + k], encodings, beta=0.7)
    with install(pipe.unet, state):
        edited = unet_out(pipe, latents, t, encodings)
        image = render(pipe)
    assert bool(torch.isfinite(edited).all()) and bool(torch.isfinite(image).all())
    assert (edited - base).abs().max() > 1e-2


def test_local_lock_key_at_the_concept_token_is_the_gated_target(
        pipe: Any, encode: Encode, concept_state: MakeState) -> None:
    """Invariant 1 through the processor: at e = i*, K = σ((1 − β)/τ)·o*_K."""
    encodings = encode([PROMPT])
    state = concept_state(encodings[0, 6:7], encodings, beta=0.7)
    name, attn = next(iter(cross_attention_layers(pipe.unet).items()))
    with torch.no_grad():
        key, _ = PerfusionAttnProcessor(state, name).key_value(attn, encodings, None)
    expected = gate(torch.tensor([1.0]), 0.7, state.tau) * state.o_k[name][0]
    torch.testing.assert_close(key[0, 6], expected, rtol=1e-4, atol=1e-5)


def test_global_lock_uses_the_super_prompt_for_keys(
        pipe: Any, unet_inputs: Inputs, encode: Encode, concept_state: MakeState) -> None:
    latents, t, encodings = unet_inputs(["", PROMPT])
    supers = encode(["", SUPER])
    base = unet_out(pipe, latents, t, encodings)
    state = concept_state(encodings[1, 6:7], encodings, beta=0.5, lock="global")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    diffusers_log = logging.getLogger("diffusers.models.attention_processor")
    diffusers_log.addHandler(handler)
    try:
        with install(pipe.unet, state) as installed:
            edited = unet_out(pipe, latents, t, encodings,
                              cross_attention_kwargs={"perfusion_super": supers})
            name, attn = next(iter(cross_attention_layers(pipe.unet).items()))
            key, _ = installed.processors[name].key_value(attn, encodings, supers)
            with pytest.raises(ValueError, match="perfusion_super"):
                unet_out(pipe, latents, t, encodings)
    finally:
        diffusers_log.removeHandler(handler)
    assert records == []  # no "cross_attention_kwargs ... not expected" from self-attention
    assert torch.equal(key, attn.to_k(supers))  # plain W_K on the supercategory prompt
    assert bool(torch.isfinite(edited).all())
    assert (edited - base).abs().max() > 1e-2


def test_install_and_restore_leave_the_processors_as_before(pipe: Any) -> None:
    before = dict(pipe.unet.attn_processors)
    handle = install(pipe.unet, ConceptState())
    during = pipe.unet.attn_processors
    ours = {n for n, p in during.items() if isinstance(p, PerfusionAttnProcessor)}
    assert ours == {f"{name}.processor" for name in cross_attention_layers(pipe.unet)}
    with pytest.raises(ValueError, match="already installed"):
        install(pipe.unet, ConceptState())
    handle.restore()
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)


def test_base_weights_bit_identical_after_rendering_with_concepts(
        pipe: Any, encode: Encode, concept_state: MakeState) -> None:
    models = {"unet": pipe.unet, "text": pipe.text_encoder, "vae": pipe.vae}
    before = {f"{m}.{k}": v.clone() for m, mod in models.items()
              for k, v in mod.state_dict().items()}
    encodings = encode([PROMPT])
    for lock, supers in (("local", None), ("global", encode(["", SUPER]))):
        state = concept_state(encodings[0, 6:7], encodings, beta=0.6, lock=lock)
        kwargs = {} if supers is None else {"cross_attention_kwargs": {"perfusion_super": supers}}
        with install(pipe.unet, state):
            render(pipe, steps=2, **kwargs)
    after = {f"{m}.{k}": v for m, mod in models.items() for k, v in mod.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_concept_state_versions_and_validation(pipe: Any, encode: Encode,
                                               concept_state: MakeState) -> None:
    encodings = encode([PROMPT])
    state = concept_state(encodings[0, 6:7], encodings, beta=0.7)
    assert state.active and state.beta is not None and state.beta.shape == (1,)
    version = state.version
    state.caching = False
    assert state.version == version
    state.tau = 0.2
    state.deactivate()
    assert state.version > version + 1 and not state.active
    basis = concept_state(encodings[0, 6:7], encodings, beta=0.7).basis
    assert basis is not None
    with pytest.raises(ValueError, match="lock"):
        state.activate(basis, {}, {}, beta=0.7, lock="sideways")
    with pytest.raises(ValueError, match=r"o_v\['x'\]"):
        state.activate(basis, {}, {"x": torch.zeros(2, 32)}, beta=0.7)


def test_local_lock_edits_k_and_v_together_as_two_separate_edits_would(
        pipe: Any, encode: Encode, concept_state: MakeState) -> None:
    """The fused [W_K; W_V] edit is eq. 3 applied to each projection on its own."""
    encodings = encode([PROMPT, SUPER])
    state = concept_state(encodings[0, 5:6], encodings, beta=0.7)
    for name, attn in cross_attention_layers(pipe.unet).items():
        proc = PerfusionAttnProcessor(state, name)
        key, value = proc._edited_pair(attn, encodings)
        torch.testing.assert_close(key, proc._edited(attn.to_k, encodings, state.o_k, "o_k"))
        torch.testing.assert_close(value, proc._edited(attn.to_v, encodings, state.o_v, "o_v"))


@pytest.mark.parametrize("lock", ["local", "global"])
def test_the_edit_stops_at_each_rows_length(pipe: Any, encode: Encode, concept_state: MakeState,
                                             lock: str) -> None:
    """Past `lengths[b]` (the prompt's end-of-text token) V is the base model's, from the
    prompt itself, and so is K under local locking (under global locking K is the
    supercategory prompt's at every position); before it, exactly what the edit gives
    without lengths."""
    encodings = encode([PROMPT, SUPER])
    supers = encode([SUPER, SUPER])
    state = concept_state(encodings[0, 6:7], encodings, beta=0.5, lock=lock)
    for name, attn in cross_attention_layers(pipe.unet).items():
        with torch.no_grad():
            state.lengths = None
            everywhere = PerfusionAttnProcessor(state, name).key_value(attn, encodings, supers)
            state.lengths = torch.tensor([9, 4])
            cut = PerfusionAttnProcessor(state, name).key_value(attn, encodings, supers)
            plain = (attn.to_k(supers if lock == "global" else encodings),
                     attn.to_v(encodings))
        for edited, stopped, base in zip(everywhere, cut, plain, strict=True):
            assert torch.equal(stopped[0, :9], edited[0, :9])
            assert torch.equal(stopped[1, :4], edited[1, :4])
            assert torch.equal(stopped[0, 9:], base[0, 9:])
            assert torch.equal(stopped[1, 4:], base[1, 4:])
        assert not torch.equal(everywhere[1][0, 9:], plain[1][0, 9:])  # V's edit reaches there
        # K: the edit reaches there (local); global locking's keys are not edited
        assert torch.equal(everywhere[0][0, 9:], plain[0][0, 9:]) == (lock == "global")
    state.lengths = torch.tensor([9])
    with pytest.raises(ValueError, match="lengths of shape"):
        PerfusionAttnProcessor(state, name).key_value(attn, encodings, supers)


def test_deactivate_forgets_the_lengths(pipe: Any, encode: Encode,
                                        concept_state: MakeState) -> None:
    encodings = encode([PROMPT])
    state = concept_state(encodings[0, 6:7], encodings, beta=0.7)
    state.lengths = torch.tensor([3])
    version = state.version
    state.deactivate()
    assert state.lengths is None and state.version > version
