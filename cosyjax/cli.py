"""``cosyjax`` command line: thin argument parsing over the library.

Commands:
  cosyjax tts --text T [--prompt-wav W --prompt-text P] [--mode ...] [--stream] [--seed N] -o out.wav
  cosyjax batch --manifest M.jsonl --out DIR [--model-dir M] [--batch-size N] [--spkinfo DIR] [...]
  cosyjax convert --model-dir M --out O [--dtype float32|bfloat16] [--llm-file llm.pt|llm.rl.pt] [--overwrite]
  cosyjax export --converted-dir C --out O [--template RELEASE_DIR]   (JAX -> upstream .pt)
  cosyjax export-programs --model-dir M --out O [--platforms cpu,cuda,tpu]   (jax.export StableHLO programs)
  cosyjax serve --model-dir M [--host 127.0.0.1] [--port 50000] [--api-key K] [--spkinfo DIR]   (pip install "cosyjax[server]")
  cosyjax webui --model-dir M [--host 127.0.0.1] [--port 8000] [--share] [--spkinfo DIR]   (pip install "cosyjax[webui]")
  cosyjax parity check --case DIR --out REPORT_DIR [--stages llm,flow,hift]
  cosyjax parity make-case --reference-repo PATH --config CONFIG.yaml --seed N --out DIR
  cosyjax parity live --reference-repo PATH --model-dir M --out REPORT_DIR
  cosyjax train --config CONF.yaml --data data.list --model llm|flow --out RUN [--init M] [--lora R] [--dpo --ref M]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

EXAMPLES = """examples:
  cosyjax tts --text "Hello world." --prompt-wav prompt.wav \\
      --prompt-text "You are a helpful assistant.<|endofprompt|>Transcript of prompt.wav." -o out.wav
  cosyjax tts --model-dir tests/data/tiny-release --text "Hello world." --prompt-wav p.wav --stream -o out.wav
  cosyjax batch --model-dir tests/data/tiny-release --manifest test.jsonl --out wavs/ --batch-size 16
  cosyjax convert --model-dir pretrained_models/Fun-CosyVoice3-0.5B --out converted/cv3
  COSYJAX_API_KEY=secret cosyjax serve --model-dir pretrained_models/Fun-CosyVoice3-0.5B --spkinfo voices/ \\
      --prompt-dir prompts/ --cors-origin https://app.example.com
  cosyjax convert --model-dir pretrained_models/Fun-CosyVoice3-0.5B --llm-file llm.rl.pt --out converted/cv3-rl
  cosyjax parity check --case tests/data/tiny-a --out /tmp/report --stages hift
  cosyjax parity make-case --reference-repo ~/src/CosyVoice --config tests/data/configs/tiny-b.yaml \\
      --seed 0 --out /tmp/tiny-b
"""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: reported as one line, no traceback."""
    from cosyjax.checkpoint import CheckpointError
    from cosyjax.config import ConfigError

    from cosyjax.pipeline import HubError

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, FileNotFoundError, FileExistsError, HubError,
                                         ValueError, KeyError]
    try:  # these packages need torch; without it the commands that use them fail earlier
        from cosyjax.convert.common import ConversionError
        from cosyjax.parity.case import CaseError
        from cosyjax.parity.check import CheckError

        errors += [ConversionError, CaseError, CheckError]
    except ImportError:
        pass
    return tuple(errors)


def _mode(args: argparse.Namespace) -> str:
    if args.mode != "auto":
        return args.mode
    if args.source_wav:
        return "vc"
    if args.instruct_text:
        return "instruct2"
    return "zero_shot" if args.prompt_text else "cross_lingual"


