"""Write a diffusers Stable Diffusion pipeline as ONE "original LDM" .safetensors file.

This is the layout of A1111 / civitai checkpoints (the CompVis/Stability training code's
state dict): every weight of the UNet, the VAE and the text encoder(s) in one flat dict,

    model.diffusion_model.*                  UNet (openaimodel.UNetModel names)
    first_stage_model.*                      VAE (ldm AutoencoderKL names)
    SD 1.x  cond_stage_model.transformer.text_model.*   HF CLIPTextModel, as-is
    SD 2.x  cond_stage_model.model.*                    OpenCLIP text tower
    SDXL    conditioner.embedders.0.transformer.text_model.*   CLIP-L (HF names)
            conditioner.embedders.1.model.*                    OpenCLIP bigG, with text_projection

so that tests can exercise `StableDiffusionPipeline.from_single_file` /
`StableDiffusionXLPipeline.from_single_file` offline with tiny random models:

    pipe.save_pretrained(folder)               # configs, tokenizer, scheduler
    to_single_file(pipe, "model.safetensors")
    StableDiffusionPipeline.from_single_file(
        "model.safetensors", config=str(folder), local_files_only=True)

Every LDM name is derived from the model's own config (block counts, layers_per_block,
which blocks carry attention); every state-dict entry must be claimed by a rule, or
`to_ldm_state_dict` raises, so a silently dropped weight cannot happen here. (diffusers'
loader itself does NOT complain about missing keys: they keep the fresh random init, or
stay on the `meta` device when accelerate is installed; compare weights with torch.equal.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

FAMILIES = ("sd1", "sd2", "sdxl")


# --------------------------------------------------------------------------- helpers


def _rename(
    key: str, prefix_map: Mapping[str, str], leaf_map: Mapping[str, str] | None = None
) -> str | None:
    """Translate `key` by the longest module prefix in `prefix_map`, then the leaf module name.

    `prefix_map` maps a diffusers module path ("down_blocks.0.resnets.1.") to its LDM path
    ("input_blocks.2.0."); `leaf_map` renames the first component after it ("norm1." ->
    "in_layers.0."). Returns None when no prefix matches."""
    best = max((p for p in prefix_map if key.startswith(p)), key=len, default=None)
    if best is None:
        return None
    rest = key[len(best):]
    for old, new in (leaf_map or {}).items():
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    return prefix_map[best] + rest


def _translate(state: Mapping[str, torch.Tensor], rules, what: str) -> dict[str, torch.Tensor]:
    """Apply `rules` (callables key -> new key or None) to every entry; all must be claimed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for rule in rules:
            new = rule(key)
            if new is not None:
                break
        else:
            raise ValueError(f"{what}: no LDM name for {key!r} (unsupported model variant?)")
        if new in out:
            raise ValueError(f"{what}: two weights map to {new!r}")
        out[new] = value
    return out


# --------------------------------------------------------------------------- UNet

# diffusers ResnetBlock2D -> ldm ResBlock. In LDM, `in_layers`/`out_layers` are
# nn.Sequential(GroupNorm, SiLU, Conv) and (GroupNorm, SiLU, Dropout, Conv), so the convs sit
# at index 2 and 3; `emb_layers` is Sequential(SiLU, Linear).
UNET_RESNET_LEAVES = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}


