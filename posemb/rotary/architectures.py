"""What each transformers architecture does with its rotary, where its config is silent.

A Hugging Face config gives the frequencies; the *pairing* of channels (half-split or adjacent),
which channels of a head rotate, and the sign of the angle live in the model's code. This table
records them per ``model_type``, each entry with the transformers 5.24 function it mirrors (paths
relative to ``transformers/models/``), so ``from_hf_config`` never guesses:

* ``ARCHITECTURES[model_type]``: the :class:`Architecture` of every model type whose text rotary
  posemb reproduces (checked by ``tests/test_hf_zoo.py`` against the model's own rotary module and
  apply function).
* ``REFUSED[model_type]``: model types whose rotary posemb cannot express as a 1-D ``RoPE``, with
  the reason; ``from_hf_config`` raises that reason.
* any other model type: the layout is what the config proves (``rope_interleave``, or an explicit
  ``layout=``); otherwise half-split is assumed and ``from_hf_config`` warns that it assumed it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class Architecture:
    """How one architecture applies RoPE.

    layout: ``"half"`` (``rotate_half``: channel i pairs with i + r/2), ``"interleaved"`` (2i with
        2i+1), or ``"config"``: the model branches on ``config.rope_interleave`` (then
        ``interleave_default`` when the key is absent, the config class's default).
    evidence: the transformers function(s) that decide it.
    layer_thetas: for v4-style flat configs of models with per-layer-type bases, ``layer_type ->
        (config key of that type's base, default base, whether rope_scaling applies to it)``
        (the model's ``convert_rope_params_to_dict``).
    no_rope: how NoPE layers are declared (``"no_rope_layers"``: a 0/1 list, 0 = no RoPE;
        ``"rope_parameters_none"``: the layer type's ``rope_parameters`` entry is None;
        ``"sliding_only"``: only sliding-window layers rotate, Cohere2; ``"sliding_when_windowed"``: with a
        ``sliding_window`` only sliding layers rotate, without one all do, EXAONE 4).
    mrope: for M-RoPE text rotaries (positions (3, batch, seq)), ``(interleaved, default
        mrope_section)``: whether the model interleaves the T/H/W pairs, and the section its rotary
        uses when ``rope_parameters`` has no ``mrope_section``.
    default_full_width: the model's own ``compute_default_rope_parameters`` (used for ``rope_type
        "default"`` instead of transformers' shared one) rotates the whole head, ignoring a
        ``partial_rotary_factor`` in the rope dict (which only its other types read).
    """

    layout: str
    evidence: str
    interleave_default: bool = True
    layer_thetas: Mapping[str, tuple[str, float, bool]] = field(default_factory=dict)
    no_rope: str | None = None
    mrope: tuple[bool, tuple[int, int, int]] | None = None
    default_full_width: bool = False


def _group(model_types: str, architecture: Architecture) -> dict[str, Architecture]:
    return {name: architecture for name in model_types.split()}


_HALF_EVIDENCE = ("rotate_half = cat(-x[..., d/2:], x[..., :d/2]) in <model>/modeling_<model>.py "
                  "apply_rotary_pos_emb (the Llama form)")
_HALF = Architecture("half", _HALF_EVIDENCE)
_GEMMA3_THETAS = {"full_attention": ("rope_theta", 1_000_000.0, True),
                  "sliding_attention": ("rope_local_base_freq", 10_000.0, False)}
_MODERNBERT_THETAS = {"full_attention": ("global_rope_theta", 160_000.0, True),
                      "sliding_attention": ("local_rope_theta", 10_000.0, False)}

#: model types whose default, rope_type variants and layer types agree with transformers' own rotary
#: (the half-split group was found by running each model's apply_rotary_pos_emb, see tests/test_hf_zoo.py)
ARCHITECTURES: dict[str, Architecture] = {
    **_group("""EvollaModel afmoe apertus apertus1p5 apertus1p5_text arcee aria aria_text bamba beam bitnet
        blt chameleon cohere_compass cohere_compass_text csm dbrx deepseek_ocr2 deepseek_ocr2_text
        dia diffllama diffusion_gemma diffusion_gemma_text doge dory dots1 embedding_gemma2
        embedding_gemma2_text emu3 esm esmc eurobert exaone4 exaone_moe falcon falcon_h1
        flex_olmo flint gemma gemma2 gemma3 gemma3_text gemma3n gemma3n_text gemma4 gemma4_text
        gemma4_unified gemma4_unified_text glmasr gpt_neox gpt_neox_japanese gpt_oss
        gradium_phonon_tts granite granite_swa granitemoe granitemoe_swa granitemoehybrid
        granitemoeshared gte higgs_audio_v2 hrm_text hunyuan_v1_dense hunyuan_v1_moe hy_v3
        hyperclovax jais2 jetmoe jina_embeddings_v3 kolibri1 kolibri1_1 kyutai_speech_to_text laguna lara_mini
        lfm2 lfm2_moe lfm3 llama mellum mimo_v2_flash minicpm3 minimax minimax_m2 ministral
        minicpm5_moe mistral mixtral modernbert modernbert-decoder muse_glimmer muse_spark musicflamingo
        nemotron nemotron3_diarization neomme neucodec nomic_bert olmo olmo2 olmo3 olmo_hybrid
        olmoe persimmon phi phi3 phi4_multimodal phimoe pocket_tts qwen2 qwen2_moe qwen3 qwen3_moe
        qwen3_next recurrent_gemma seed_oss smollm3 solar_open stablelm starcoder2 step3p7 t5gemma
        t5gemma2_text timesfm2_5 ultrabert vaultgemma voxtral_realtime xcodec2 zamba2 zaya
        evolla cwm dia_decoder emu3_text_model granite4_vision_text
        granite_docling_text idefics lasr_encoder mimi mllama_text_model molmo2_text moshi muse_glimmer_text
        muse_glimmer_assistant muse_spark_text nemotron3_5_transcribe_asr_audio pocket_tts_audio_tokenizer
        qwen2_5_omni_dit step3p5 t5_gemma_module unlimited_ocr_text voxtral_realtime_text""", _HALF),
    # NoPE layers and per-layer-type bases, on top of the half-split pairing
    "smollm3": Architecture("half", _HALF_EVIDENCE + "; SmolLM3DecoderLayer.use_rope = no_rope_layers[i]",
                            no_rope="no_rope_layers"),
    "gemma3": Architecture("half", _HALF_EVIDENCE, layer_thetas=_GEMMA3_THETAS),
    "gemma3_text": Architecture("half", _HALF_EVIDENCE, layer_thetas=_GEMMA3_THETAS),
    "modernbert": Architecture("half", _HALF_EVIDENCE, layer_thetas=_MODERNBERT_THETAS),
    "modernbert-decoder": Architecture("half", _HALF_EVIDENCE, layer_thetas=_MODERNBERT_THETAS),
    "exaone4": Architecture("half", _HALF_EVIDENCE + "; Exaone4Attention rotates only sliding layers when "
                            "sliding_window is set (is_sliding)", no_rope="sliding_when_windowed"),
    # rope_type "default" through the model's own compute_default_rope_parameters: dim = head_dim, the
    # layer's partial_rotary_factor (Gemma 4's proportional full-attention layers carry 0.25) is not read
    **_group("gemma4 gemma4_text gemma4_unified gemma4_unified_text lfm3", Architecture(
        "half", _HALF_EVIDENCE + "; <Model>TextRotaryEmbedding.compute_default_rope_parameters: dim = head_dim "
        "(gemma4/modeling_gemma4.py, lfm3/modeling_lfm3.py)", default_full_width=True)),
    # adjacent pairs (2i, 2i+1) although the config says nothing about layout
    **_group("gptj codegen", Architecture("interleaved", "gptj/modeling_gptj.py: rotate_every_two "
                                          "(x[..., ::2], x[..., 1::2]); codegen/modeling_codegen.py the same")),
    **_group("llama4 llama4_text", Architecture(
        "interleaved", "llama4/modeling_llama4.py: apply_rotary_emb, view_as_complex over (2i, 2i+1); "
        "Llama4TextDecoderLayer.use_rope = no_rope_layers[i]", no_rope="no_rope_layers")),
    "deepseek_v2": Architecture("interleaved", "deepseek_v2/modeling_deepseek_v2.py: apply_rotary_emb, "
                                "view_as_complex over (2i, 2i+1)"),
    **_group("cohere", Architecture("interleaved", "cohere/modeling_cohere.py: rotate_half pairs x[..., ::2] "
                                    "with x[..., 1::2], cos/sin repeat_interleave(2)")),
    **_group("cohere2 cohere2_moe", Architecture(
        "interleaved", "cohere2/modeling_cohere2.py: rotate_half over x[..., ::2], x[..., 1::2]; "
        "Cohere2Attention applies RoPE only on sliding layers (sliding_window is not None)",
        no_rope="sliding_only")),
    **_group("ernie4_5 ernie4_5_moe", Architecture(
        "interleaved", "ernie4_5/modeling_ernie4_5.py: rotate_half over x[..., 0::2], x[..., 1::2], "
        "cos/sin repeat_interleave(2)")),
    **_group("glm glm4 glm_ocr glm_ocr_text", Architecture(
        "interleaved", "glm/modeling_glm.py, glm4/modeling_glm4.py: rotate_half over x[..., 0::2], "
        "x[..., 1::2], cos[..., :d/2].repeat_interleave(2)")),
    "ergo": Architecture("interleaved", "ergo/modeling_ergo.py: rotate_half over x[..., ::2], x[..., 1::2], "
                         "cos/sin repeat_interleave(2)"),
    "helium": Architecture("interleaved", "helium/modeling_helium.py: rotate_half over x[..., 0::2], x[..., 1::2]"),
    **_group("moonshine moonshine_streaming", Architecture(
        "interleaved", "moonshine/modeling_moonshine.py: rotate_half over x[..., 0::2], x[..., 1::2]")),
    **_group("pe_audio_encoder pe_audio_video_encoder pe_video_encoder", Architecture(
        "interleaved", "pe_audio_video/modeling_pe_audio_video.py: rotate_half over x[..., 0::2], x[..., 1::2]")),
    "openai_privacy_filter": Architecture(
        "interleaved", "openai_privacy_filter/modeling_openai_privacy_filter.py: _apply_rotary_emb over "
        "x[..., ::2], x[..., 1::2]"),
    # MLA models: the rope sub-head is rotated by apply_rotary_pos_emb_interleave (de-interleave, then
    # rotate_half), unconditionally ...
    **_group("axk2 bailing_hybrid deepseek_v32 dots3_note hy_v4 dots3_note_text glm_moe_dsa longcat_flash "
             "mistral_large4 mistral_large4_text",
             Architecture("interleaved", "<model>/modeling_<model>.py: q_rot, k_rot = "
                          "apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin) in the MLA attention")),
    # ... or when config.rope_interleave (default True) says so
    # M-RoPE over the half-split pairing; Qwen3-VL interleaves T/H/W whatever the config says (its
    # config lists mrope_interleaved in ignore_keys_at_rope_validation, the code never reads it)
    **_group("qwen2_vl qwen2_vl_text qwen2_5_vl qwen2_5_vl_text qwen2_5_omni qwen2_5_omni_text "
             "qwen2_5_omni_thinker paddleocr_vl paddleocr_vl_text", Architecture(
        "half", "qwen2_vl/modeling_qwen2_vl.py (and qwen2_5_omni, paddleocr_vl): <Model>RotaryEmbedding."
        "recomposition_frequencies, cat(m[i % 3] for m in freq.split(mrope_section)), default mrope_section "
        "[16, 24, 24]; rotate_half", mrope=(False, (16, 24, 24)))),
    **_group("qwen3_vl qwen3_vl_text qwen3_vl_moe qwen3_vl_moe_text cosmos3_edge cosmos3_edge_text "
             "qwen3_omni_moe qwen3_omni_moe_thinker qwen3_omni_moe_text", Architecture(
        "half", "qwen3_vl/modeling_qwen3_vl.py (and cosmos3_edge, qwen3_omni_moe's thinker): "
        "<Model>TextRotaryEmbedding.recomposition_frequencies, H at pairs 1::3 below 3*s_h, W at 2::3 below "
        "3*s_w, T elsewhere, default mrope_section [24, 20, 20]; rotate_half", mrope=(True, (24, 20, 20)))),
    # Qwen3-VL's interleaved recomposition in other families (each verified on (3, B, L) positions by the zoo)
    **_group("qwen3_5 qwen3_5_text qwen3_5_moe qwen3_5_moe_text qwen4_exp qwen4_exp_text", Architecture(
        "half", "qwen3_5/modeling_qwen3_5.py (and qwen3_5_moe, qwen4_exp): <Model>TextRotaryEmbedding, Qwen3-VL's "
        "interleaved recomposition, default mrope_section [11, 11, 10] (Qwen4-Exp: over 128 pairs, those from 33 "
        "on temporal); rotate_half on the leading cos.shape[-1] channels", mrope=(True, (11, 11, 10)))),
    **_group("hy_v4_vl hy_v4_vl_text", Architecture(
        "interleaved", "hy_v4_vl/modeling_hy_v4_vl.py: HYV4VLRotaryEmbedding, Qwen3-VL's interleaved "
        "recomposition, default mrope_section [24, 20, 20]; rotate_half over x[..., 0::2], x[..., 1::2]",
        mrope=(True, (24, 20, 20)))),
    # GLM-4V family: contiguous sections; the released checkpoints rotate half the head
    # (partial_rotary_factor 0.5 with [8, 12, 12]). The default configs leave the factor out, so there
    # the model's own rotary fails (split sizes summing to 32 of 64 pairs) and posemb refuses.
    # GLM-4.1V pairs adjacent channels; GLM-4.5V (glm4v_moe) and GLM-Image use the half split.
    **_group("glm4v glm4v_text", Architecture(
        "interleaved", "glm4v/modeling_glm4v.py: Glm4vTextRotaryEmbedding.recomposition_frequencies, "
        "cat(m[i % 3] for m in freq.split(mrope_section)).repeat_interleave(2), default mrope_section "
        "[8, 12, 12]; rotate_half_llm (x[..., 0::2], x[..., 1::2]) on the leading cos.shape[-1] channels",
        mrope=(False, (8, 12, 12)))),
    **_group("glm4v_moe glm4v_moe_text glm_image glm_image_text", Architecture(
        "half", "glm4v_moe/modeling_glm4v_moe.py (and glm_image): Glm4vMoeTextRotaryEmbedding."
        "recomposition_frequencies, cat(m[i % 3] for m in freq.split(mrope_section)) then cat([freq, freq]), "
        "default mrope_section [8, 12, 12]; rotate_half on the leading cos.shape[-1] channels",
        mrope=(False, (8, 12, 12)))),
    # MiniMax-M3-VL's text rotary is 1-D (no mrope_section anywhere in the model)
    **_group("minimax_m3_vl minimax_m3_vl_text", Architecture(
        "half", "minimax_m3_vl/modeling_minimax_m3_vl.py: MiniMaxM3VLRotaryEmbedding.forward (1-D positions), "
        "apply_rotary_pos_emb with rotate_half on the leading cos.shape[-1] channels")),
    **_group("deepseek_v3 glm4_moe_lite mistral4 youtu axk1",
             Architecture("config", "<model>/modeling_<model>.py: `if self.config.rope_interleave: "
                          "apply_rotary_pos_emb_interleave` else apply_rotary_pos_emb")),
}

_MROPE = ("M-RoPE: the text rotary takes (3, batch, seq) temporal/height/width positions split by "
          "mrope_section; posemb's 1-D RoPE would agree on text tokens only and be wrong on image/video tokens")
_AXIAL = "2-D vision RoPE (rope_type 'axial'): positions are (row, column) pairs, not a 1-D RoPE"


def _refuse(model_types: str, reason: str) -> dict[str, str]:
    return {name: reason for name in model_types.split()}


#: model types posemb refuses, with the reason (``from_hf_config`` raises it; tests/test_hf_zoo.py reads it)
REFUSED: dict[str, str] = {
    "deepseek_v4": ("DeepSeek-V4 rotates the trailing channels of each head (deepseek_v4/modeling_deepseek_v4.py: "
                    "apply_rotary_pos_emb on x[..., -rope_dim:]) with compressed-attention bases; posemb's RoPE "
                    "rotates leading channels"),
    "nanochat": ("NanoChat rotates by -θ (nanochat/modeling_nanochat.py: rotate_half = cat(x2, -x1)); posemb's "
                 "RoPE rotates by +θ"),
    "dots3_note_audio_encoder": ("dots3_note/modeling_dots3_note.py holds several attention classes with different "
                                 "apply functions (apply_rotary_pos_emb, apply_rotary_pos_emb_interleave); the "
                                 "audio encoder's pairing is not verified"),
    **_refuse("ernie4_5_vl_moe ernie4_5_vl_moe_text", "ERNIE 4.5 VL has its own M-RoPE layout (ernie4_5_vl_moe/modeling_ernie4_5_vl_moe.py: "
                             "Ernie4_5_VLMoeTextRotaryEmbedding pre-permutes inv_freq and alternates height/width "
                             "over the first s_0 + s_1 pairs, temporal last); posemb's MRoPE has the contiguous "
                             "(Qwen2-VL) and interleaved (Qwen3-VL) layouts only"),
    **_refuse("hunyuan_vl hunyuan_vl_text", "HunYuan-VL's M-RoPE takes as many axes as mrope_section has entries, each counted in "
                        "channels (hunyuan_vl/modeling_hunyuan_vl.py: HunYuanVLRotaryEmbedding, split sizes "
                        "2 * section); posemb's MRoPE has three axes counted in pairs"),
    **_refuse("glm5_next glm5_next_text inkling2 inkling2_text",
              "the text model's rotary is not defined in its modeling file (only a vision rotary is): "
              "posemb cannot verify which rotary and pairing the text stack uses"),
}


def architecture(model_type: str | None) -> Architecture | None:
    """The table entry for ``model_type``, or None when posemb does not know the architecture."""
    return ARCHITECTURES.get(model_type) if model_type is not None else None


def refusal(model_type: str | None) -> str | None:
    """Why posemb refuses ``model_type``, or None."""
    return REFUSED.get(model_type) if model_type is not None else None


__all__ = ["Architecture", "ARCHITECTURES", "REFUSED", "architecture", "refusal"]