def _cmd_tts(args: argparse.Namespace) -> int:
    import os
    import tempfile
    import time

    import numpy as np

    from cosyjax.pipeline import CosyVoice3
    from cosyjax.serving.pcm import write_wav16

    mode = _mode(args)
    if mode != "vc" and not (args.text and args.text.strip()):
        raise ValueError("--text is empty")
    if not args.prompt_wav:
        raise ValueError("--prompt-wav is required (the voice to clone)")
    if mode == "zero_shot" and not args.prompt_text:
        raise ValueError("zero_shot mode needs --prompt-text (the transcript of --prompt-wav)")
    if mode == "instruct2" and not args.instruct_text:
        raise ValueError("instruct2 mode needs --instruct-text")
    if mode == "vc" and not args.source_wav:
        raise ValueError("vc mode needs --source-wav")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir}: output directory does not exist")
    tts = CosyVoice3.from_pretrained(args.model_dir, dtype=args.dtype, backend=args.backend,
                                     converted_dir=args.converted_dir, llm_file=args.llm_file, limits=limits(args))
    if args.warmup:
        print(tts.model.warmup(stream=args.stream, offline=not args.stream))
    text = args.text
    kw = dict(stream=args.stream, speed=args.speed)
    prompt_kw = dict(seed=args.seed, language=args.language, strict=args.strict_prompt)
    if mode == "zero_shot":
        gen = tts.inference_zero_shot(text, args.prompt_text, args.prompt_wav, **prompt_kw, **kw)
    elif mode == "cross_lingual":
        gen = tts.inference_cross_lingual(text, args.prompt_wav, **prompt_kw, **kw)
    elif mode == "instruct2":
        gen = tts.inference_instruct2(text, args.instruct_text, args.prompt_wav, **prompt_kw, **kw)
    else:
        gen = tts.inference_vc(args.source_wav, args.prompt_wav, **kw)
    chunks, start = [], time.perf_counter()
    for i, out in enumerate(gen):
        chunks.append(np.asarray(out["tts_speech"], np.float32).reshape(-1))
        if args.stream:
            print(f"chunk {i}: {chunks[-1].size / tts.sample_rate:.2f} s at {time.perf_counter() - start:.2f} s")
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:  # e.g. the LLM chose a stop token at once: write nothing rather than an empty file
        raise ValueError("the model produced no audio for this input; nothing was written")
    fd, tmp = tempfile.mkstemp(suffix=".wav", dir=out_dir)
    os.close(fd)
    try:
        write_wav16(tmp, audio, tts.sample_rate)  # the HTTP API's and the web UI's int16 samples
        os.replace(tmp, args.output)
    except BaseException:
        os.unlink(tmp)
        raise
    seconds = audio.size / tts.sample_rate
    elapsed = time.perf_counter() - start
    print(f"wrote {args.output}: {seconds:.2f} s of audio in {elapsed:.2f} s (RTF {elapsed / seconds:.3f})")
    return 0


def _cmd_export_programs(args: argparse.Namespace) -> int:
    from cosyjax.export_programs import export_programs
    from cosyjax.pipeline import CosyVoice3

    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    tts = CosyVoice3.from_pretrained(args.model_dir, dtype=args.dtype, converted_dir=args.converted_dir,
                                     llm_file=args.llm_file, limits=limits(args), progress=not args.quiet)
    manifest = export_programs(tts.model, args.out, platforms=platforms, overwrite=args.overwrite,
                               progress=not args.quiet)
    size = sum(p["bytes"] for p in manifest["programs"])
    print(f"wrote {len(manifest['programs'])} programs ({size / 1e6:.1f} MB, {', '.join(platforms)}) to {args.out}")
    return 0


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """The request limits (``cosyjax.limits.Limits``) as options; defaults are ``Limits()``'s."""
    from cosyjax.limits import Limits

    d = Limits()
    g = p.add_argument_group("request limits (warm-up compiles every program they allow)")
    g.add_argument("--max-text-tokens", type=int, default=d.max_text_tokens, help="text tokens per request")
    g.add_argument("--max-prompt-text-tokens", type=int, default=d.max_prompt_text_tokens)
    g.add_argument("--max-prompt-seconds", type=float, default=d.max_prompt_seconds)
    g.add_argument("--max-output-seconds", type=float, default=d.max_output_seconds,
                   help="generated speech per request (caps the LLM)")