def _unet_prefix_maps(config: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(resnet prefixes, other module prefixes) diffusers -> LDM, from the UNet config.

    LDM's UNetModel is flat: `input_blocks` is a list of TimestepEmbedSequential:
      input_blocks.0            conv_in
      then per resolution level `layers_per_block` entries [ResBlock (.0), SpatialTransformer (.1)]
      and, except on the last level, one Downsample entry (.0.op is its conv);
    `middle_block` = [ResBlock, SpatialTransformer, ResBlock];
    `output_blocks` has `layers_per_block + 1` entries per level [ResBlock (.0), attention (.1)]
    with the Upsample appended to the level's last entry, at .1 or .2 after an attention.
    diffusers' convert_ldm_unet_checkpoint recovers the level as (i - 1) // (layers_per_block + 1),
    hence the same numbering here. SpatialTransformer's inner names (norm, proj_in,
    transformer_blocks.N.attn1.to_q, ff.net.0.proj, proj_out) are the diffusers ones already."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError("per-block layers_per_block is not expressible in the LDM layout")
    resnets: dict[str, str] = {}
    other: dict[str, str] = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",  # Sequential(Linear, SiLU, Linear)
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_norm_out.": "out.0.",  # Sequential(GroupNorm, SiLU, Conv)
        "conv_out.": "out.2.",
    }
    if config.get("addition_embed_type") == "text_time":
        # SDXL: label_emb = Sequential(Sequential(Linear, SiLU, Linear))
        other["add_embedding.linear_1."] = "label_emb.0.0."
        other["add_embedding.linear_2."] = "label_emb.0.2."

    down_types = config["down_block_types"]
    for level, block_type in enumerate(down_types):
        first = 1 + level * (lpb + 1)
        src = f"down_blocks.{level}."
        for layer in range(lpb):
            resnets[f"{src}resnets.{layer}."] = f"input_blocks.{first + layer}.0."
            if "Attn" in block_type:
                other[f"{src}attentions.{layer}."] = f"input_blocks.{first + layer}.1."
        if level < len(down_types) - 1:  # last level has no downsampler
            other[f"{src}downsamplers.0.conv."] = f"input_blocks.{first + lpb}.0.op."

    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        # diffusers reads middle_block.{0,2} as resnets and .1 as attention: nothing else fits.
        raise ValueError(f"mid_block_type {config.get('mid_block_type')!r} has no LDM layout here")
    resnets["mid_block.resnets.0."] = "middle_block.0."
    other["mid_block.attentions.0."] = "middle_block.1."
    resnets["mid_block.resnets.1."] = "middle_block.2."

    up_types = config["up_block_types"]
    for level, block_type in enumerate(up_types):
        first = level * (lpb + 1)
        has_attn = "Attn" in block_type
        src = f"up_blocks.{level}."
        for layer in range(lpb + 1):
            resnets[f"{src}resnets.{layer}."] = f"output_blocks.{first + layer}.0."
            if has_attn:
                other[f"{src}attentions.{layer}."] = f"output_blocks.{first + layer}.1."
        if level < len(up_types) - 1:  # last level has no upsampler
            slot = 2 if has_attn else 1
            other[f"{src}upsamplers.0.conv."] = f"output_blocks.{first + lpb}.{slot}.conv."
    return resnets, other


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict -> `model.diffusion_model.*` (shapes unchanged)."""
    resnets, other = _unet_prefix_maps(unet.config)
    rules = (
        lambda k: _rename(k, resnets, UNET_RESNET_LEAVES),
        lambda k: _rename(k, other),
    )
    ldm = _translate(unet.state_dict(), rules, "unet")
    return {UNET_PREFIX + k: v for k, v in ldm.items()}


# --------------------------------------------------------------------------- VAE


def _vae_prefix_maps(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers AutoencoderKL module prefixes -> ldm `first_stage_model` ones.

    Encoder levels keep their index (down.i.block.j, down.i.downsample); the decoder's
    `up` list is stored in resolution order, i.e. reversed w.r.t. diffusers' up_blocks
    (diffusers' converter maps up_blocks.i <- up.{n-1-i}). The mid block is
    block_1 / attn_1 / block_2."""
    prefixes = {
        "quant_conv.": "quant_conv.",
        "post_quant_conv.": "post_quant_conv.",
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in."] = f"{part}.conv_in."
        prefixes[f"{part}.conv_out."] = f"{part}.conv_out."
        prefixes[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    n_down = len(config["down_block_types"])
    for i in range(n_down):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
    n_up = len(config["up_block_types"])
    for i in range(n_up):
        level = n_up - 1 - i
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{level}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{level}.upsample."
    return prefixes


# ldm's mid AttnBlock: GroupNorm `norm`, then q/k/v/proj_out as 1x1 Conv2d.
VAE_ATTENTION_LEAVES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> `first_stage_model.*`.

    The mid-block attention projections are nn.Linear in diffusers ([C, C]) but 1x1 convs
    in LDM ([C, C, 1, 1]); real files store the conv shape and diffusers squeezes it back
    (conv_attn_to_linear), so we write the conv shape too."""
    prefixes = _vae_prefix_maps(vae.config)

    def rule(key: str) -> str | None:
        new = _rename(key, prefixes)
        if new is None:
            return None
        # resnets: same leaf names except the 1x1 shortcut
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            head, leaf = new.split(".mid.attn_1.", 1)
            new = f"{head}.mid.attn_1." + _rename(leaf, {"": ""}, VAE_ATTENTION_LEAVES)
        return new

    ldm = _translate(vae.state_dict(), (rule,), "vae")
    projections = ("q.weight", "k.weight", "v.weight", "proj_out.weight")
    for key, value in ldm.items():
        if ".mid.attn_1." in key and key.endswith(projections) and value.ndim == 2:
            ldm[key] = value[:, :, None, None]
    return {VAE_PREFIX + k: v for k, v in ldm.items()}


# --------------------------------------------------------------------------- text encoders


def _hf_clip_state(text_encoder: Any) -> dict[str, torch.Tensor]:
    """HF CLIP state dict with keys relative to the text transformer: `embeddings.*`,
    `encoder.*`, `final_layer_norm.*` (+ `text_projection.weight` for *WithProjection).

    transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level) while
    CLIPTextModelWithProjection still wraps one; normalise both."""
    state = text_encoder.state_dict()
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def clip_to_ldm(text_encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD 1.x, SDXL encoder 0): the LDM FrozenCLIPEmbedder wrapped the HF
    model, so the names are HF's transformers-4 ones under `<prefix>text_model.`.

    (Real SD 1.x files also carry `...embeddings.position_ids`; diffusers ignores it and it
    is a non-persistent buffer in transformers 5, so it is not written.)"""
    state = _hf_clip_state(text_encoder)
    if "text_projection.weight" in state:
        raise ValueError("the CLIP-L slot has no text_projection in the LDM layout")
    return {f"{prefix}text_model.{k}": v for k, v in state.items()}


# HF CLIP encoder layer -> OpenCLIP ResidualAttentionBlock leaf names
OPEN_CLIP_LAYER_LEAVES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "self_attn.out_proj.": "attn.out_proj.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def open_clip_to_ldm(
    text_encoder: Any, prefix: str, with_projection: bool
) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP text tower names under `prefix` (SD 2.x, SDXL encoder 1).

    OpenCLIP uses torch.nn.MultiheadAttention, whose q, k and v projections are one
    `in_proj_weight` [3*D, D] / `in_proj_bias` [3*D], stacked in that order (diffusers'
    convert_open_clip_checkpoint splits them at D = text_projection.shape[0], else the
    model's hidden size). `positional_embedding` is a bare Parameter, same [T, D] tensor as
    the HF Embedding's weight. `text_projection` is a bare [D, P] matrix used as x @ P, the
    transpose of HF's Linear weight [P, D].

    SD 2.x's real file has 24 layers while diffusers' text encoder keeps 23 (SD 2 uses the
    penultimate layer): diffusers ignores exactly `resblocks.23` and `text_projection` under
    `cond_stage_model.model.`. We write the encoder's own layers only, so nothing is ignored."""
    state = _hf_clip_state(text_encoder)
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        if key == "text_projection.weight":
            if not with_projection:
                raise ValueError("unexpected text_projection for this slot")
            out["text_projection"] = value.t().contiguous()
            continue
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if match is None:
            raise ValueError(f"open_clip: no LDM name for {key!r}")
        layer, rest = int(match.group(1)), match.group(2)
        proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if proj is not None:
            qkv.setdefault((layer, proj.group(2)), {})[proj.group(1)] = value
            continue
        new = _rename(rest, {"": ""}, OPEN_CLIP_LAYER_LEAVES)
        if new == rest:
            raise ValueError(f"open_clip: no LDM name for {key!r}")
        out[f"transformer.resblocks.{layer}.{new}"] = value
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"open_clip: layer {layer} lacks one of q/k/v {kind}")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        stacked = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.resblocks.{layer}.attn.{name}"] = stacked
    if with_projection and "text_projection" not in out:
        raise ValueError("open_clip: this slot needs a CLIPTextModelWithProjection")
    return {prefix + k: v for k, v in out.items()}


