"""LLM decode speed at the release dims (Qwen2 0.5B + CosyVoice3 heads), random weights, float32.

Ours: ``decode.prefill`` + one jitted ``decode.decode_chunk`` of ``--steps`` RAS steps (stop ids masked
so every row runs all steps), timed after a warm-up call of the same shapes.
Reference: HF ``Qwen2ForCausalLM`` (what upstream's ``Qwen2Encoder`` wraps) on the same weights,
decoding one token per call with its KV cache the way ``Qwen2Encoder.forward_one_step`` does, plus
``llm_decoder`` + log_softmax + multinomial per step.  With ``--reference-repo`` the upstream
``Qwen2Encoder.forward_one_step`` itself is used when the repo imports.

    python benchmarks/bench_llm.py [--batch-sizes 1,8,32] [--steps 12] [--prompt 16] [--no-reference]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cosyjax.config import LLMConfig  # noqa: E402
from cosyjax.llm import decode, lm  # noqa: E402
from cosyjax.llm.sampling import SamplerSettings  # noqa: E402


def release_config() -> LLMConfig:
    """The release's LLM config (from the full-size manifest)."""
    from cosyjax.parity.manifest import release_config as model_config

    return model_config().llm


def random_state_dict(cfg: LLMConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A llm.pt-layout state_dict with random float32 weights (std 0.02, norms 1)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))

    p = "llm.model.model."
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    sd = {p + "embed_tokens.weight": w(cfg.vocab_size, d), p + "norm.weight": np.ones(d, np.float32),
          "speech_embedding.weight": w(cfg.speech_vocab_size, d), "llm_decoder.weight": w(cfg.speech_vocab_size, d)}
    for i in range(cfg.num_layers):
        q = f"{p}layers.{i}."
        sd.update({
            q + "self_attn.q_proj.weight": w(cfg.num_heads * cfg.head_dim, d), q + "self_attn.q_proj.bias": w(d),
            q + "self_attn.k_proj.weight": w(kv, d), q + "self_attn.k_proj.bias": w(kv),
            q + "self_attn.v_proj.weight": w(kv, d), q + "self_attn.v_proj.bias": w(kv),
            q + "self_attn.o_proj.weight": w(d, cfg.num_heads * cfg.head_dim),
            q + "mlp.gate_proj.weight": w(f, d), q + "mlp.up_proj.weight": w(f, d), q + "mlp.down_proj.weight": w(d, f),
            q + "input_layernorm.weight": np.ones(d, np.float32),
            q + "post_attention_layernorm.weight": np.ones(d, np.float32),
        })
    sd["llm.model.lm_head.weight"] = sd[p + "embed_tokens.weight"]
    return sd


