"""Make a small synthetic training set in upstream's prepared-data format (for tests and the examples).

    python tools/make_synthetic_dataset.py --release tests/data/tiny-release --out /tmp/synth/train \\
        --num-utts 64 --num-shards 4 --seed 0 [--dpo] [--instruct]

Writes what upstream's ``tools/make_parquet_list.py`` writes into ``--out``: ``parquet_000000000.tar`` ...
(parquet files, upstream's names), ``utt2parquet_*.json``, ``spk2parquet_*.json``, and ``data.list``,
``utt2data.list``, ``spk2data.list``.  Columns and arrow types are those pandas gives upstream's lists:
utt, audio_data (binary: a 16-bit PCM WAV file), wav (a path that does not exist: the audio lives in
audio_data), text, spk (strings), utt_embedding / spk_embedding (list<double>), speech_token
(list<int64>), instruct (string, with ``--instruct``), reject_speech_token (list<int64>, with ``--dpo``).

The data are learnable, and the same "language" for every seed (``--language-seed``): a fixed lexicon
maps each of 24 made-up words to 4-8 speech tokens; an utterance is 6-12 words (at least 1.04 s, the
shortest upstream's filter keeps); its audio renders each token as 40 ms (one 25 Hz token) of a tone
whose pitch is the token's and whose timbre is the speaker's, so the mel is a function of the tokens
and the speaker.  The speaker embedding is a fixed random unit vector per speaker (4 speakers), the
utterance embedding that plus a little noise.  ``--dpo`` adds a rejected sequence: the chosen tokens
with a third of them replaced at random.  Only numpy, soundfile and pyarrow are needed (no torch).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np

NUM_WORDS = 24
NUM_SPEAKERS = 4
SAMPLES_PER_TOKEN = 960  # 40 ms at 24 kHz: one 25 Hz speech token
SAMPLE_RATE = 24000
MIN_TOKENS = 26  # 26 * 40 ms = 1.04 s > upstream's filter min_length of 1 s
INSTRUCT = "You are a helpful assistant.<|endofprompt|>"


def lexicon(speech_token_size: int, seed: int) -> dict[str, list[int]]:
    """Word -> speech tokens, fixed by ``seed``."""
    rng = np.random.default_rng([seed, 1])
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: dict[str, list[int]] = {}
    while len(words) < NUM_WORDS:
        word = "".join(rng.choice(list(consonants)) + rng.choice(list(vowels)) for _ in range(rng.integers(1, 3)))
        if word not in words:
            words[word] = rng.integers(0, speech_token_size, rng.integers(4, 9)).tolist()
    return words


def speakers(spk_embed_dim: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, 2])
    out = []
    for k in range(NUM_SPEAKERS):
        v = rng.standard_normal(spk_embed_dim)
        out.append({"name": f"spk{k}", "embedding": v / np.linalg.norm(v), "harmonics": rng.uniform(0.1, 0.6, 3),
                    "gain": float(rng.uniform(0.2, 0.4))})
    return out


def render(tokens: list[int], speaker: dict, speech_token_size: int) -> np.ndarray:
    """40 ms of a tone per token: pitch from the token id, harmonics and gain from the speaker."""
    t = np.arange(SAMPLES_PER_TOKEN) / SAMPLE_RATE
    pieces = []
    for tok in tokens:
        f0 = 120.0 * 2 ** (3.0 * tok / speech_token_size)  # 120 Hz to 960 Hz
        wave = np.sin(2 * np.pi * f0 * t)
        for h, a in enumerate(speaker["harmonics"], start=2):
            wave += a * np.sin(2 * np.pi * h * f0 * t)
        pieces.append(wave)
    audio = np.concatenate(pieces)
    return (speaker["gain"] * audio / np.max(np.abs(audio))).astype(np.float32)


def wav_bytes(audio: np.ndarray) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def make_rows(num_utts: int, *, speech_token_size: int, spk_embed_dim: int, seed: int, language_seed: int,
              dpo: bool, instruct: bool) -> list[dict]:
    words = lexicon(speech_token_size, language_seed)
    spks = speakers(spk_embed_dim, language_seed)
    names = sorted(words)
    rng = np.random.default_rng([seed, 3])
    rows = []
    for i in range(num_utts):
        spk = spks[int(rng.integers(NUM_SPEAKERS))]
        chosen: list[str] = []
        while sum(len(words[w]) for w in chosen) < MIN_TOKENS or (len(chosen) < 12 and rng.random() < 0.3):
            chosen.append(names[int(rng.integers(len(names)))])
        tokens = [t for w in chosen for t in words[w]]
        utt_emb = spk["embedding"] + 0.05 * rng.standard_normal(spk_embed_dim)
        row = {"utt": f"{spk['name']}_{seed}_{i:05d}", "audio_data": wav_bytes(render(tokens, spk, speech_token_size)),
               "wav": f"synthetic/{spk['name']}_{seed}_{i:05d}.wav",
               "text": " ".join(chosen).capitalize() + ".", "spk": spk["name"],
               "utt_embedding": utt_emb.tolist(), "spk_embedding": spk["embedding"].tolist(), "speech_token": tokens}
        if instruct:
            row["instruct"] = INSTRUCT
        if dpo:
            rejected = list(tokens)
            for j in rng.choice(len(tokens), len(tokens) // 3, replace=False):
                rejected[j] = int(rng.integers(speech_token_size))
            row["reject_speech_token"] = rejected
        rows.append(row)
    return rows


def write_dataset(out_dir: str, rows: list[dict], num_shards: int) -> str:
    """Shards + lists exactly as make_parquet_list.py names them; returns the data.list path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cosyjax.atomic import staged_dir

    types = {"utt": pa.string(), "audio_data": pa.binary(), "wav": pa.string(), "text": pa.string(),
             "spk": pa.string(), "utt_embedding": pa.list_(pa.float64()), "spk_embedding": pa.list_(pa.float64()),
             "speech_token": pa.list_(pa.int64()), "instruct": pa.string(), "reject_speech_token": pa.list_(pa.int64())}
    columns = [c for c in types if c in rows[0]]
    per_shard = -(-len(rows) // num_shards)
    out_dir = os.path.abspath(out_dir)
    with staged_dir(out_dir) as tmp:
        lists: dict[str, list[str]] = {"data.list": [], "utt2data.list": [], "spk2data.list": []}
        for i, start in enumerate(range(0, len(rows), per_shard)):
            part = rows[start:start + per_shard]
            table = pa.table({c: pa.array([r[c] for r in part], type=types[c]) for c in columns})
            names = {"data.list": f"parquet_{i:09d}.tar", "utt2data.list": f"utt2parquet_{i:09d}.json",
                     "spk2data.list": f"spk2parquet_{i:09d}.json"}
            pq.write_table(table, os.path.join(tmp, names["data.list"]))
            parquet = os.path.join(out_dir, names["data.list"])
            with open(os.path.join(tmp, names["utt2data.list"]), "w", encoding="utf-8") as f:
                json.dump({r["utt"]: parquet for r in part}, f, ensure_ascii=False, indent=2)
            with open(os.path.join(tmp, names["spk2data.list"]), "w", encoding="utf-8") as f:
                json.dump({s: parquet for s in sorted({r["spk"] for r in part})}, f, ensure_ascii=False, indent=2)
            for key, name in names.items():
                lists[key].append(os.path.join(out_dir, name))
        for key, paths in lists.items():
            with open(os.path.join(tmp, key), "w", encoding="utf-8") as f:
                f.write("".join(p + "\n" for p in paths))
    return os.path.join(out_dir, "data.list")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True, help="release directory (speech_token_size, spk_embed_dim)")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--num-utts", type=int, default=64)
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="which utterances (use another seed for a dev set)")
    parser.add_argument("--language-seed", type=int, default=0, help="the lexicon, voices and their tokens")
    parser.add_argument("--dpo", action="store_true", help="add reject_speech_token (make_parquet_list.py --dpo)")
    parser.add_argument("--instruct", action="store_true", help=f"add an instruct column ({INSTRUCT!r})")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.num_utts < 1 or not 1 <= args.num_shards <= args.num_utts:
        parser.error("need --num-utts >= 1 and 1 <= --num-shards <= --num-utts")
    if os.path.exists(args.out) and not args.overwrite:
        parser.error(f"{args.out} exists (pass --overwrite to replace it)")
    from cosyjax.config import load_model_config

    cfg = load_model_config(args.release)
    rows = make_rows(args.num_utts, speech_token_size=cfg.llm.speech_token_size, spk_embed_dim=cfg.flow.spk_embed_dim,
                     seed=args.seed, language_seed=args.language_seed, dpo=args.dpo, instruct=args.instruct)
    print(write_dataset(args.out, rows, args.num_shards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