# --------------------------------------------------------------------------- pipeline


def infer_family(pipe: Any) -> str:
    """"sdxl" when the pipeline has a second text encoder; otherwise "sd2" for a GELU text
    encoder (OpenCLIP ViT-H uses exact GELU, OpenAI CLIP quick_gelu) and "sd1" else.
    Pass `family=` to `to_single_file` to override."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"


def to_ldm_state_dict(pipe: Any, family: str | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's unet + vae + text encoder(s) as one LDM-layout state dict."""
    family = family or infer_family(pipe)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    parts = [unet_to_ldm(pipe.unet), vae_to_ldm(pipe.vae)]
    if family == "sd1":
        parts.append(clip_to_ldm(pipe.text_encoder, SD1_CLIP_PREFIX))
    elif family == "sd2":
        parts.append(open_clip_to_ldm(pipe.text_encoder, SD2_OPEN_CLIP_PREFIX, False))
    else:
        # diffusers tells SDXL's two encoders apart by the width of the position embedding
        # (it tries the CLIP-L slot first for any CLIP class): equal widths would load
        # encoder 0's weights into text_encoder_2 or fail on shapes.
        width_0 = pipe.text_encoder.config.hidden_size
        width_1 = pipe.text_encoder_2.config.hidden_size
        if width_0 == width_1:
            raise ValueError(f"SDXL text encoders need different hidden sizes (both {width_0})")
        parts.append(clip_to_ldm(pipe.text_encoder, SDXL_CLIP_PREFIX))
        parts.append(open_clip_to_ldm(pipe.text_encoder_2, SDXL_OPEN_CLIP_PREFIX, True))
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged


def to_single_file(pipe: Any, path: str | Path, family: str | None = None) -> Path:
    """Write `pipe`'s weights to `path` (.safetensors) in the original LDM layout; returns it.

    Tensors keep their dtype. Read back with, e.g.
    `StableDiffusionPipeline.from_single_file(path, config=<pipe.save_pretrained folder>,
    local_files_only=True)` (StableDiffusionXLPipeline for family "sdxl")."""
    from safetensors.torch import save_file

    state = to_ldm_state_dict(pipe, family)
    # safetensors refuses views that share storage; give every tensor its own, on the CPU.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
