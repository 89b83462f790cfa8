"""Extra stage ``first_chunk`` (not in --all): where the first streamed chunk of a zero-shot request goes.

``cosyjax.pipeline.CosyVoice3.inference_zero_shot(..., stream=True, timings=...)`` on the committed tiny
release (``tests/data/tiny-release``: LLM 2 layers x 64, DiT 2 x 64, HiFT 32 channels, stream hop 5 tokens),
a synthetic 3 s voiced prompt (``benchmarks.batch.prompt_voice``) and one short sentence.  The tiny release's
own ``speech_tokenizer_v3.onnx`` / ``campplus.onnx`` are small stand-in graphs that the jax frontend's
converter refuses, so the pipelines run the release-structure ONNX models of ``tests/data/frontend-models``
(S3Tokenizer v3, 2 layers x 32, codebook 6561; CAM++ with 4 channels, 16-d embedding; random weights):
onnxruntime for ``frontend="onnx"``, their Flax conversion for ``frontend="jax"``.  Their outputs are folded
into the tiny model's sizes (tokens % 64, the embedding repeated to 192: ``_TinyTokenizer`` /
``_TinyEncoder``, microseconds).  Three rows:

- new voice, ``frontend="jax"``: prompt audio -> Flax speech tokenizer and speaker encoder -> LLM prefill
  of the whole prompt -> decode -> flow -> HiFT;
- new voice, ``frontend="onnx"``: the same with onnxruntime prompt models (upstream's runtime);
- cached voice (``add_zero_shot_spk`` then ``zero_shot_spk_id``, on the jax-frontend pipeline): no prompt
  audio work, and the LLM prefills only sos + prompt text once per voice (``lm.VoicePrefix``, made by the
  warm-up call), so each request prefills the rest (its text, the task id, the prompt speech tokens).

``--quick`` (the test) drops the jax-frontend row, whose CAM++ alone takes ~40 s to compile on the busy
2-core machine, runs the cached voice on the onnx pipeline and compares it with the onnx new voice.

Each row: a warm-up request (every program compiled; the cached voice's prefix made), then the timed
requests (their compile count recorded, 0 expected).  The value is the best wall time from the
``inference_zero_shot`` call to its first chunk; the request is then abandoned.  Afterwards (untimed) the
best request's model input, as the pipeline passed it (key and voice prefix included), is decoded to its end by
the model's own token source (``_token_source``, the LLM part of ``tts``; no flow/vocoder programs to
compile): ``tokens_identical`` says a row's LLM tokens equal the jax new voice's with the same seed, and
``first_chunk_identical`` that its first chunk's audio is bit-identical.  ``extra["breakdown_s"]`` splits the
best request's latency:
prompt audio stages (``extract_prompt``: audio_decode, speech_tokenizer, speaker_encoder, prompt_mel; the
two models' times also split into ``*_features``, whisper log-mel / kaldi fbank, and ``*_model``), the
model's first-chunk stages (``Trace.timings``: prefill, first_decode_chunk, first_flow, first_vocoder), the
decode chunks after the first one that the first hop still needs (``more_decode``: model first_chunk minus
its listed stages) and ``text_and_host`` (text normalisation and tokenization, request checks: the call's
wall time minus everything else).  ``prefill_tokens`` / ``prefill_slots`` are the LLM positions the
request prefilled (valid / padded to the program's bucket).

With ``--reference-repo``: upstream's own ``cosyvoice.cli.cosyvoice.CosyVoice3`` is built on the same
release (the harness's stand-ins, plus one for ``modelscope``, whose ``snapshot_download`` only runs for a
Hub id), but its first chunk is not timed, and each row's ``extra["upstream_note"]`` says why:
``CosyVoice3LM.inference`` asserts that the hard-coded id 151646 (the full tokenizer's ``<|endofprompt|>``)
is in the text, and the tiny release's tokenizer has it at 323, so every upstream request fails in its LLM
thread; and a new voice's ``frontend_zero_shot`` calls torchaudio (load, resample, kaldi fbank),
``whisper.log_mel_spectrogram`` and matcha's ``mel_spectrogram``, which are stand-ins here.  (Upstream
re-prefills the whole prompt for a cached voice too: ``add_zero_shot_spk`` stores only its features.)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.batch import prompt_voice
from benchmarks.common import REPO, finish_row, log, measure, new_row, set_cosyjax
from benchmarks.models import Bundle
from cosyjax.frontend.onnx_models import SpeakerEncoderBase, SpeechTokenizerBase

PROMPT_TEXT = "You are a helpful assistant.<|endofprompt|>A short prompt for the voice."
# by --quick: the random LLM decodes 20 x its text tokens (30 -> 600 speech tokens; "Hello." 4 -> 80)
TTS_TEXT = {False: "The quick brown fox jumps over the lazy dog.", True: "Hello."}
VOICE = {"seconds": 3.0, "f0": 170.0}
# timed requests per row (at least; --repeats above it counts): tiny dims, a request takes well under a second,
# and the best of several rides out the busy machine's noise
MIN_REPEATS = {False: 7, True: 3}
SPK_ID = "bench-voice"
# upstream CosyVoice3LM.inference: "NOTE temporary hardcode, 151646 is <|endofprompt|> token"
UPSTREAM_ENDOFPROMPT_ID = 151646
PROMPT_STAGES = ("audio_decode", "speech_tokenizer", "speaker_encoder", "prompt_mel")
MODEL_STAGES = ("prefill", "first_decode_chunk", "first_flow", "first_vocoder")
BREAKDOWN_KEYS = PROMPT_STAGES + MODEL_STAGES + ("more_decode", "text_and_host", "speech_tokenizer_features",
                                                  "speech_tokenizer_model", "speaker_encoder_features",
                                                  "speaker_encoder_model")
# Release-structure prompt models (S3Tokenizer v3 and CAM++ graphs at tiny dims, random weights): the tiny
# release's own ONNX files are small stand-in graphs that the jax frontend's converter refuses.
FRONTEND_CASE = os.path.join(REPO, "tests", "data", "frontend-models")


def _with_case_frontend(release: str, out: str) -> str:
    """A release directory: ``release``'s files (symlinked) with the frontend case's two ONNX models."""
    from cosyjax.pipeline import SPEAKER_ENCODER, SPEECH_TOKENIZER

    os.makedirs(out)
    case = os.path.join(FRONTEND_CASE, "model")
    for name in os.listdir(release):
        if name in (SPEECH_TOKENIZER, SPEAKER_ENCODER) or name.startswith("."):
            continue
        os.symlink(os.path.abspath(os.path.join(release, name)), os.path.join(out, name))
    for name in (SPEECH_TOKENIZER, SPEAKER_ENCODER):
        os.symlink(os.path.abspath(os.path.join(case, name)), os.path.join(out, name))
    return out


class _TinyTokenizer(SpeechTokenizerBase):
    """The pipeline's speech tokenizer (jax or onnx), its tokens folded into the tiny model's vocabulary
    (``% vocab``: the case's codebook has 6561 codes, the tiny LLM and flow 64); times the network."""

    def __init__(self, inner, vocab: int):
        self.inner, self.vocab, self.model_s = inner, int(vocab), 0.0

    def tokens_from_features(self, feats):
        start = time.perf_counter()
        out = np.asarray(self.inner.tokens_from_features(feats)) % self.vocab
        self.model_s = time.perf_counter() - start
        return out


class _TinyEncoder(SpeakerEncoderBase):
    """The pipeline's speaker encoder, its embedding repeated to the tiny flow's size (16 -> 192)."""

    def __init__(self, inner, dim: int):
        self.inner, self.dim, self.model_s = inner, int(dim), 0.0

    def embedding_from_features(self, feats):
        start = time.perf_counter()
        out = np.resize(np.asarray(self.inner.embedding_from_features(feats), np.float32), self.dim)
        self.model_s = time.perf_counter() - start
        return out


def _adapt(tts, cfg) -> tuple[_TinyTokenizer, _TinyEncoder]:
    tts.speech_tokenizer = _TinyTokenizer(tts.speech_tokenizer, cfg.flow.vocab_size)
    tts.speaker_encoder = _TinyEncoder(tts.speaker_encoder, cfg.flow.spk_embed_dim)
    return tts.speech_tokenizer, tts.speaker_encoder


class _Capture:
    """Keeps the model request of a pipeline's last segment (its ``Trace`` included): wraps the
    instance's ``_synthesize`` (an instance attribute; the class is untouched)."""

    def __init__(self, tts):
        self.requests: list[dict[str, Any]] = []
        original = tts._synthesize

        def synthesize(**request):
            self.requests.append(request)
            return original(**request)

        tts._synthesize = synthesize


def _prefill_counts(cfg, request: dict[str, Any], keys) -> dict[str, int]:
    """LLM positions the request prefilled: all of its layout, or the part after a voice prefix."""
    from cosyjax.llm import lm

    lm_req = lm.LMRequest.zero_shot(request["text_ids"], request["prompt_text_ids"],
                                    request["llm_prompt_speech_tokens"])
    full = int(lm.prepare(cfg, [lm_req], keys).lengths[0])
    prefix = request.get("voice_prefix")
    if prefix is None:
        return {"layout_tokens": full, "prefill_tokens": full, "prefill_slots": lm.bucket(full), "prefix_tokens": 0}
    cut = 1 + len(prefix.prompt_text)
    return {"layout_tokens": full, "prefill_tokens": full - cut, "prefill_slots": lm.bucket(full - cut),
            "prefix_tokens": cut, "prefix_slots": prefix.slots}


def _request(tts, capture: _Capture, text: str, seed: int, wav: bytes | None, adapters: tuple, spk_id: str = ""
             ) -> dict[str, Any]:
    """One streamed zero-shot request up to its first chunk (then abandoned): latency and stage times."""
    timings: dict[str, float] = {}
    capture.requests.clear()
    for a in adapters:
        a.model_s = 0.0
    start = time.perf_counter()
    gen = tts.inference_zero_shot(text, "" if spk_id else PROMPT_TEXT, wav, zero_shot_spk_id=spk_id,
                                  stream=True, seed=seed, timings=timings)
    first = np.asarray(next(gen)["tts_speech"])
    latency = time.perf_counter() - start
    gen.close()
    first_timings = dict(timings)
    if "speech_tokenizer" in first_timings:  # features (whisper log-mel / kaldi fbank) vs the network
        tok, spk = adapters
        first_timings.update(speech_tokenizer_model=tok.model_s, speaker_encoder_model=spk.model_s)
    if len(capture.requests) != 1:
        raise RuntimeError(f"{len(capture.requests)} segments started; the benchmark needs one")
    return {"latency": latency, "timings": first_timings, "audio": first, "request": capture.requests[0]}


def _tokens(tts, request: dict[str, Any]) -> np.ndarray:
    """Every LLM token of a captured request (same key, same voice prefix): the model's own token source
    (``CosyVoice3Model._token_source``, what ``tts`` decodes from) run to the end; no flow or vocoder.
    Untimed, after the timed requests."""
    from cosyjax.request import Trace

    m, r = tts.model, request
    req = m._request(r["text_ids"], r["prompt_text_ids"], r["llm_prompt_speech_tokens"],
                     r["flow_prompt_speech_tokens"], r["prompt_feat"], r["embedding"], None, None, r["speed"],
                     r["key"], False, r.get("voice_prefix"))
    chunks = [np.asarray(new, np.int64) for new, _ in m._token_source(req, m.schedule.base, Trace())]
    return np.concatenate([np.zeros(0, np.int64)] + chunks)


def _breakdown(out: dict[str, Any]) -> dict[str, float]:
    t = out["timings"]
    parts = {k: t.get(k, 0.0) for k in PROMPT_STAGES + MODEL_STAGES}
    for stage in ("speech_tokenizer", "speaker_encoder"):
        parts[f"{stage}_model"] = t.get(f"{stage}_model", 0.0)
        parts[f"{stage}_features"] = parts[stage] - parts[f"{stage}_model"]
    parts["more_decode"] = t["first_chunk"] - sum(t.get(k, 0.0) for k in MODEL_STAGES)
    parts["text_and_host"] = out["latency"] - t["first_chunk"] - sum(t.get(k, 0.0) for k in PROMPT_STAGES)
    return {k: round(v, 6) for k, v in parts.items()}


def _row(name: str, workload: str, m, sr: int, cfg, keys) -> tuple[dict[str, Any], dict[str, Any]]:
    best = min(m.outputs, key=lambda o: o["latency"])
    row = new_row("first_chunk", name, workload, "s")
    set_cosyjax(row, m, best["latency"])
    counts = _prefill_counts(cfg, best["request"], keys)
    row["extra"].update(breakdown_s=_breakdown(best), latencies_s=[round(o["latency"], 6) for o in m.outputs],
                        median_s=float(np.median([o["latency"] for o in m.outputs])),
                        first_chunk_audio_s=best["audio"].shape[1] / sr, **counts)
    if not all(np.array_equal(o["audio"], best["audio"]) for o in m.outputs):
        row["warnings"].append("the timed requests' first chunks differ")
    return row, best


def _release_dims(cfg) -> dict[str, Any]:
    return {"llm_layers": cfg.llm.num_layers, "llm_hidden": cfg.llm.hidden_size, "dit_depth": cfg.flow.depth,
            "dit_dim": cfg.flow.dim, "hift_channels": cfg.hift.base_channels,
            "stream_hop_tokens": cfg.flow.static_chunk_size // cfg.flow.token_mel_ratio}


def run(bundle: Bundle, release: str | None = None) -> list[dict[str, Any]]:
    import jax

    from cosyjax.convert import convert_to_dir
    from cosyjax.convert.frontend import convert_frontend_to_dir
    from cosyjax.pipeline import CosyVoice3

    wl = bundle.wl
    release = release or os.path.join(REPO, "tests", "data", "tiny-release")
    repeats = max(MIN_REPEATS[wl.quick], wl.repeats["stream"])
    text = TTS_TEXT[wl.quick]
    wav = prompt_voice(VOICE["seconds"], VOICE["f0"], wl.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cosyjax-bench-first-chunk-") as tmp:
        converted = convert_to_dir(release, os.path.join(tmp, "converted"), progress=False)
        model_dir = _with_case_frontend(release, os.path.join(tmp, "release"))
        with open(os.path.join(FRONTEND_CASE, "meta.json"), encoding="utf-8") as f:
            case_meta = json.load(f)
        # --quick: no jax-frontend row (its CAM++ alone compiles for ~40 s on the busy 2-core machine); the
        # cached voice then runs on the onnx pipeline and is compared with the onnx new voice
        frontends = ("onnx",) if wl.quick else ("jax", "onnx")
        base = frontends[0]
        pipes = {"onnx": CosyVoice3(model_dir, converted_dir=converted, frontend="onnx", progress=False)}
        if "jax" in frontends:
            frontend_dir = convert_frontend_to_dir(model_dir, os.path.join(tmp, "frontend"),
                                                   n_head=case_meta["speech_tokenizer"]["n_head"])
            pipes["jax"] = CosyVoice3(model_dir, converted_dir=converted, frontend="jax", frontend_dir=frontend_dir,
                                      progress=False)
        cfg = pipes["onnx"].config
        adapters = {k: _adapt(p, cfg) for k, p in pipes.items()}
        captures = {k: _Capture(p) for k, p in pipes.items()}
        sr = cfg.sample_rate
        keys = jax.random.split(jax.random.key(0), 1)
        dims = _release_dims(cfg)
        tok_m, cam_m = case_meta["speech_tokenizer"], case_meta["campplus"]
        dims.update(tokenizer_layers=tok_m["n_layer"], tokenizer_state=tok_m["n_state"],
                    campplus_channels=cam_m["m_channels"], campplus_embedding=cam_m["embedding_size"])
        where = (f"tiny release (LLM {dims['llm_layers']} x {dims['llm_hidden']}, DiT {dims['dit_depth']} x "
                 f"{dims['dit_dim']}, hop {dims['stream_hop_tokens']} tokens; prompt models: S3Tokenizer v3 "
                 f"{tok_m['n_layer']} x {tok_m['n_state']}, CAM++ {cam_m['m_channels']} channels), "
                 f"{VOICE['seconds']:g} s prompt")
        log(f"[first_chunk] {release}: {where}; {repeats} timed requests per row")

        results = {}
        for frontend in frontends:
            tts, cap = pipes[frontend], captures[frontend]
            m = measure(lambda: _request(tts, cap, text, wl.seed, wav, adapters[frontend]), repeats)
            row, best = _row(f"First chunk, new voice ({frontend} frontend)",
                             f"inference_zero_shot(stream=True), {where}: prompt audio → {frontend} prompt models "
                             "→ whole-prompt prefill → first hop", m, sr, cfg.llm, keys)
            row["extra"]["frontend"] = frontend
            results[frontend] = (row, best, _tokens(tts, best["request"]))
            log(f"[first_chunk] new voice, {frontend}: {row['cosyjax'] * 1e3:.1f} ms, {row['extra']['breakdown_s']}")

        tts, cap = pipes[base], captures[base]
        tts.add_zero_shot_spk(PROMPT_TEXT, wav, SPK_ID)
        m = measure(lambda: _request(tts, cap, text, wl.seed, None, adapters[base], SPK_ID), repeats)
        cached, best_c = _row("First chunk, cached voice", f"inference_zero_shot(zero_shot_spk_id, stream=True), "
                              f"{where}: cached features ({base} frontend) + voice prefix → prefill of the rest → "
                              "first hop", m, sr, cfg.llm, keys)
        tokens_c = _tokens(tts, best_c["request"])
        ref_row, best_a, tokens_a = results[base]
        identical = bool(np.array_equal(tokens_c, tokens_a))
        same_chunk = bool(np.array_equal(best_c["audio"], best_a["audio"]))
        same_prompt = (list(best_c["request"]["prompt_text_ids"]) == list(best_a["request"]["prompt_text_ids"]))
        cached["extra"].update(frontend=base, tokens_identical=identical, first_chunk_identical=same_chunk,
                               same_prompt_text_ids=same_prompt, reference_row=ref_row["name"],
                               llm_tokens=int(tokens_c.size),
                               prefill_saved_s=round(ref_row["extra"]["breakdown_s"]["prefill"]
                                                     - cached["extra"]["breakdown_s"]["prefill"], 6))
        cached["agreement"] = (f"{tokens_c.size} LLM tokens {'identical to' if identical else '⚠ differ from'} the "
                               f"{base} new voice's (seed {wl.seed}), first chunk "
                               f"{'bit-identical' if same_chunk else '⚠ differs'}; prefill "
                               f"{cached['extra']['prefill_tokens']} of {cached['extra']['layout_tokens']} positions "
                               f"({cached['extra']['prefill_slots']} slots vs {ref_row['extra']['prefill_slots']})")
        rows = []
        for frontend in frontends:
            row, best, tokens = results[frontend]
            row["extra"].update(llm_tokens=int(tokens.size), tokens_identical=bool(np.array_equal(tokens, tokens_a)),
                                first_chunk_identical=bool(np.array_equal(best["audio"], best_a["audio"])),
                                reference_row=ref_row["name"])
            if frontend != base:
                row["agreement"] = (f"{tokens.size} LLM tokens "
                                    f"{'identical to' if row['extra']['tokens_identical'] else 'differ from'} the "
                                    f"{base} frontend's (prompt speech tokens "
                                    f"{'equal' if row['extra']['tokens_identical'] else 'differ'}); first chunk "
                                    + ("bit-identical" if row["extra"]["first_chunk_identical"] else
                                       "not bit-identical (speaker embeddings differ by float rounding)"))
            rows.append(row)
        rows.append(cached)
        for row in rows:
            row["extra"].update(release=os.path.relpath(release, REPO), seed=wl.seed, tts_text=text,
                                prompt_seconds=VOICE["seconds"], **dims)
        log(f"[first_chunk] cached voice: {cached['cosyjax'] * 1e3:.1f} ms, tokens identical {identical}, "
            f"prefill {cached['extra']['prefill_tokens']} vs {ref_row['extra']['prefill_tokens']} tokens")

        if bundle.has_reference:
            try:
                _upstream(bundle, release, rows)
            except Exception as e:  # noqa: BLE001 - the cosyjax rows stand; say why upstream is missing
                log(f"[first_chunk] upstream: {type(e).__name__}: {e}")
                for row in rows:
                    row["extra"].setdefault("upstream_note", f"upstream not timed: {type(e).__name__}: {e}")
    return [finish_row(r) for r in rows]


# --------------------------------------------------------------------------------------------
# Upstream
# --------------------------------------------------------------------------------------------
def _upstream_pipeline(release: str) -> tuple[Any, list[str]]:
    """Upstream's CosyVoice3 on ``release`` (upstream already imported by the Bundle), and the extra stand-ins."""
    from cosyjax.parity.upstream import STAND_IN_MARK, _install, _module

    extra = []
    try:
        import modelscope

        if getattr(modelscope, STAND_IN_MARK, False):
            extra.append("modelscope")
    except ImportError:
        _install([_module("modelscope")])  # snapshot_download: only for a Hub id, raises if called
        extra.append("modelscope")
    from cosyvoice.cli.cosyvoice import CosyVoice3

    return CosyVoice3(release), extra


def _upstream(bundle: Bundle, release: str, rows: list[dict[str, Any]]) -> None:
    """Build upstream's pipeline on the release and record in every row why its first chunk is not timed."""
    start = time.perf_counter()
    cv, extra = _upstream_pipeline(release)
    built_s = time.perf_counter() - start
    ids = cv.frontend._extract_text_token(PROMPT_TEXT)[0][0].tolist()
    eop = cv.frontend.tokenizer.tokenizer.convert_tokens_to_ids("<|endofprompt|>")
    blocked = UPSTREAM_ENDOFPROMPT_ID not in ids
    why = (f"upstream CosyVoice3 built on this release in {built_s:.0f} s (stand-ins: "
           f"{', '.join(bundle.upstream_info.stand_ins + extra) or 'none'}), but not timed: ")
    reasons = []
    if blocked:
        reasons.append(f"its CosyVoice3LM.inference asserts the hard-coded <|endofprompt|> id "
                       f"{UPSTREAM_ENDOFPROMPT_ID} is in the text, and this release's tokenizer gives {eop} "
                       "(a request would kill upstream's LLM thread and leave its stream loop waiting)")
    reasons.append("its new-voice frontend_zero_shot calls torchaudio (load, resample, kaldi fbank), "
                   "whisper.log_mel_spectrogram and matcha's mel_spectrogram, stand-ins in the parity harness")
    note = why + "; ".join(reasons)
    for row in rows:
        row["extra"]["upstream_note"] = note
    log(f"[first_chunk] {note}")
    if not blocked:
        raise NotImplementedError("upstream first-chunk timing on a release with the real <|endofprompt|> id is "
                                  "not implemented")
