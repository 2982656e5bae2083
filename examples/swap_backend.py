"""The same long-context run under every MemoryBank backend, changed only by the config.

memkit keeps chunk embeddings in a vector store chosen by name: exact FAISS, FAISS HNSW, hnswlib,
usearch, an on-disk SQLite + memory-mapped store, Qdrant (local mode here; a ``qdrant://host``
URI for a server) or Milvus (milvus-lite here; a ``milvus://host:19530/collection`` URI for a
server). Nothing else changes: each backend ingests the same haystack and answers the same question,
and the table shows that they retrieve the same chunks.

    python examples/swap_backend.py                       # 4k tokens x every backend
    python examples/swap_backend.py --tokens 8k --backends faiss-flat,disk
"""

import argparse
import tempfile
import time

import torch

import memkit
from memkit.evaluation.haystack import build_haystack, extract_key, parse_length
from memkit.models import load_smollm2

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--tokens", default="4k", help="haystack length in tokens, k = 1024 (default: 4k)")
parser.add_argument("--backends", default="faiss-flat,faiss-hnsw,hnswlib,usearch,disk,qdrant,milvus",
                    help="comma-separated backend names (default: all seven)")
parser.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 on a busy or shared machine)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

hf_model, tok = load_smollm2()
hay = build_haystack(tok, parse_length(args.tokens), depth=0.5, filler="classic", prompt="plain")
question = torch.tensor([hay.question_ids])
rows = []
with tempfile.TemporaryDirectory() as tmp:
    for name in args.backends.split(","):
        params = {"path": f"{tmp}/{name}"} if name in ("disk", "qdrant", "milvus") else {}
        config = memkit.MemoryConfig(bank=memkit.BankConfig(backend=name, params=params), progress=False)
        model = memkit.wrap(hf_model, config, tokenizer=tok)      # the only line that differs: the config
        t0 = time.perf_counter()
        model.memory.ingest(hay.context_ids)
        out = model.generate(question, max_new_tokens=8, do_sample=False)
        answer = tok.decode(out[0, question.shape[1]:], skip_special_tokens=True).strip()
        spans = sorted(tuple(t["span"]) for t in model.memory.trace())
        rows.append((name, answer, extract_key(answer) == hay.key, time.perf_counter() - t0, spans))
        memkit.unwrap(model)

print(f"\nkey {hay.key} at tokens {hay.needle_span}")
print(f"{'backend':<12} {'correct':<8} {'seconds':>8}  answer / retrieved spans")
for name, answer, ok, sec, spans in rows:
    print(f"{name:<12} {ok!s:<8} {sec:8.1f}  {answer!r} {spans}")
same = len({tuple(r[4]) for r in rows}) == 1
print("every backend retrieved the same chunks" if same else "backends retrieved different chunks")