def limits(args: argparse.Namespace):
    from cosyjax.limits import Limits

    return Limits(max_text_tokens=args.max_text_tokens, max_prompt_text_tokens=args.max_prompt_text_tokens,
                  max_prompt_seconds=args.max_prompt_seconds, max_output_seconds=args.max_output_seconds)


def _cmd_batch(args: argparse.Namespace) -> int:
    from cosyjax.batch import BatchInterrupted, run_batch

    try:
        summary = run_batch(args.manifest, args.out, model_dir=args.model_dir, converted_dir=args.converted_dir,
                            dtype=args.dtype, llm_file=args.llm_file, backend=args.backend, batch_size=args.batch_size,
                            spkinfo=args.spkinfo, subtype=args.subtype, devices=args.devices, limit=args.limit,
                            progress=not args.quiet, progress_all_processes=args.progress_all_processes,
                            coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                            process_id=args.process_id, auto_detect_cluster=args.distributed)
    except BatchInterrupted as e:
        print(f"{e.summary.line()}\ninterrupted: rerun the same command to finish the rest", file=sys.stderr)
        return 130
    if summary.process == 0 or args.progress_all_processes:
        if not args.quiet or summary.failed:
            print(summary.line() + (f"; failures in {args.out}/errors.jsonl" if summary.failed else ""))
    return 1 if summary.failed else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from cosyjax.convert import convert_to_dir

    out = convert_to_dir(args.model_dir, args.out, dtype=args.dtype, llm_file=args.llm_file,
                         overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


DEFAULT_GRPC_PORT = 50001  # the HTTP port's neighbour: upstream's clients both default to 50000


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util
    import logging

    try:
        import uvicorn

        from cosyjax.server import INSTALL_HINT, create_app
    except ImportError as e:  # the server is an optional extra
        cause = e.__cause__ if isinstance(e.__cause__, ImportError) else e
        print(f"cosyjax: error: serve needs fastapi, uvicorn, python-multipart and prometheus-client "
              f"(missing: {cause.name or cause}); "
              'pip install "cosyjax[server]"', file=sys.stderr)
        return 2
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        print(f"cosyjax: error: {INSTALL_HINT} (python-multipart is missing)", file=sys.stderr)
        return 2
    import os

    from cosyjax.pipeline import CosyVoice3
    from cosyjax.serving import EngineConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tts = CosyVoice3.from_pretrained(args.model_dir, dtype=args.dtype, backend=args.backend,
                                     converted_dir=args.converted_dir, llm_file=args.llm_file, progress=False)
    if args.spkinfo and os.path.isdir(args.spkinfo):
        print(f"cached voices: {', '.join(tts.load_spkinfo(args.spkinfo)) or '(none)'}")
    limits = {"max_text_chars": args.max_text_chars, "max_pending": args.max_pending}
    limits = {k: v for k, v in limits.items() if v is not None}
    engine = EngineConfig(**{k: v for k, v in (("slots", args.slots), ("max_pending", args.max_pending),
                                               ("workers", args.workers)) if v is not None})
    api_key = args.api_key or os.environ.get("COSYJAX_API_KEY") or None
    app = create_app(tts, **limits, engine_config=engine, cors_origins=tuple(args.cors_origin or ()), api_key=api_key,
                     spkinfo_dir=args.spkinfo, prompt_dir=args.prompt_dir, warmup=not args.no_warmup,
                     drain_seconds=args.drain_seconds)
    grpc_server = None
    if not args.no_grpc:  # upstream's gRPC service beside the HTTP routes, on the same engine
        try:
            from cosyjax.serving.grpc_service import serve_grpc
        except ImportError as e:
            print(f"cosyjax: error: the gRPC service needs grpcio (missing: {e.name or e}); "
                  'pip install "cosyjax[server]", or pass --no-grpc', file=sys.stderr)
            return 2
        grpc_server = serve_grpc(tts, args.host, args.grpc_port, api_key=api_key, engine_config=engine,
                                 **({"max_text_chars": args.max_text_chars} if args.max_text_chars else {}))
    print(f"serving {args.model_dir} ({tts.sample_rate} Hz, {tts.model.policy.name}, {tts.device.platform}) "
          f"on http://{args.host}:{args.port}"
          + (f" and grpc://{args.host}:{args.grpc_port}" if grpc_server else "")
          + f" (auth {'on' if api_key else 'off'}; {engine.slots} slots)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=max(1, int(args.drain_seconds)))
    finally:
        if grpc_server is not None:  # open calls get the same drain time as HTTP requests
            grpc_server.stop(args.drain_seconds).wait()
    return 0


def _cmd_webui(args: argparse.Namespace) -> int:
    import logging

    try:
        from cosyjax import webui

        webui._gradio()
    except ImportError as e:  # gradio is an optional extra: webui.INSTALL_HINT
        print(f"cosyjax: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return webui.main(args.model_dir, converted_dir=args.converted_dir, host=args.host, port=args.port,
                      share=args.share, spkinfo=args.spkinfo, dtype=args.dtype, backend=args.backend,
                      llm_file=args.llm_file)


def _cmd_export(args: argparse.Namespace) -> int:
    from cosyjax.checkpoint import load_converted
    from cosyjax.convert.export import export_to_dir

    model = load_converted(args.converted_dir)
    out = export_to_dir(model, args.out, template_dir=args.template, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _print_summary(report: dict) -> None:
    for g in report["groups"]:
        print(f"  {g['group']:22s} {g['status']:16s} max_abs_err={g['max_abs_err']} min_snr_db={g['min_snr_db']}")
    print("PASSED" if report["passed"] else "FAILED")


def _stages(text: str | None) -> list[str] | None:
    return None if text is None else [s for s in text.split(",") if s.strip()]


def _cmd_check(args: argparse.Namespace) -> int:
    from cosyjax.parity.check import run_check

    report = run_check(args.case, args.out, stages=_stages(args.stages), dtype=args.dtype,
                       overwrite=args.overwrite, progress=not args.quiet)
    _print_summary(report)
    print(f"report: {args.out}/report.json, {args.out}/report.html, {args.out}/outputs.npz")
    return 0 if report["passed"] else 1


def _cmd_make_case(args: argparse.Namespace) -> int:
    from cosyjax.parity.make_case import make_case

    out = make_case(args.reference_repo, args.config, args.seed, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_live(args: argparse.Namespace) -> int:
    from cosyjax.parity.live import run_live

    report = run_live(args.reference_repo, args.model_dir, args.out, stages=_stages(args.stages),
                      seed=args.seed, overwrite=args.overwrite)
    _print_summary(report)
    return 0 if report["passed"] else 1


LLM_FILE_HELP = ("LLM checkpoint in the release to convert: llm.pt (upstream's choice, default) or llm.rl.pt "
                 "(the 2512 release's RL-tuned LLM); with --converted-dir it is what that dir was made from")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The options that load a pipeline (tts, serve, webui): release, converted copy, precision, backend."""
    p.add_argument("--model-dir", default="FunAudioLLM/Fun-CosyVoice3-0.5B-2512",
                   help="release directory or Hugging Face Hub id (downloaded once; offline: pass a local dir)")
    p.add_argument("--converted-dir", default=None,
                   help="output of `cosyjax convert` (default: convert on first use, cached next to the model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="precision policy: float32 (upstream's numerics), bfloat16 (bf16 matmuls/convs, float32 "
                        "accumulation), auto (float32 on CPU, bfloat16 on GPU/TPU; default)")
    p.add_argument("--llm-file", default="llm.pt", help=LLM_FILE_HELP)
    p.add_argument("--backend", default=None, help="JAX platform: cpu, gpu or tpu (default: JAX's default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyjax", description="CosyVoice3 in JAX/Flax.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tts", help="synthesise speech (zero-shot, cross-lingual, instruct2, voice conversion)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--text", default="", help="text to speak")
    p.add_argument("--prompt-wav", help="recording of the voice to clone (wav/flac/ogg)")
    p.add_argument("--prompt-text", help="zero-shot: transcript of --prompt-wav, after '<|endofprompt|>' "
                   "(without the marker, 'You are a helpful assistant.<|endofprompt|>' is put before it)")
    p.add_argument("--instruct-text", help="instruct2: the instruction, ending with '<|endofprompt|>'")
    p.add_argument("--language", default=None,
                   help="build the prompt with a language instruction (en, zh, ja, ko, de, es, fr, it, ru, yue); "
                   "the prompt/instruct/cross-lingual text must then not hold '<|endofprompt|>'")
    p.add_argument("--strict-prompt", action="store_true",
                   help="refuse a prompt without '<|endofprompt|>' (as upstream) instead of building it")
    p.add_argument("--source-wav", help="vc: the speech to convert into the prompt's voice")
    p.add_argument("--mode", default="auto", choices=["auto", "zero_shot", "cross_lingual", "instruct2", "vc"])
    p.add_argument("--stream", action="store_true", help="stream (upstream's chunk schedule), print chunk times")
    p.add_argument("--speed", type=float, default=1.0, help="speaking rate (non-stream only)")
    p.add_argument("--seed", type=int, default=0, help="one PRNG key per request: same seed, same audio")
    p.add_argument("-o", "--output", required=True, help="output wav (24 kHz, written atomically)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every program the limits allow first (and report how many and how long)")
    add_limit_args(p)
    p.set_defaults(func=_cmd_tts)

    p = sub.add_parser("export-programs", help="jax.export every stage program (StableHLO) with a manifest",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="release directory or Hugging Face Hub id")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--platforms", default="cpu", help="comma-separated: cpu, cuda, tpu (default: cpu)")
    p.add_argument("--converted-dir", default=None, help="output of `cosyjax convert` (default: convert on first use)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the programs' precision policy")
    p.add_argument("--llm-file", default="llm.pt", help=LLM_FILE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_limit_args(p)
    p.set_defaults(func=_cmd_export_programs)

    p = sub.add_parser("batch", help="synthesise a JSONL manifest into a directory of wavs (resumable, "
                       "every local device, multi-host)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True,
                   help="JSONL, one object per line: id, mode (zero_shot/cross_lingual/instruct2/vc), text, "
                        "prompt_wav + prompt_text or spk_id, instruct_text, source_wav, seed, speed "
                        "(paths relative to the manifest's folder); every line is checked before any work")
    p.add_argument("--out", required=True, help="output directory: <id>.wav, results.jsonl, errors.jsonl, "
                                                "summary.json; a rerun skips the lines already done")
    p.add_argument("--model-dir", default="FunAudioLLM/Fun-CosyVoice3-0.5B-2512",
                   help="release directory or Hugging Face Hub id (downloaded once; offline: pass a local dir)")
    p.add_argument("--converted-dir", default=None,
                   help="output of `cosyjax convert` (default: convert on first use, cached next to the model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--llm-file", default="llm.pt", help=LLM_FILE_HELP)
    p.add_argument("--backend", default=None, help="JAX platform: cpu, gpu or tpu (default: JAX's default)")
    p.add_argument("--batch-size", type=int, default=8, help="model rows (text segments) per batch per device")
    p.add_argument("--spkinfo", default=None, help="directory written by CosyVoice3.save_spkinfo: voices for spk_id")
    p.add_argument("--subtype", default="PCM_16", choices=["PCM_16", "PCM_24", "FLOAT"],
                   help="wav sample format (PCM_16 as cosyjax tts writes; FLOAT keeps the float32 audio)")
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices (default: all)")
    p.add_argument("--limit", type=int, default=None, help="run at most N of the pending lines (a trial run)")
    p.add_argument("--coordinator-address", default=None,
                   help="multi-host: HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="multi-host: processes (default: $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process (default: $JAX_PROCESS_ID)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host with jax.distributed.initialize()'s cluster detection (Slurm, Open MPI, TPU)")
    p.add_argument("--progress-all-processes", action="store_true", help="a progress bar on every process, not only 0")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line (unless lines failed)")
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser("convert", help="convert a release directory (PyTorch .pt) to a JAX checkpoint",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="release directory (cosyvoice3.yaml, llm.pt, flow.pt, hift.pt)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage dtype of the converted weights (the precision policy is chosen when running)")
    p.add_argument("--llm-file", default="llm.pt", help=LLM_FILE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="write a converted (e.g. fine-tuned) model back as upstream .pt files",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--converted-dir", required=True, help="output of `cosyjax convert` (or of a fine-tune)")
    p.add_argument("--out", required=True, help="output directory: llm.pt, flow.pt, hift.pt (written atomically)")
    p.add_argument("--template", default=None,
                   help="release directory whose yaml, CosyVoice-BlankEN/ and ONNX files are copied alongside")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="HTTP server: upstream's FastAPI routes (int16 PCM), OpenAI-compatible "
                            "/v1/audio/speech, /speakers, /synthesize, /metrics; requests batched on one engine",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface, "
                        "then set --api-key)")
    p.add_argument("--port", type=int, default=50000, help="upstream's default port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $COSYJAX_API_KEY; "
                        "none: no authentication)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; default: no CORS headers)")
    p.add_argument("--spkinfo", default=None,
                   help="voice directory (CosyVoice3.save_spkinfo format): loaded at start, POST /speakers saves "
                        "there, unknown ids are looked up there again (replicas may share it)")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT,
                   help="port of upstream's gRPC service (package cosyvoice, rpc Inference), served beside the HTTP "
                        "routes on the same host and engine (default: %(default)s; upstream's own gRPC server uses "
                        "50000, the HTTP default here: point its client.py at --port %(default)s)")
    p.add_argument("--no-grpc", action="store_true", help="HTTP only: no gRPC service")
    p.add_argument("--prompt-dir", default=None,
                   help="directory whose files /synthesize's prompt_audio may name (nothing outside it)")
    p.add_argument("--slots", type=int, default=None, help="LLM decode slots of the batching engine (default: 8)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads running the requests' flow and vocoder beside the LLM decode (default: 2)")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on shutdown, how long in-flight requests may finish (default: 30)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling the engine's programs at start-up (the first requests compile instead)")
    p.add_argument("--max-text-chars", type=int, default=None,
                   help="longest text field accepted per request (default: cosyjax.server's, 2000)")
    p.add_argument("--max-pending", type=int, default=None,
                   help="requests in flight (and waiting for the engine) before 503 (default: 16)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("webui", help="Gradio web page (upstream's demo): every mode, streamed playback, cached voices",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--spkinfo", default=None,
                   help="directory of cached voices (CosyVoice3.save_spkinfo); voices saved in the page go there")
    p.set_defaults(func=_cmd_webui)

    parity = sub.add_parser("parity", help="parity harness against the upstream PyTorch reference")
    psub = parity.add_subparsers(dest="parity_command", required=True)

    p = psub.add_parser("check", help="check cosyjax stages against a reference case")
    p.add_argument("--case", required=True, help="case directory (shared/golden/FORMAT.md layout)")
    p.add_argument("--out", required=True, help="report directory (report.json, report.html, outputs.npz)")
    p.add_argument("--stages", help="comma-separated stages or groups (default: all the case holds)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_check)

    p = psub.add_parser("make-case", help="make a reference case from an upstream CosyVoice checkout")
    p.add_argument("--reference-repo", required=True, help="source checkout of FunAudioLLM/CosyVoice")
    p.add_argument("--config", required=True, help="case config yaml (sizes, lengths); see tests/data/configs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_make_case)

    p = psub.add_parser("live", help="compare against upstream running live on a real release directory")
    p.add_argument("--reference-repo", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stages")
    p.add_argument("--seed", type=int, default=0, help="seed for the random test inputs")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_live)

    from cosyjax.train.cli import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"cosyjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