def requests_for(batch: int, steps: int, prompt: int, seed: int = 0) -> list[lm.LMRequest]:
    """Zero-shot requests whose min_len (2 * text) covers ``steps``; prompt length ``prompt`` in all."""
    rng = np.random.default_rng(seed)
    text = max(1, (steps + 1) // 2)
    speech = max(0, prompt - 2 - text - 8)
    return [lm.LMRequest.zero_shot(rng.integers(0, 151000, text), rng.integers(0, 151000, 8),
                                   rng.integers(0, 6561, speech)) for _ in range(batch)]


def bench_ours(params, cfg, batch: int, steps: int, prompt: int) -> dict[str, float]:
    settings = SamplerSettings.from_config(cfg.sampling, mask_all_stop_ids_before_min_len=True)
    reqs = requests_for(batch, steps, prompt)
    keys = jax.random.split(jax.random.key(0), batch)

    def run():
        t0 = time.perf_counter()
        state = lm.start(params, cfg, reqs, keys, settings)
        jax.block_until_ready(state.logits)
        t1 = time.perf_counter()
        state, chunk = decode.decode_chunk(params, state, cfg=cfg, settings=settings, num_steps=steps)
        n = int(chunk.steps)
        jax.block_until_ready(chunk.tokens)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, n

    t = time.perf_counter()
    run()  # compile
    compile_s = time.perf_counter() - t
    prefill_s, decode_s, n = run()
    return {"compile_s": compile_s, "prefill_ms": 1e3 * prefill_s, "step_ms": 1e3 * decode_s / n, "steps": n}


def _upstream_one_step(reference_repo: str | None):
    """Upstream's Qwen2Encoder.forward_one_step when importable, else None."""
    if not reference_repo:
        return None
    try:
        from cosyjax.parity.upstream import import_upstream

        import_upstream(reference_repo)
        from cosyvoice.llm.llm import Qwen2Encoder
    except Exception as e:  # noqa: BLE001 - any import failure means: use the HF loop instead
        print(f"[reference] cannot import upstream Qwen2Encoder from {reference_repo} ({type(e).__name__}: {e}); "
              "using the same HF calls directly")
        return None
    return Qwen2Encoder.forward_one_step


def bench_reference(state_dict, cfg, batch: int, steps: int, prompt: int, upstream_step) -> dict[str, float]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    hf_cfg = Qwen2Config(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, vocab_size=cfg.vocab_size,
                         rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                         use_sliding_window=False, sliding_window=None,
                         attn_implementation="sdpa")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(hf_cfg)
    weights = {k[len("llm.model."):]: torch.from_numpy(v) for k, v in state_dict.items() if k.startswith("llm.model.")}
    model.load_state_dict(weights, assign=True, strict=True)
    # The rotary inv_freq buffer is not in the state_dict: rebuild it off the meta device.
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    model.model.rotary_emb = Qwen2RotaryEmbedding(config=hf_cfg)
    model.eval()
    speech_emb = torch.from_numpy(state_dict["speech_embedding.weight"])
    decoder = torch.from_numpy(state_dict["llm_decoder.weight"])

    class Encoder:  # stands in for Qwen2Encoder: same .model attribute its forward_one_step uses
        pass

    encoder = Encoder()
    encoder.model = model

    def one_step(x, cache):
        length = x.shape[1]
        masks = torch.tril(torch.ones((x.shape[0], length, length))).to(torch.bool)
        if upstream_step is not None:
            return upstream_step(encoder, x, masks, cache)
        outs = model(inputs_embeds=x, attention_mask=masks[:, -1, :], output_hidden_states=True,
                     return_dict=True, use_cache=True, past_key_values=cache)
        return outs.hidden_states[-1], outs.past_key_values

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, prompt, cfg.hidden_size, generator=gen) * 0.02
    with torch.inference_mode():
        t0 = time.perf_counter()
        hidden, cache = one_step(x0, None)
        t1 = time.perf_counter()
        for _ in range(steps):
            logp = (hidden[:, -1] @ decoder.T).log_softmax(-1)
            tok = logp.softmax(-1).multinomial(1, generator=gen)[:, 0] % cfg.speech_token_size
            hidden, cache = one_step(speech_emb[tok][:, None], cache)
        t2 = time.perf_counter()
    return {"prefill_ms": 1e3 * (t1 - t0), "step_ms": 1e3 * (t2 - t1) / steps, "steps": steps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per batch size")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length (lm_input rows)")
    ap.add_argument("--reference-repo", default=None, help="upstream CosyVoice checkout (optional)")
    ap.add_argument("--no-reference", action="store_true", help="skip the HF/PyTorch half")
    args = ap.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    cfg = release_config()
    t = time.perf_counter()
    state_dict = random_state_dict(cfg)
    from cosyjax.convert.llm import convert

    params = jax.tree.map(jnp.asarray, convert(state_dict, cfg, "random"))
    print(f"# random 0.5B weights + conversion: {time.perf_counter() - t:.1f} s; backend {jax.default_backend()}, "
          f"jax {jax.__version__}, float32, {os.cpu_count()} cpus, {args.steps} steps, prompt {args.prompt}")
    upstream_step = None if args.no_reference else _upstream_one_step(args.reference_repo)
    if args.no_reference:
        print("# reference half skipped (--no-reference)")

    rows = []
    for b in batch_sizes:
        ours = bench_ours(params, cfg, b, args.steps, args.prompt)
        ref = None if args.no_reference else bench_reference(state_dict, cfg, b, args.steps, args.prompt, upstream_step)
        rows.append((b, ours, ref))
        print(f"bs={b}: ours {ours['step_ms']:.1f} ms/step (compile {ours['compile_s']:.1f} s)"
              + (f", reference {ref['step_ms']:.1f} ms/step" if ref else ""), flush=True)

    print("\n| batch | cosyjax ms/step | cosyjax ms/token | cosyjax prefill ms | HF ms/step | HF prefill ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for b, ours, ref in rows:
        hf = (f"{ref['step_ms']:.1f} | {ref['prefill_ms']:.0f} | {ref['step_ms'] / ours['step_ms']:.2f}x"
              if ref else "- | - | -")
        print(f"| {b} | {ours['step_ms']:.1f} | {ours['step_ms'] / b:.2f} | {ours['prefill_ms']:.0f} | {hf} |")


if __name__ == "__main__":
    main()
