"""`moeflow bench quality`: held-out perplexity of a model with its experts as loaded and quantized.

The held-out text is the demo's own split of its corpus (--corpus: the folder it was trained on, train/data.py's
fixed held-out files) when given; otherwise a deterministic stand-in generated here: the standard library's
docstrings (pydoc's plain text) of the modules whose documentation pages the demo held out (math, threading, zlib,
...), so the same text on every host with the same Python.
"""

from __future__ import annotations

import io
import json
import math
import sys
from contextlib import redirect_stdout
from pathlib import Path

import torch

from moeflow import MoeflowError

# modules whose library/*.rst pages are in the demo's held-out split (its training_log.json)
HELDOUT_MODULES = ("math", "threading", "zlib", "symtable", "urllib.robotparser", "email.charset", "unittest",
                   "importlib.resources")


def standin_text() -> str:
    """The held-out modules' documentation as pydoc renders it in plain text."""
    import importlib
    import pydoc

    out = []
    for name in HELDOUT_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        with redirect_stdout(io.StringIO()):  # pydoc may print while importing submodules
            out.append(pydoc.render_doc(mod, renderer=pydoc.plaintext))
    return "\n".join(out)


def heldout_windows(tokenizer, corpus: str | None, context: int, max_tokens: int) -> tuple[torch.Tensor, str]:
    """[n, context+1] windows of the held-out text, at most max_tokens predicted tokens; and where it came from."""
    from moeflow.train import data

    if corpus:
        texts, source = data.read_corpus(Path(corpus))[1], f"held-out files of {corpus}"
    else:
        texts, source = [standin_text()], "standard-library docstrings (stand-in: no --corpus)"
    wins = data.windows(data.token_stream(tokenizer, texts), context)
    n = max(max_tokens // context, 1)
    if wins.shape[0] == 0:
        raise MoeflowError(f"the held-out text ({source}) is shorter than one window of {context} tokens")
    return wins[:n], source


def perplexity(ck, wins: torch.Tensor, batch_size: int = 8) -> float:
    from moeflow.train.report import score

    device = next(ck.model.parameters()).device
    nll, n, _ = score(ck.model, wins, batch_size, device)
    return math.exp(nll / n)


def add_parser(bsub) -> None:
    q = bsub.add_parser("quality", help="held-out perplexity with the experts as loaded, in int8 and in int4")
    q.add_argument("--model", default="builtin:pydoc-moe", help="checkpoint folder, builtin:NAME or synthetic:NAME")
    q.add_argument("--quantize", default="int8,int4", help="comma-separated --quantize values to compare")
    q.add_argument("--corpus", help="the demo's corpus folder (its held-out split); default: a stand-in text")
    q.add_argument("--context", type=int, default=128, help="tokens per window")
    q.add_argument("--max-tokens", type=int, default=8192, help="at most this many tokens scored")
    q.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs")
    q.add_argument("--out", help="write the results as JSON here")
    q.set_defaults(func=run)


def run(args) -> int:
    from moeflow.checkpoint import load

    if args.context < 2 or args.max_tokens < 1:
        raise MoeflowError("--context must be at least 2 and --max-tokens at least 1")
    base = load(args.model, device=args.device)
    wins, source = heldout_windows(base.tokenizer, args.corpus, args.context, args.max_tokens)
    rows = [{"experts": str(base.store.dtype).removeprefix("torch."), "expert_bytes": base.store.expert_bytes,
             "perplexity": perplexity(base, wins)}]
    for q in filter(None, args.quantize.split(",")):
        ck = load(args.model, device=args.device, quant=q)
        rows.append({"experts": ck.store.fmt.spec.name, "expert_bytes": ck.store.expert_bytes,
                     "perplexity": perplexity(ck, wins)})
    print(f"{base.name}: {wins.numel() - wins.shape[0]:,} tokens of {source}")
    for r in rows:
        r["vs_dense"] = r["perplexity"] / rows[0]["perplexity"]
        print(f"  {r['experts']:>16}: perplexity {r['perplexity']:.3f} ({r['vs_dense'] - 1:+.1%}), "
              f"{r['expert_bytes'] / 1e6:.3f} MB an expert")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": base.name, "source": source, "rows": rows}, indent=1))
    sys.stdout.flush()
    return 0
